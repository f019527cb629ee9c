"""Admission, dynamic batching, the encoded-image cache, deadlines, cancellation and draining. No HTTP here.

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

A stage forms a batch only when it may run it (it holds a model slot): the head item's key decides the
batch, items with the same key join it up to `max_batch_size` rows, and a batch that is not full waits at
most `max_wait_ms` after its head arrived. An item whose request is cancelled or times out before its
batch starts is removed and never computed; a batch already running finishes and its result is dropped.
Model work runs on one worker thread, one batch at a time (torch: encode and generate batches take turns),
so the event loop stays free for health checks and request parsing.

With a backend that decodes token by token (`continuous = True`: torch), generation is scheduled per
iteration instead (`_ContinuousStage`): up to `max_batch_size` rows decode together, whatever their
settings; requests join the running batch at a token boundary (newcomers prefilled together) and leave it
when their rows are done; a cancelled or timed-out request's rows leave at the next step. Encode batches
take the model thread between iterations.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from qformer.generation import Decoder, GenerationConfig, Generated, Sequence, finish, row_generators
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


@dataclass
class CachedImage:
    image_id: str
    queries: torch.Tensor  # (Q, D) projected queries, on the model's device
    width: int  # original image size (after EXIF transpose): what detection boxes are scaled to
    height: int
    nbytes: int
    created_at: float
    expires_at: float


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


# --- the encoded-image cache -----------------------------------------------------------------------


class ImageCache:
    """LRU of projected queries bounded by bytes, with a lifetime per entry. Event-loop only (no locking)."""

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

    def put(self, queries: torch.Tensor, width: int, height: int) -> CachedImage:
        nbytes = queries.element_size() * queries.nelement()
        if nbytes > self.max_bytes:
            raise BadRequest("the image cache is disabled on this server (image_cache_mb is too small)",
                             code="image_cache_disabled")
        now = self.clock()
        entry = CachedImage("img_" + secrets.token_urlsafe(18), queries, width, height, nbytes, now, now + self.ttl_s)
        self._entries[entry.image_id] = entry
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes or (self._entries and next(iter(self._entries.values())).expires_at <= now):
            self._remove(next(iter(self._entries)), evicted=True)
        self._update_gauges()
        return entry

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


# --- batching stages -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    key: Hashable  # items batch together only with equal keys
    rows: int
    payload: Any
    ticket: Ticket
    future: asyncio.Future
    enqueued: float  # loop time


class _Stage:
    """A FIFO of items and the loop that turns it into batches (see the module docstring)."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[_Item]], Awaitable[list[Any]]],
        slots: asyncio.Semaphore,
        max_rows: int,
        max_wait_s: float,
        metrics: Metrics,
        map_error: Callable[[BaseException], ServiceError],
    ):
        self.name = name
        self.run_batch = run_batch
        self.slots = slots
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.map_error = map_error
        self.items: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name=f"qbridge-{self.name}")

    def put(self, item: _Item) -> None:
        self.items.append(item)
        self._arrived.set()
        self._gauge()

    def discard(self, item: _Item) -> None:
        try:
            self.items.remove(item)
        except ValueError:
            pass  # already taken into a batch (or pruned)
        self._gauge()

    def _gauge(self) -> None:
        self.metrics.pending.labels(self.name).set(len(self.items))

    def _prune(self) -> None:
        if any(it.future.done() for it in self.items):
            self.items = deque(it for it in self.items if not it.future.done())
            self._gauge()

    async def _loop(self) -> None:
        while True:
            self._prune()
            if not self.items:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self.slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self.slots.release()
                raise
            if not batch:
                self.slots.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        while True:
            self._prune()
            if not self.items:
                return []
            head = self.items[0]
            rows = sum(it.rows for it in self.items if it.key == head.key)
            wait = head.enqueued + self.max_wait_s - loop.time()
            if rows >= self.max_rows or wait <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                pass
        batch, rows = [], 0
        for it in self.items:
            if it.key != head.key:
                continue
            if batch and rows + it.rows > self.max_rows:
                break
            batch.append(it)
            rows += it.rows
        taken = set(map(id, batch))
        self.items = deque(it for it in self.items if id(it) not in taken)
        self._gauge()
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            self.metrics.batch_size.labels(self.name).observe(sum(it.rows for it in batch))
            start = time.perf_counter()
            try:
                results = await self.run_batch(batch)
            except asyncio.CancelledError:  # the engine is closing
                self._fail(batch, Overloaded("the server is shutting down", code="shutting_down"))
                raise
            except Exception as exc:
                self._fail(batch, self.map_error(exc))
                return
            seconds = time.perf_counter() - start
            self.metrics.batch_seconds.labels(self.name).observe(seconds)
            for it, result in zip(batch, results):
                if not it.future.done():
                    it.future.set_result((result, seconds))
        finally:
            self.slots.release()

    @staticmethod
    def _fail(batch: list[_Item], error: ServiceError) -> None:
        for it in batch:
            if not it.future.done():
                it.future.set_exception(error)

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        self._fail(list(self.items), Overloaded("the server is shutting down", code="shutting_down"))
        self.items.clear()
        self._gauge()


