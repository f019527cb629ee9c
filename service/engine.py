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
through stages, each a FIFO of items batched dynamically:

    encode:   images -> image processor -> vision encoder -> Q-Former -> projected queries (B, Q, D)
              (+ the frozen vision features (B, N, Dv) when the bundle can align)
    generate: projected queries + prompts -> backend.generate, one batch per generation setting
    align:    frozen vision features / texts -> the Q-Former's own heads (qformer.alignment), no LLM:
              `AlignJob` (classify, match) and `EmbedJob` (embeddings); one batch per key (below)

Model work runs on one worker thread, one batch at a time (torch: encode, align and generate batches take
turns), so the event loop stays free for health checks and request parsing. How a stage forms its batches,
and how generation is scheduled per iteration with a backend that decodes token by token, is told in
`service.batching`. An image encoded once (`encode_image`) stays in the cache; later jobs name its `image_id`.
With a backend that decodes token by token, the keys and values of the LLM positions every row about a cached
image begins with ([quality][queries][task vectors]) are computed by the first such job and kept with the image
(`CachedImage.prefixes`, counted in the cache's bytes), so later questions prefill only their own text.

Alignment batches group items with equal keys: ("classify", labels, templates, ensemble) and ("match", texts,
(), "") — one image per item, the text side computed once for the whole batch — and ("embed_text", (), (), "")
/ ("embed_image", (), (), "") for embeddings, whatever their contents. The engine answers alignment work only when
the bundle can align (`can_align`: its aligner's Q-Former has a text branch and the bundle a
`qformer_tokenizer`); otherwise 400 `alignment_not_supported` with `alignment_problem` as the message.

    async with engine.admit() as ticket:
        scores = await engine.run(ticket, AlignJob("classify", ("circle", "square"), image=pil_image))
        vectors = await engine.run(ticket, EmbedJob([("text", "a red circle"), ("image_id", "img_...")]))
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

from qformer import alignment
from qformer.generation import GenerationConfig, Generated
from qformer.tasks import with_task
from service.batching import PrefixSlot, _ContinuousStage, _Item, _Rows, _Stage
from service.cache import CachedImage, ImageCache
from service.errors import BadRequest, DeadlineExceeded, InternalError, NotFound, Overloaded, ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8  # rows per batch; one request may bring several rows (VQA questions)
    max_wait_ms: float = 5.0  # a batch waits this long for company, while other requests are in progress
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
    queue_ms: float = 0.0  # waiting (admission queue and batch formation): total - encode - generate - align
    encode_ms: float = 0.0
    generate_ms: float = 0.0
    align_ms: float = 0.0  # model time in align batches
    total_ms: float = 0.0
    cached: bool = False

    def finish(self, admitted: float) -> None:
        self.total_ms = (time.perf_counter() - admitted) * 1000
        self.queue_ms = max(0.0, self.total_ms - self.encode_ms - self.generate_ms - self.align_ms)


@dataclass
class Job:
    """What to generate: `prompts` over one image (each prompt is one row), given as pixels or by cache id."""

    prompts: list[str]
    config: GenerationConfig
    quality: int | None = None  # one level for every row, or None (no quality prompt)
    image: Image.Image | None = None
    image_id: str | None = None
    task: str | None = None  # a task prompt of the bundle, by name: its vectors follow the queries (qformer.tasks)


@dataclass
class JobResult:
    outputs: list[Generated]
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    image_size: tuple[int, int] | None = None  # (width, height) of a cached image's original


@dataclass
class AlignJob:
    """Scores from the Q-Former's own heads over one image, no LLM (`qformer.alignment`):
    `task` "classify": a probability per label in `texts`, each written into every one of `templates`
    (prompt ensembling); "match": the ITM probability and the ITC similarity per text in `texts`."""

    task: str  # "classify" | "match"
    texts: tuple[str, ...]
    templates: tuple[str, ...] = alignment.DEFAULT_TEMPLATES  # classify only
    ensemble: str = "mean"  # classify only: how a label's templates combine (`alignment.ENSEMBLES`)
    image: Image.Image | None = None
    image_id: str | None = None


@dataclass
class AlignResult:
    scores: dict[str, list[float]]  # classify: {"probability"}; match: {"itm", "itc"}; one value per text
    timings: Timings
    image_size: tuple[int, int] | None = None  # (width, height) of a cached image's original


@dataclass
class EmbedJob:
    """Unit vectors in the shared ITC space, one per input in order: ("text", str), ("image", a PIL image)
    or ("image_id", an id of the cache). `params` names each input in errors (default `input.<i>`)."""

    inputs: list[tuple[str, Any]]
    params: list[str] | None = None


@dataclass
class EmbedResult:
    vectors: torch.Tensor  # (n, E) float32 on the CPU, unit norm, in input order
    prompt_tokens: int  # Q-Former text tokens of the texts + query tokens per image
    timings: Timings


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
        self._aligner: _Stage | None = None
        self.qformer_tokenizer = getattr(bundle, "qformer_tokenizer", None)
        self.tasks = dict(getattr(bundle, "tasks", None) or {})  # task prompts by name

    # --- model facts the routes need
    @property
    def model_config(self):
        return self.bridge.cfg

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.closed

    @property
    def alignment_problem(self) -> str | None:
        """Why this bundle cannot classify, match or embed (None when it can)."""
        if not self.bridge.aligner.qformer.cfg.with_text:
            return ("this model's Q-Former has no text branch (ITC/ITM heads), so it cannot classify, match or "
                    "embed; serve a bundle trained with one (stage 1's, or stage 2 with model.keep_alignment)")
        if self.qformer_tokenizer is None:
            return ("this bundle has no qformer_tokenizer, so texts cannot reach the Q-Former's text branch; "
                    "it cannot classify, match or embed")
        return None

    @property
    def can_align(self) -> bool:
        return self.alignment_problem is None

    @property
    def embed_dim(self) -> int | None:
        return self.bridge.aligner.qformer.cfg.embed_dim if self.can_align else None

    def require_alignment(self) -> None:
        """400 `alignment_not_supported` (the message says why) unless the bundle can align."""
        problem = self.alignment_problem
        if problem is not None:
            raise BadRequest(problem, param=None, code="alignment_not_supported")

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
        in_flight = self._requests_in_progress
        self._encoder = _Stage("encode", self._encode_batch, worker, rows, wait_s, self.metrics, self._map_error,
                               in_flight)
        self._aligner = _Stage("align", self._align_batch, worker, rows, wait_s, self.metrics,
                               self._map_align_error, in_flight)
        if getattr(self.backend, "continuous", False):
            self._generator = _ContinuousStage("generate", self.backend, gen_slots, rows, self.metrics,
                                               self._map_error)
        else:
            self._generator = _Stage("generate", self._generate_batch, gen_slots, rows, wait_s, self.metrics,
                                     self._map_error, in_flight)
        self._idle = asyncio.Event()
        self._idle.set()
        await self.backend.start()
        self._encoder.start()
        self._aligner.start()
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
        if self.can_align:
            await self._run(ticket, AlignJob("classify", ("warm-up",), image=image))

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
        for stage in (self._encoder, self._aligner, self._generator):
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

    def _requests_in_progress(self) -> int:
        return self.in_flight

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    # --- work
    async def run(self, ticket: Ticket, job: Job | AlignJob | EmbedJob) -> JobResult | AlignResult | EmbedResult:
        if not self.started:
            raise Overloaded("the model is still loading", code="not_ready", retry_after=self.config.retry_after_s)
        return await self._run(ticket, job)

    async def encode_image(self, ticket: Ticket, image: Image.Image, original_size: tuple[int, int]) -> CachedImage:
        """Encode once and keep the projected queries (and the vision features when the bundle can align);
        later requests name the returned `image_id`."""
        (queries, features), seconds = await self._encode_raw(ticket, image)
        ticket.timings.encode_ms = seconds * 1000
        ticket.timings.total_ms = (time.perf_counter() - ticket.admitted) * 1000
        # Own copies: a batch's rows are views of one tensor, which would otherwise stay alive uncounted.
        return self.cache.put(queries.clone(), *original_size,
                              features=None if features is None else features.clone())

    def get_image(self, image_id: str) -> CachedImage | None:
        return self.cache.get(image_id)

    def delete_image(self, image_id: str) -> bool:
        return self.cache.delete(image_id)

    async def _run(self, ticket: Ticket, job: Job | AlignJob | EmbedJob) -> JobResult | AlignResult | EmbedResult:
        if isinstance(job, AlignJob):
            return await self._run_align(ticket, job)
        if isinstance(job, EmbedJob):
            return await self._run_embed(ticket, job)
        if not job.prompts:
            raise BadRequest("nothing to generate")
        if job.task is not None and job.task not in self.tasks:
            raise BadRequest(f"unknown task {job.task!r}; GET /v1/models lists this model's tasks",
                             code="unknown_task", param="task")
        size = entry = None
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
        if job.task is not None:
            queries = with_task(queries, self.tasks[job.task].vectors)
        rows = _Rows(queries.unsqueeze(0).expand(n, *queries.shape), list(job.prompts),
                     [job.quality] * n if job.quality is not None else None, job.config,
                     self.row_lengths(job.prompts, job.quality, job.task))
        if entry is not None and isinstance(self._generator, _ContinuousStage):
            # Every question about a cached image begins with the same [quality][queries][task] positions:
            # their keys and values are computed once and kept with the image.
            rows.prefix = PrefixSlot(entry.prefixes, (job.quality, job.task), self.prefix_length(job.quality, job.task))
        # Seeded sampling runs alone: one seed per batch is what makes it reproducible. Rows of one batch
        # share a prefix length: the task (its vectors' count) is part of the key.
        key: Hashable = (job.config, job.quality is not None, job.task) if job.config.seed is None else object()
        outputs, seconds = await self._submit(self._generator, ticket, key, n, rows)
        if entry is not None:
            self.cache.account(entry)  # a prefix kept with it counts towards the cache's bytes
        ticket.timings.generate_ms = seconds * 1000
        t = ticket.timings
        t.finish(ticket.admitted)
        completion = sum(len(g.token_ids) for g in outputs)
        self.metrics.generated_tokens.inc(completion)
        return JobResult(outputs, sum(rows.lengths), completion, t, size)

    async def _encode(self, ticket: Ticket, image: Image.Image) -> torch.Tensor:
        (queries, _), seconds = await self._encode_raw(ticket, image)
        ticket.timings.encode_ms = seconds * 1000
        return queries

    async def _encode_raw(self, ticket: Ticket, image: Image.Image) -> tuple[tuple[torch.Tensor, Any], float]:
        """((queries (Q, D), features (N, Dv) or None), seconds) of one image through the encode stage."""
        self._wake_decoder()
        return await self._submit(self._encoder, ticket, "encode", 1, image)

    def _wake_decoder(self) -> None:
        if isinstance(self._generator, _ContinuousStage):
            self._generator.wake()  # the decoder yields the model thread at the next token boundary

    # --- alignment (the Q-Former's own heads)
    async def _run_align(self, ticket: Ticket, job: AlignJob) -> AlignResult:
        self.require_alignment()
        if not job.texts:
            raise BadRequest("nothing to score")
        features, size = await self._features(ticket, job.image, job.image_id, "image_id")
        if job.task == "classify":
            key: Hashable = ("classify", tuple(job.texts), tuple(job.templates), job.ensemble)
            rows = 1  # the labels' text features are computed once per batch
        elif job.task == "match":
            key, rows = ("match", tuple(job.texts), (), ""), len(job.texts)  # one joint pass per (image, text)
        else:
            raise BadRequest("unknown alignment task")
        scores = await self._align(ticket, key, rows, features.unsqueeze(0))
        ticket.timings.finish(ticket.admitted)
        return AlignResult(scores, ticket.timings, size)

    async def _run_embed(self, ticket: Ticket, job: EmbedJob) -> EmbedResult:
        self.require_alignment()
        if not job.inputs:
            raise BadRequest("nothing to embed")
        params = job.params or [f"input.{i}" for i in range(len(job.inputs))]
        texts = [(i, value) for i, (kind, value) in enumerate(job.inputs) if kind == "text"]
        images = [(i, kind, value) for i, (kind, value) in enumerate(job.inputs) if kind != "text"]

        async def embed_texts():
            if not texts:
                return None
            return await self._align(ticket, ("embed_text", (), (), ""), len(texts), tuple(v for _, v in texts))

        async def embed_images():
            if not images:
                return None
            found = await _gather([
                self._features(ticket, value if kind == "image" else None, value if kind == "image_id" else None,
                               params[i]) for i, kind, value in images])
            return await self._align(ticket, ("embed_image", (), (), ""), len(images),
                                      torch.stack([f for f, _ in found]))

        text_part, image_vectors = await _gather([embed_texts(), embed_images()])
        vectors = torch.empty(len(job.inputs), self.embed_dim)
        tokens = 0
        if text_part is not None:
            text_vectors, tokens = text_part
            vectors[[i for i, _ in texts]] = text_vectors
        if image_vectors is not None:
            vectors[[i for i, _, _ in images]] = image_vectors
            tokens += len(images) * self.bridge.cfg.qformer.num_query_tokens
        ticket.timings.finish(ticket.admitted)
        return EmbedResult(vectors, tokens, ticket.timings)

    async def _features(self, ticket: Ticket, image: Image.Image | None, image_id: str | None,
                        param: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """(N, Dv) frozen vision features of a cached image (and its original size) or of pixels, encoded now."""
        if image_id is not None:
            entry = self.cache.get(image_id)
            if entry is None:
                raise NotFound("unknown or expired image_id; upload the image again", code="image_not_found",
                               param=param)
            if entry.features is None:  # cached before the features were kept: cannot happen within one engine
                raise BadRequest("this cached image has no vision features; upload it again",
                                 code="alignment_not_supported", param=param)
            ticket.timings.cached = True
            return entry.features, (entry.width, entry.height)
        if image is None:
            raise BadRequest("no image")
        (_, features), seconds = await self._encode_raw(ticket, image)
        ticket.timings.encode_ms = max(ticket.timings.encode_ms, seconds * 1000)  # images share encode batches
        return features, None

    async def _align(self, ticket: Ticket, key: Hashable, rows: int, payload: Any):
        self._wake_decoder()
        result, seconds = await self._submit(self._aligner, ticket, key, rows, payload)
        ticket.timings.align_ms += seconds * 1000
        return result

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

    def prefix_length(self, quality: int | None, task: str | None = None) -> int:
        """LLM input positions before a row's text: quality prompt + queries + task vectors."""
        cfg = self.bridge.cfg
        prefix = cfg.qformer.num_query_tokens + (cfg.quality_prompt_len if quality is not None else 0)
        return prefix + (self.tasks[task].num_vectors if task is not None else 0)

    def row_lengths(self, prompts: list[str], quality: int | None, task: str | None = None) -> list[int]:
        """LLM input positions per prompt row: the prefix + text tokens."""
        prefix = self.prefix_length(quality, task)
        return [prefix + len(ids) for ids in self.tokenizer(prompts).input_ids]

    def prompt_tokens(self, prompts: list[str], quality: int | None) -> int:
        return sum(self.row_lengths(prompts, quality))

    # --- batch functions (run by the stages)
    async def _encode_batch(self, batch: list[_Item]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        images = [it.payload for it in batch]
        queries, feats = await asyncio.get_running_loop().run_in_executor(self.executor, self._encode_sync, images)
        self.metrics.encoded_images.inc(len(images))
        return list(zip(queries, feats if feats is not None else [None] * len(images)))

    @torch.no_grad()
    def _encode_sync(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(projected queries (B, Q, D), frozen vision features (B, N, Dv) when the bundle can align, else None)."""
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        device = next(self.bridge.parameters()).device
        feats = self.bridge.encode_images(pixels.to(device))
        return self.bridge.project_queries(feats), (feats if self.can_align else None)

    async def _align_batch(self, batch: list[_Item]) -> list[Any]:
        kind, texts, templates, ensemble = batch[0].key  # equal keys: one kind, labels/texts, templates, ensemble
        payloads = [it.payload for it in batch]
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._align_sync, kind, texts, templates, ensemble, payloads)

    @torch.no_grad()
    def _align_sync(self, kind: str, texts: tuple[str, ...], templates: tuple[str, ...], ensemble: str,
                    payloads: list[Any]):
        """One forward for the whole batch; the result split back per item (model thread)."""
        bridge, qtok = self.bridge, self.qformer_tokenizer
        if kind == "embed_text":
            flat = [t for p in payloads for t in p]
            vectors = alignment.text_embeddings(bridge, qtok, flat).cpu()
            ids = qtok(flat, truncation=True, max_length=alignment.MAX_TEXT_TOKENS).input_ids
            out, i = [], 0
            for p in payloads:
                out.append((vectors[i : i + len(p)], sum(len(x) for x in ids[i : i + len(p)])))
                i += len(p)
            return out
        sizes = [p.shape[0] for p in payloads]
        feats = torch.cat(payloads)
        if kind == "embed_image":
            return list(alignment.image_embeddings(bridge, feats).cpu().split(sizes))
        if kind == "classify":
            probs = alignment.classify(bridge, qtok, feats, list(texts), templates, ensemble).cpu()
            return [{"probability": row.tolist()} for row in probs]  # one image per item
        if kind == "match":
            scores = alignment.match(bridge, qtok, feats, list(texts))
            itm, itc = scores["itm"].cpu(), scores["itc"].cpu()
            return [{"itm": itm[i].tolist(), "itc": itc[i].tolist()} for i in range(len(payloads))]
        raise RuntimeError(f"unknown alignment batch kind {kind!r}")

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

    def _map_align_error(self, exc: BaseException) -> ServiceError:
        if isinstance(exc, alignment.NoTextBranch):
            return BadRequest(self.alignment_problem or "this model cannot classify, match or embed",
                              code="alignment_not_supported")
        if isinstance(exc, ValueError):  # qformer.alignment's refusals of its inputs (the routes check them first)
            log.info("alignment refused a batch: %s", exc)
            return BadRequest("the labels, texts or templates could not be scored", code="invalid_alignment_request")
        return self._map_error(exc)

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


async def _gather(coros: list) -> list:
    """asyncio.gather that cancels the others when one fails, so no orphan keeps a stage item queued."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
