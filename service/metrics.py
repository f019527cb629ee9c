"""Prometheus metrics, one registry per app (so several apps in one process, as in the tests, stay apart).

    GET /metrics    -> the text exposition format
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series double the output and nobody here graphs them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # HTTP: `endpoint` is the route template (or "unmatched"), never the raw path: bounded label values.
        self.requests = Counter("qbridge_requests_total", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("qbridge_request_duration_seconds", "HTTP request latency",
                                 ["endpoint", "method", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        # Engine
        self.queue_depth = Gauge("qbridge_queue_depth", "requests admitted and not finished", registry=r)
        self.pending = Gauge("qbridge_pending_items", "batch items waiting for the model", ["stage"], registry=r)
        self.batch_size = Histogram("qbridge_batch_size", "rows per batch", ["stage"], buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("qbridge_batch_duration_seconds", "model time per batch", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("qbridge_rejected_total", "requests refused or abandoned by the engine", ["reason"],
                                registry=r)
        self.generated_tokens = Counter("qbridge_generated_tokens_total", "completion tokens", registry=r)
        self.ready = Gauge("qbridge_ready", "1 when the model is loaded and the server is not draining", registry=r)
        # Image cache
        self.cache_hits = Counter("qbridge_image_cache_hits_total", "image_id requests served from the cache",
                                  registry=r)
        self.cache_misses = Counter("qbridge_image_cache_misses_total", "image_id requests whose id was unknown",
                                    registry=r)
        self.cache_evictions = Counter("qbridge_image_cache_evictions_total", "entries evicted (size or age)",
                                       registry=r)
        self.cache_bytes = Gauge("qbridge_image_cache_bytes", "bytes held by the image cache", registry=r)
        self.cache_entries = Gauge("qbridge_image_cache_entries", "images held by the image cache", registry=r)
        self.encoded_images = Counter("qbridge_encoded_images_total", "images run through the vision encoder",
                                      registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