@dataclass
class _Rows:
    queries: torch.Tensor  # (n, Q, D)
    prompts: list[str]
    quality: list[int] | None
    config: GenerationConfig
    lengths: list[int]  # prompt positions per row (quality + queries + text)


# --- continuous batching ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    """A generate item whose rows are (being) decoded: built when its first row joins the running batch."""

    item: _Item
    left: int  # rows not finished yet
    joined: int = 0  # rows added to the decoder so far (fewer than all when the free rows were too few)
    seqs: list[Sequence] = field(default_factory=list)  # made on the model thread with the row embeddings
    embeds: list[torch.Tensor] = field(default_factory=list)
    started: float = 0.0  # perf_counter at its first prefill


class _ContinuousStage:
    """Iteration-level scheduling (as in Orca and vLLM) over the backend's `Decoder`.

    Each iteration, on the model thread: the rows of requests cancelled or past their deadline leave the
    running batch; waiting requests' rows take the free rows, prefilled together in one forward; then decode
    steps for every running row, until a request is answered or the scheduler is wanted (`wake`: a newcomer,
    a request gone, an image to encode), at most `steps_per_call` (fewer thread hops per token). A request
    is answered as soon as its own rows are done, so a short request never waits for a long one, and a
    newcomer waits at most one step (no `max_wait_ms`). Between iterations the model thread is free for an
    encode batch. What the decoder refuses (`Decoder.fits`: beam
    search, a row longer than its cache) runs alone through `backend.generate` when it reaches the head.
    Same interface as `_Stage` (`put`, `discard`, `start`, `close`, `items` = the waiting items).
    """

    def __init__(self, name: str, backend, slots: asyncio.Semaphore, max_rows: int, metrics: Metrics,
                 map_error: Callable[[BaseException], ServiceError]):
        self.name = name
        self.backend = backend
        self.slots = slots
        self.max_rows = max_rows
        self.metrics = metrics
        self.map_error = map_error
        self.items: deque[_Item] = deque()  # waiting: no row has joined yet
        self.active: list[_Request] = []  # some rows joined; in arrival order
        self.decoder: Decoder | None = None
        self._arrived = asyncio.Event()
        # Set when the scheduler has something to do between steps (a newcomer, a request gone, an encode
        # batch waiting for the model thread); until then one iteration runs up to `steps_per_call` steps.
        self._wake = threading.Event()
        self.steps_per_call = 16
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        if self._loop_task is None:
            self.decoder = self.backend.new_decoder(self.max_rows)
            self._loop_task = asyncio.create_task(self._loop(), name=f"qbridge-{self.name}")

    def put(self, item: _Item) -> None:
        self.items.append(item)
        self._arrived.set()
        self.wake()
        self._gauge()

    def discard(self, item: _Item) -> None:
        """A waiting item goes now; a running one's rows leave at the next step (its future is done)."""
        try:
            self.items.remove(item)
        except ValueError:
            pass
        self.wake()
        self._gauge()

    def wake(self) -> None:
        """End the running iteration at the next token boundary (thread-safe)."""
        self._wake.set()

    def _gauge(self) -> None:
        self.metrics.pending.labels(self.name).set(len(self.items))

    async def _loop(self) -> None:
        while True:
            self.items = deque(it for it in self.items if not it.future.done())
            self._gauge()
            if not self.items and not self.active:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self.slots.acquire()
            try:
                head = self.items[0] if self.items else None
                if head is not None and not self.decoder.fits(max(head.payload.lengths), head.payload.config):
                    self.items.popleft()
                    await self._run_alone(head)
                else:
                    await self._iteration()
            finally:
                self.slots.release()

    def _plan(self) -> tuple[list[Sequence], list[tuple[_Request, int, int]]]:
        """The running rows to drop (their requests are gone) and the rows joining: (request, first, count)."""
        self._wake.clear()  # what arrives from now on ends the coming iteration early
        gone = [r for r in self.active if r.item.future.done()]
        drops = [s for r in gone for s in r.seqs if s.row >= 0]
        self.active = [r for r in self.active if not r.item.future.done()]
        free = self.decoder.free_rows + len(drops)
        joins = []
        for r in self.active:  # a request larger than the free rows joins over several iterations
            k = min(free, r.item.rows - r.joined)
            if k:
                joins.append((r, r.joined, k))
                r.joined += k
                free -= k
        while free and self.items and self.decoder.fits(max(self.items[0].payload.lengths),
                                                        self.items[0].payload.config):
            item = self.items.popleft()
            r = _Request(item, left=item.rows)
            k = min(free, item.rows)
            joins.append((r, 0, k))
            r.joined = k
            free -= k
            self.active.append(r)
        self._gauge()
        return drops, joins

    async def _iteration(self) -> None:
        drops, joins = self._plan()
        start = time.perf_counter()
        try:
            done, prefilled, stepped = await self.backend.call(self._iterate_sync, drops, joins)
        except asyncio.CancelledError:  # the engine is closing
            self._fail_active(Overloaded("the server is shutting down", code="shutting_down"))
            raise
        except Exception as exc:
            # The decoder's state is unknown now: every running request fails, the next ones get a new one.
            self._fail_active(self.map_error(exc))
            self.decoder = self.backend.new_decoder(self.max_rows)
            return
        if prefilled:
            self.metrics.batch_size.labels("prefill").observe(prefilled)
        if stepped:
            self.metrics.batch_size.labels(self.name).observe(stepped)
        self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - start)
        for r, outputs, seconds in done:
            self.active.remove(r)
            if not r.item.future.done():
                r.item.future.set_result((outputs, seconds))

    def _iterate_sync(self, drops: list[Sequence], joins: list[tuple[_Request, int, int]]):
        """Model thread: drop, prefill the joining rows, one step; the requests whose rows are all done."""
        decoder = self.decoder
        for s in drops:
            decoder.remove(s)
        finished: list[Sequence] = []
        if joins:
            embeds, seqs = [], []
            for r, first, k in joins:
                if not r.seqs:
                    p = r.item.payload
                    r.embeds = self.backend.prompt_rows(p.queries, p.prompts, p.quality)
                    gens = row_generators(p.config, len(p.prompts), p.queries.device)
                    r.seqs = [Sequence(p.config, e.shape[0], g, owner=r) for e, g in zip(r.embeds, gens)]
                    r.started = time.perf_counter()
                embeds += r.embeds[first : first + k]
                seqs += r.seqs[first : first + k]
            finished += decoder.add(embeds, seqs)
        stepped = len(decoder.running)
        done = self._answered(finished)
        for _ in range(self.steps_per_call):  # until a request is answered or the scheduler is wanted
            done += self._answered(decoder.step())
            if done or self._wake.is_set() or not decoder.running:
                break
        return done, sum(k for _, _, k in joins), stepped

    def _answered(self, finished: list[Sequence]) -> list[tuple[_Request, list[Generated], float]]:
        done = []
        for s in finished:
            r = s.owner
            r.left -= 1
            if r.left == 0:
                config = r.item.payload.config
                outputs = [finish(self.backend.tokenizer, q.ids, q.logprobs, config) for q in r.seqs]
                done.append((r, outputs, time.perf_counter() - r.started))
        return done

    async def _run_alone(self, item: _Item) -> None:
        p = item.payload
        start = time.perf_counter()
        try:
            outputs = await self.backend.generate(p.queries, p.prompts, p.quality, p.config)
        except asyncio.CancelledError:
            _Stage._fail([item], Overloaded("the server is shutting down", code="shutting_down"))
            raise
        except Exception as exc:
            _Stage._fail([item], self.map_error(exc))
            return
        seconds = time.perf_counter() - start
        self.metrics.batch_size.labels("generate_alone").observe(item.rows)
        self.metrics.batch_seconds.labels("generate_alone").observe(seconds)
        if not item.future.done():
            item.future.set_result((outputs, seconds))

    def _fail_active(self, error: ServiceError) -> None:
        _Stage._fail([r.item for r in self.active], error)
        self.active = []

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        error = Overloaded("the server is shutting down", code="shutting_down")
        self._fail_active(error)
        _Stage._fail(list(self.items), error)
        self.items.clear()
        self._gauge()


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
