"""The encoded-image cache: an image's projected queries (and, for a bundle that can align, its frozen vision
features) kept under an `image_id` (`CachedImage`), in an LRU bounded by bytes with a lifetime per entry
(`ImageCache`). No HTTP here."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.errors import BadRequest
from service.metrics import Metrics


@dataclass
class CachedImage:
    image_id: str
    queries: torch.Tensor  # (Q, D) projected queries, on the model's device
    width: int  # original image size (after EXIF transpose): what detection boxes are scaled to
    height: int
    nbytes: int
    created_at: float
    expires_at: float
    # (N, Dv) frozen vision features, on the model's device: what /v1/classify, /v1/match and /v1/embeddings
    # start from (qformer.alignment). Kept only when the bundle can align (service.engine.Engine.can_align).
    features: torch.Tensor | None = None
    # Keys and values of the LLM positions its rows begin with, by (quality, task): kept by the first request
    # that needs them (service.batching.PrefixSlot) and counted in `nbytes` by `ImageCache.account`.
    prefixes: dict = field(default_factory=dict)


class ImageCache:
    """LRU of encoded images bounded by bytes (queries and features counted), with a lifetime per entry.
    Event-loop only (no locking)."""

    def __init__(self, max_bytes: int, ttl_s: float, metrics: Metrics, clock: Callable[[], float] = time.time):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.clock = clock
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, image_id: str) -> CachedImage | None:
        entry = self._entries.get(image_id)
        if entry is not None and entry.expires_at <= self.clock():
            self._remove(image_id, evicted=True)
            entry = None
        if entry is None:
            self.metrics.cache_misses.inc()
            return None
        self._entries.move_to_end(image_id)
        self.metrics.cache_hits.inc()
        return entry

    def put(self, queries: torch.Tensor, width: int, height: int,
            features: torch.Tensor | None = None) -> CachedImage:
        nbytes = _tensor_bytes(queries, features)
        if nbytes > self.max_bytes:
            raise BadRequest("the image cache is disabled on this server (image_cache_mb is too small)",
                             code="image_cache_disabled")
        now = self.clock()
        entry = CachedImage("img_" + secrets.token_urlsafe(18), queries, width, height, nbytes, now, now + self.ttl_s,
                            features)
        self._entries[entry.image_id] = entry
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes or (self._entries and next(iter(self._entries.values())).expires_at <= now):
            self._remove(next(iter(self._entries)), evicted=True)
        self._update_gauges()
        return entry

    def account(self, entry: CachedImage) -> None:
        """Count what `entry` has kept since it was cached (its prefixes); evict the least recently used
        entries if that takes the cache over its bytes."""
        nbytes = _tensor_bytes(entry.queries, entry.features) + sum(p.nbytes for p in list(entry.prefixes.values()))
        if self._entries.get(entry.image_id) is not entry or nbytes == entry.nbytes:
            return
        self.nbytes += nbytes - entry.nbytes
        entry.nbytes = nbytes
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            self._remove(next(iter(self._entries)), evicted=True)
        self._update_gauges()

    def delete(self, image_id: str) -> bool:
        if image_id not in self._entries:
            return False
        self._remove(image_id, evicted=False)
        return True

    def _remove(self, image_id: str, *, evicted: bool) -> None:
        entry = self._entries.pop(image_id)
        self.nbytes -= entry.nbytes
        if evicted:
            self.metrics.cache_evictions.inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.cache_bytes.set(self.nbytes)
        self.metrics.cache_entries.set(len(self._entries))


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.element_size() * t.nelement() for t in tensors if t is not None)
