"""The batching machinery of the engine (`service.engine`): FIFO stages of items batched dynamically
(`_Stage`), and iteration-level scheduling for backends that decode token by token (`_ContinuousStage`).
No HTTP here.

A stage forms a batch only when it may run it (it holds a model slot): the head item's key decides the
batch, items with the same key join it up to `max_batch_size` rows, and a batch that is not full waits at
most `max_wait_ms` after its head arrived, and not at all when every request in progress is already waiting
there (nobody else could join it). An item whose request is cancelled or times out before its
batch starts is removed and never computed; a batch already running finishes and its result is dropped.

With a backend that decodes token by token (`continuous = True`: torch), generation is scheduled per
iteration instead (`_ContinuousStage`): up to `max_batch_size` rows decode together, whatever their
settings; requests join the running batch at a token boundary (newcomers prefilled together) and leave it
when their rows are done; a cancelled or timed-out request's rows leave at the next step. Encode batches
take the model thread between iterations.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from qformer.generation import Decoder, GenerationConfig, Generated, Prefix, Sequence, finish, row_generators
from service.errors import Overloaded, ServiceError
from service.metrics import Metrics


# --- batching stages -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    key: Hashable  # items batch together only with equal keys
    rows: int
    payload: Any
    ticket: Any  # the request's `service.engine.Ticket` (not imported: engine imports this module)
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
        in_flight: Callable[[], int],
    ):
        self.name = name
        self.run_batch = run_batch
        self.slots = slots
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.map_error = map_error
        # The requests in progress in the whole engine: no more of them than wait here means no company can
        # come, and a batch goes at once instead of waiting `max_wait_s` (a lone client's every request did).
        self.in_flight = in_flight
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
            alone = self.in_flight() <= len(self.items)
            if rows >= self.max_rows or wait <= 0 or alone:
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
class PrefixSlot:
    """Where a cached image keeps the keys and values of the `length` positions its rows begin with
    ([quality][queries][task vectors]): `store[key]`, filled on the model thread by the first request that
    needs it (a continuous backend's `Decoder.prefill_prefix`), read by every later one."""

    store: dict
    key: Hashable
    length: int


@dataclass
class _Rows:
    queries: torch.Tensor  # (n, Q, D)
    prompts: list[str]
    quality: list[int] | None
    config: GenerationConfig
    lengths: list[int]  # prompt positions per row (quality + queries + text)
    prefix: PrefixSlot | None = None  # rows about a cached image: their shared prefix, kept with the image


# --- continuous batching ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    """A generate item whose rows are (being) decoded: built when its first row joins the running batch."""

    item: _Item
    left: int  # rows not finished yet
    joined: int = 0  # rows added to the decoder so far (fewer than all when the free rows were too few)
    seqs: list[Sequence] = field(default_factory=list)  # made on the model thread with the row embeddings
    embeds: list[torch.Tensor] = field(default_factory=list)  # what `Decoder.add` takes (after the prefix, if any)
    prefix: Prefix | None = None
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
            embeds, seqs, prefixes = [], [], []
            for r, first, k in joins:
                if not r.seqs:
                    self._prepare(r)
                embeds += r.embeds[first : first + k]
                seqs += r.seqs[first : first + k]
                prefixes += [r.prefix] * k
            finished += decoder.add(embeds, seqs, prefixes)
        stepped = len(decoder.running)
        done = self._answered(finished)
        for _ in range(self.steps_per_call):  # until a request is answered or the scheduler is wanted
            done += self._answered(decoder.step())
            if done or self._wake.is_set() or not decoder.running:
                break
        return done, sum(k for _, _, k in joins), stepped

    def _prepare(self, r: _Request) -> None:
        """Model thread: a request's row embeddings and sequences; rows about a cached image start from its
        kept prefix (computed now if this is the first such request)."""
        p = r.item.payload
        rows = self.backend.prompt_rows(p.queries, p.prompts, p.quality)
        gens = row_generators(p.config, len(p.prompts), p.queries.device)
        r.seqs = [Sequence(p.config, e.shape[0], g, owner=r) for e, g in zip(rows, gens)]
        r.embeds = rows
        if p.prefix is not None:
            slot = p.prefix
            r.prefix = slot.store.get(slot.key)
            if r.prefix is None:
                r.prefix = slot.store[slot.key] = self.decoder.prefill_prefix(rows[0][: slot.length])
            r.embeds = [e[slot.length:] for e in rows]
        r.started = time.perf_counter()

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
