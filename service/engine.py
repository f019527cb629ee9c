"""Admission, deadlines, cancellation and draining, over the batching stages (`service.batching`) and the
encoded-image cache (`service.cache`). No HTTP here.

    engine = Engine(bundle, TorchBackend(bundle.bridge, bundle.tokenizer), EngineConfig(max_batch_size=8))
    await engine.start()
    async with engine.admit() as ticket:                  # Overloaded (503 + Retry-After) at once when full
        result = await engine.run(ticket, Job(prompts=["caption:"], config=GenerationConfig(), image=pil_image))
    await engine.drain(grace_s=30)                        # stop admitting, let in-flight requests finish
    await engine.close()

A request holds one queue slot (`queue_size` in all) from `admit` until it leaves the `async with`, whether
it finished, failed, passed its deadline or was cancelled because the client went away. Its work goes
through two stages, each a FIFO of items batched dynamically:

    encode:   images -> image processor -> vision encoder -> Q-Former -> projected queries (B, Q, D)
    generate: projected queries + prompts -> backend.generate, one batch per generation setting

Model work runs on one worker thread, one batch at a time (torch: encode and generate batches take turns),
so the event loop stays free for health checks and request parsing. How a stage forms its batches, and how
generation is scheduled per iteration with a backend that decodes token by token, is told in
`service.batching`. An image encoded once (`encode_image`) stays in the cache; later jobs name its `image_id`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from qformer.generation import GenerationConfig, Generated
from service.batching import _ContinuousStage, _Item, _Rows, _Stage
from service.cache import CachedImage, ImageCache
from service.errors import BadRequest, DeadlineExceeded, InternalError, NotFound, Overloaded, ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8  # rows per batch; one request may bring several rows (VQA questions)
    max_wait_ms: float = 5.0  # a lone request waits this long for company; keeps p50 low at low load
    queue_size: int = 64  # admitted requests (waiting + running)
    timeout_s: float = 30.0  # per-request deadline, queueing included
    image_cache_bytes: int = 256 * MiB
    image_cache_ttl_s: float = 3600.0
    retry_after_s: int = 1
    warmup: bool = True  # one tiny encode + generate before reporting ready

    @classmethod
    def from_settings(cls, settings) -> "EngineConfig":
        return cls(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            timeout_s=settings.timeout_s,
            image_cache_bytes=settings.image_cache_bytes,
            image_cache_ttl_s=settings.image_cache_ttl_s,
            retry_after_s=settings.retry_after_s,
            warmup=settings.warmup,
        )


@dataclass
class Timings:
    queue_ms: float = 0.0  # waiting (admission queue and batch formation): total - encode - generate
    encode_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0
    cached: bool = False


@dataclass
class Job:
    """What to generate: `prompts` over one image (each prompt is one row), given as pixels or by cache id."""

    prompts: list[str]
    config: GenerationConfig
    quality: int | None = None  # one level for every row, or None (no quality prompt)
    image: Image.Image | None = None
    image_id: str | None = None


@dataclass
class JobResult:
    outputs: list[Generated]
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    image_size: tuple[int, int] | None = None  # (width, height) of a cached image's original


class Ticket:
    """One admitted request. Holds its queue slot until released; `async with` releases it on any exit."""

    def __init__(self, engine: "Engine", timeout_s: float):
        self._engine = engine
        self.admitted = time.perf_counter()
        self.deadline = self.admitted + timeout_s
        self.timings = Timings()
        self._released = False

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._release()

    async def __aenter__(self) -> "Ticket":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()

# --- the engine ------------------------------------------------------------------------------------


class Engine:
    def __init__(
        self,
        bundle,
        backend,
        config: EngineConfig = EngineConfig(),
        *,
        metrics: Metrics | None = None,
        executor: ThreadPoolExecutor | None = None,
        model_name: str = "qbridge",
        device: str | None = None,
    ):
        self.bundle = bundle
        self.bridge = bundle.bridge
        self.tokenizer = bundle.tokenizer
        self.image_processor = bundle.image_processor
        self.backend = backend
        self.config = config
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.device = device or str(next(self.bridge.parameters()).device)
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbridge-model")
        self.cache = ImageCache(config.image_cache_bytes, config.image_cache_ttl_s, self.metrics)
        self.in_flight = 0
        self.draining = False
        self.started = False
        self.closed = False
        self._idle: asyncio.Event | None = None
        self._encoder: _Stage | None = None
        self._generator: _Stage | None = None

    # --- model facts the routes need
    @property
    def model_config(self):
        return self.bridge.cfg

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.closed

    # --- lifecycle
    async def start(self) -> None:
        """Start (or, after `close`, restart: an app's lifespan may run more than once, as in tests)."""
        if self.started and not self.closed:
            return
        self.started = self.closed = self.draining = False
        worker = asyncio.Semaphore(1)  # the model thread: one batch at a time
        if getattr(self.backend, "uses_model_thread", False):
            gen_slots = worker
        else:
            gen_slots = asyncio.Semaphore(max(1, int(getattr(self.backend, "max_concurrent_batches", 4))))
        wait_s = self.config.max_wait_ms / 1000
        rows = self.config.max_batch_size
        self._encoder = _Stage("encode", self._encode_batch, worker, rows, wait_s, self.metrics, self._map_error)
        if getattr(self.backend, "continuous", False):
            self._generator = _ContinuousStage("generate", self.backend, gen_slots, rows, self.metrics,
                                               self._map_error)
        else:
            self._generator = _Stage("generate", self._generate_batch, gen_slots, rows, wait_s, self.metrics,
                                     self._map_error)
        self._idle = asyncio.Event()
        self._idle.set()
        await self.backend.start()
        self._encoder.start()
        self._generator.start()
        if self.config.warmup:
            await self._warmup()
        self.started = True
        self.metrics.ready.set(0 if self.draining else 1)

    async def _warmup(self) -> None:
        ticket = Ticket(self, max(self.config.timeout_s, 600.0))
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        config = GenerationConfig(max_new_tokens=1)
        await self._run(ticket, Job(prompts=["warm-up"], config=config, image=image))

    def begin_drain(self) -> None:
        """Stop admitting (readiness turns 503). Safe to call from a signal handler."""
        self.draining = True
        self.metrics.ready.set(0)

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting and wait up to `grace_s` for admitted requests to finish; True if they all did."""
        self.begin_drain()
        if self._idle is None or self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except TimeoutError:
            log.warning("drain: %d requests still running after %.1f s", self.in_flight, grace_s)
            return False

    async def close(self) -> None:
        if self.closed:
            return
        self.begin_drain()
        self.closed = True
        for stage in (self._encoder, self._generator):
            if stage is not None:
                await stage.close()
        # The model thread stays: an abandoned batch may still be running on it, and an idle worker costs nothing.
        await self.backend.close()

    # --- admission
    def check_capacity(self) -> None:
        """Raise the 503 that `admit` would raise now, without taking a slot (a cheap early refusal)."""
        retry = self.config.retry_after_s
        if self.closed or self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise Overloaded("the server is shutting down", code="shutting_down", retry_after=retry)
        if not self.started:
            self.metrics.rejected.labels("not_ready").inc()
            raise Overloaded("the model is still loading", code="not_ready", retry_after=retry)
        if self.in_flight >= self.config.queue_size:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(
                f"the server is at capacity ({self.config.queue_size} requests in progress); retry later",
                retry_after=retry,
            )

    def admit(self, timeout_s: float | None = None) -> Ticket:
        self.check_capacity()
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        if self._idle is not None:
            self._idle.clear()
        return Ticket(self, self.config.timeout_s if timeout_s is None else timeout_s)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    # --- work
    async def run(self, ticket: Ticket, job: Job) -> JobResult:
        if not self.started:
            raise Overloaded("the model is still loading", code="not_ready", retry_after=self.config.retry_after_s)
        return await self._run(ticket, job)

    async def encode_image(self, ticket: Ticket, image: Image.Image, original_size: tuple[int, int]) -> CachedImage:
        """Encode once and keep the projected queries; later requests name the returned `image_id`."""
        queries = await self._encode(ticket, image)
        ticket.timings.total_ms = (time.perf_counter() - ticket.admitted) * 1000
        return self.cache.put(queries, *original_size)

    def get_image(self, image_id: str) -> CachedImage | None:
        return self.cache.get(image_id)

    def delete_image(self, image_id: str) -> bool:
        return self.cache.delete(image_id)

    async def _run(self, ticket: Ticket, job: Job) -> JobResult:
        if not job.prompts:
            raise BadRequest("nothing to generate")
        size = None
        if job.image_id is not None:
            entry = self.cache.get(job.image_id)
            if entry is None:
                raise NotFound("unknown or expired image_id; upload the image again", code="image_not_found",
                               param="image_id")
            queries, size = entry.queries, (entry.width, entry.height)
            ticket.timings.cached = True
        elif job.image is not None:
            queries = await self._encode(ticket, job.image)
        else:
            raise BadRequest("no image")
        n = len(job.prompts)
        rows = _Rows(queries.unsqueeze(0).expand(n, *queries.shape), list(job.prompts),
                     [job.quality] * n if job.quality is not None else None, job.config,
                     self.row_lengths(job.prompts, job.quality))
        # Seeded sampling runs alone: one seed per batch is what makes it reproducible.
        key: Hashable = (job.config, job.quality is not None) if job.config.seed is None else object()
        outputs, seconds = await self._submit(self._generator, ticket, key, n, rows)
        ticket.timings.generate_ms = seconds * 1000
        t = ticket.timings
        t.total_ms = (time.perf_counter() - ticket.admitted) * 1000
        t.queue_ms = max(0.0, t.total_ms - t.encode_ms - t.generate_ms)
        completion = sum(len(g.token_ids) for g in outputs)
        self.metrics.generated_tokens.inc(completion)
        return JobResult(outputs, sum(rows.lengths), completion, t, size)

    async def _encode(self, ticket: Ticket, image: Image.Image) -> torch.Tensor:
        if isinstance(self._generator, _ContinuousStage):
            self._generator.wake()  # the decoder yields the model thread at the next token boundary
        queries, seconds = await self._submit(self._encoder, ticket, "encode", 1, image)
        ticket.timings.encode_ms = seconds * 1000
        return queries

    async def _submit(self, stage: _Stage, ticket: Ticket, key: Hashable, rows: int, payload: Any):
        loop = asyncio.get_running_loop()
        remaining = ticket.remaining()
        if remaining <= 0:
            self.metrics.rejected.labels("deadline").inc()
            raise DeadlineExceeded()
        item = _Item(key, rows, payload, ticket, loop.create_future(), loop.time())
        stage.put(item)
        try:
            return await asyncio.wait_for(item.future, remaining)
        except TimeoutError:
            stage.discard(item)
            self.metrics.rejected.labels("deadline").inc()
            raise DeadlineExceeded(f"the request did not finish within its deadline of {self.config.timeout_s:g} s")
        except asyncio.CancelledError:
            stage.discard(item)
            item.future.cancel()
            self.metrics.rejected.labels("cancelled").inc()
            raise

    def row_lengths(self, prompts: list[str], quality: int | None) -> list[int]:
        """LLM input positions per prompt row: quality prompt + queries + text tokens."""
        cfg = self.bridge.cfg
        prefix = cfg.qformer.num_query_tokens + (cfg.quality_prompt_len if quality is not None else 0)
        return [prefix + len(ids) for ids in self.tokenizer(prompts).input_ids]

    def prompt_tokens(self, prompts: list[str], quality: int | None) -> int:
        return sum(self.row_lengths(prompts, quality))

    # --- batch functions (run by the stages)
    async def _encode_batch(self, batch: list[_Item]) -> list[torch.Tensor]:
        images = [it.payload for it in batch]
        queries = await asyncio.get_running_loop().run_in_executor(self.executor, self._encode_sync, images)
        self.metrics.encoded_images.inc(len(images))
        return list(queries)

    @torch.no_grad()
    def _encode_sync(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        device = next(self.bridge.parameters()).device
        feats = self.bridge.encode_images(pixels.to(device))
        return self.bridge.project_queries(feats)  # (B, Q, D)

    async def _generate_batch(self, batch: list[_Item]) -> list[list[Generated]]:
        parts: list[_Rows] = [it.payload for it in batch]  # equal keys: one config, quality all or none
        config = parts[0].config
        queries = torch.cat([p.queries for p in parts])
        prompts = [s for p in parts for s in p.prompts]
        quality = [q for p in parts for q in p.quality] if parts[0].quality is not None else None
        outputs = await self.backend.generate(queries, prompts, quality, config)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"backend returned {len(outputs)} rows for {len(prompts)} prompts")
        out, i = [], 0
        for p in parts:
            out.append(outputs[i : i + len(p.prompts)])
            i += len(p.prompts)
        return out

    def _map_error(self, exc: BaseException) -> ServiceError:
        if isinstance(exc, ServiceError):
            return exc
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            log.error("out of memory in a batch")
            return Overloaded("the model ran out of memory; retry later", code="out_of_memory",
                              retry_after=self.config.retry_after_s)
        if isinstance(exc, ValueError):
            # Backends raise ValueError for settings they cannot run (vLLM: beam search, length limits).
            log.info("backend refused a batch: %s", exc)
            return BadRequest(f"the {self.backend.name} backend cannot run these generation settings",
                              code="unsupported_generation_settings")
        log.error("batch failed", exc_info=exc)
        return InternalError()
