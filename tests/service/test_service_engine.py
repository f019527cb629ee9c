"""The engine without HTTP: batching, admission, deadlines, cancellation, draining, the image cache, errors.

A `StubBackend` whose batches wait on a gate makes queueing deterministic; images come from the cache
(projected queries put there directly) unless a test is about encoding.
    .venv/bin/python -m pytest tests/service/test_service_engine.py -q
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from conftest import StubBackend, make_engine, scene_image
from qformer.generation import GenerationConfig
from service.cache import ImageCache
from service.engine import Job
from service.errors import BadRequest, DeadlineExceeded, InternalError, Overloaded
from service.metrics import Metrics

GREEDY = GenerationConfig(max_new_tokens=4)
BEAM = GenerationConfig(max_new_tokens=4, strategy="beam", num_beams=2)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def cached(engine) -> str:
    return engine.cache.put(torch.zeros(5, 48), 40, 30).image_id


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def ask(engine, prompt: str, config=GREEDY, image_id=None, **job):
    async with engine.admit() as ticket:
        return await engine.run(ticket, Job(prompts=[prompt], config=config, image_id=image_id, **job))


def test_batches_group_requests_with_the_same_settings(bundle):
    async def main():
        gate = asyncio.Event()
        stub = StubBackend(lambda p: p.upper(), gate=gate)
        engine = make_engine(bundle, stub, max_batch_size=4, max_wait_ms=20)
        await engine.start()
        image = cached(engine)
        first = asyncio.create_task(ask(engine, "g0", image_id=image))
        await until(lambda: len(stub.calls) == 1)  # the backend is busy with g0; the rest queue up
        names = ["g1", "b1", "g2", "g3", "b2", "g4", "g5", "g6"]
        tasks = [asyncio.create_task(ask(engine, n, BEAM if n[0] == "b" else GREEDY, image_id=image)) for n in names]
        await until(lambda: sum(it.rows for it in engine._generator.items) == len(names))
        gate.set()
        results = await asyncio.gather(first, *tasks)
        assert [r.outputs[0].text for r in results] == ["G0", *[n.upper() for n in names]]
        batches = [prompts for prompts, _, _ in stub.calls]
        assert batches == [["g0"], ["g1", "g2", "g3", "g4"], ["b1", "b2"], ["g5", "g6"]]
        for prompts, _, config in stub.calls:
            assert config == (BEAM if prompts[0][0] == "b" else GREEDY)
        await engine.close()

    run(main())


def test_a_batch_waits_for_company_only_while_others_are_in_progress(bundle):
    async def main():
        stub = StubBackend(lambda p: p.upper())
        engine = make_engine(bundle, stub, max_batch_size=4, max_wait_ms=60_000)
        await engine.start()
        image = cached(engine)
        # alone: nobody else could join its batch, so it does not wait the minute
        assert (await asyncio.wait_for(ask(engine, "a", image_id=image), 10)).outputs[0].text == "A"
        # another request in progress (still uploading, say): the batch waits for it and takes it along
        async with engine.admit() as other:
            first = asyncio.create_task(ask(engine, "b", image_id=image))
            await asyncio.sleep(0.3)
            assert len(stub.calls) == 1 and not first.done()
            second = await engine.run(other, Job(prompts=["c"], config=GREEDY, image_id=image))
        assert (await first).outputs[0].text == "B" and second.outputs[0].text == "C"
        assert [prompts for prompts, _, _ in stub.calls] == [["a"], ["b", "c"]]
        await engine.close()

    run(main())


def test_vqa_rows_share_one_encode_and_batch(bundle):
    async def main():
        stub = StubBackend(lambda p: "ok")
        engine = make_engine(bundle, stub, max_batch_size=8)
        await engine.start()
        async with engine.admit() as ticket:
            result = await engine.run(ticket, Job(prompts=["q1", "q2", "q3"], config=GREEDY, image=scene_image()))
        assert len(result.outputs) == 3 and stub.calls[-1][0] == ["q1", "q2", "q3"]
        assert engine.metrics.encoded_images._value.get() == 1  # one image, encoded once
        assert result.timings.encode_ms > 0 and not result.timings.cached
        assert result.prompt_tokens == sum(5 + len(ids) for ids in bundle.tokenizer(["q1", "q2", "q3"]).input_ids)
        await engine.close()

    run(main())


def test_quality_rows_and_seeded_requests_batch_apart(bundle):
    async def main():
        gate = asyncio.Event()
        stub = StubBackend(gate=gate)
        engine = make_engine(bundle, stub, max_batch_size=8, max_wait_ms=20)
        await engine.start()
        image = cached(engine)
        seeded = GenerationConfig(max_new_tokens=4, strategy="sample", seed=1)
        first = asyncio.create_task(ask(engine, "block", image_id=image))
        await until(lambda: len(stub.calls) == 1)
        tasks = [asyncio.create_task(ask(engine, "cap", image_id=image, quality=2)),
                 asyncio.create_task(ask(engine, "vqa", image_id=image)),
                 asyncio.create_task(ask(engine, "s1", seeded, image_id=image)),
                 asyncio.create_task(ask(engine, "s2", seeded, image_id=image))]
        await until(lambda: len(engine._generator.items) == 4)
        gate.set()
        await asyncio.gather(first, *tasks)
        assert [(p, q) for p, q, _ in stub.calls[1:]] == [(["cap"], [2]), (["vqa"], None), (["s1"], None),
                                                           (["s2"], None)]
        await engine.close()

    run(main())


def test_overflow_is_503_with_retry_after_at_once(bundle):
    async def main():
        engine = make_engine(bundle, StubBackend(), queue_size=2, retry_after_s=3)
        await engine.start()
        a, b = engine.admit(), engine.admit()
        with pytest.raises(Overloaded) as exc:
            engine.admit()
        assert exc.value.status == 503 and exc.value.code == "overloaded"
        assert exc.value.headers["Retry-After"] == "3"
        a.release()
        a.release()  # idempotent
        engine.admit().release()
        b.release()
        assert engine.in_flight == 0
        assert engine.metrics.rejected.labels("overloaded")._value.get() == 1
        await engine.close()

    run(main())


def test_deadline_is_504_and_frees_the_slot(bundle):
    async def main():
        gate = asyncio.Event()
        stub = StubBackend(gate=gate)
        engine = make_engine(bundle, stub, timeout_s=0.2)
        await engine.start()
        image = cached(engine)
        blocker = asyncio.create_task(ask(engine, "slow", image_id=image))
        await until(lambda: len(stub.calls) == 1)
        with pytest.raises(DeadlineExceeded) as exc:  # queued behind the blocker until its deadline
            await ask(engine, "late", image_id=image)
        assert exc.value.status == 504
        assert not engine._generator.items  # dropped: it never reaches the model
        with pytest.raises(DeadlineExceeded):
            await blocker  # running when the deadline passed: abandoned too
        assert engine.in_flight == 0
        gate.set()
        await until(lambda: engine._generator.slots._value == 1)
        assert [p for p, _, _ in stub.calls] == [["slow"]]
        await engine.close()

    run(main())


def test_cancellation_frees_the_slot_and_drops_an_unstarted_batch(bundle):
    async def main():
        gate = asyncio.Event()
        stub = StubBackend(gate=gate)
        engine = make_engine(bundle, stub, queue_size=2)
        await engine.start()
        image = cached(engine)
        running = asyncio.create_task(ask(engine, "running", image_id=image))
        await until(lambda: len(stub.calls) == 1)
        queued = asyncio.create_task(ask(engine, "queued", image_id=image))
        await until(lambda: len(engine._generator.items) == 1)
        assert engine.in_flight == 2
        with pytest.raises(Overloaded):
            engine.admit()
        queued.cancel()  # what a client disconnect does
        await asyncio.gather(queued, return_exceptions=True)
        assert engine.in_flight == 1 and not engine._generator.items
        engine.admit().release()  # the slot is free again
        gate.set()
        await running
        assert [p for p, _, _ in stub.calls] == [["running"]]  # "queued" was never computed
        assert engine.metrics.rejected.labels("cancelled")._value.get() == 1
        await engine.close()

    run(main())


def test_drain_refuses_new_work_and_waits_for_in_flight(bundle):
    async def main():
        gate = asyncio.Event()
        stub = StubBackend(gate=gate)
        engine = make_engine(bundle, stub)
        await engine.start()
        assert engine.ready
        image = cached(engine)
        running = asyncio.create_task(ask(engine, "in flight", image_id=image))
        await until(lambda: len(stub.calls) == 1)
        assert await engine.drain(0.05) is False  # still running after the grace period
        assert not engine.ready
        with pytest.raises(Overloaded) as exc:
            engine.admit()
        assert exc.value.code == "shutting_down"
        drained = asyncio.create_task(engine.drain(5))
        await asyncio.sleep(0.05)
        assert not drained.done()
        gate.set()
        assert (await running).outputs[0].text == "a red circle"  # in-flight work finishes
        assert await drained is True
        await engine.close()
        assert stub.closed

    run(main())


def test_close_fails_queued_work_with_503(bundle):
    async def main():
        gate = asyncio.Event()
        engine = make_engine(bundle, StubBackend(gate=gate), max_batch_size=1)
        await engine.start()
        image = cached(engine)
        tasks = [asyncio.create_task(ask(engine, f"p{i}", image_id=image)) for i in range(3)]
        await until(lambda: len(engine._generator.items) == 2)
        await engine.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, Overloaded) and r.code == "shutting_down" for r in results)

    run(main())


@pytest.mark.parametrize("error, expected, status, code", [
    (ValueError("beam search is not supported"), BadRequest, 400, "unsupported_generation_settings"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), Overloaded, 503, "out_of_memory"),
    (RuntimeError("a bug at 0x7f00"), InternalError, 500, "internal_error"),
])
def test_backend_errors_map_to_fixed_service_errors(bundle, error, expected, status, code):
    async def main():
        engine = make_engine(bundle, StubBackend(error=error))
        await engine.start()
        with pytest.raises(expected) as exc:
            await ask(engine, "x", image_id=cached(engine))
        assert exc.value.status == status and exc.value.code == code
        assert "0x7f" not in exc.value.message and "CUDA" not in exc.value.message
        assert engine.in_flight == 0
        await ask_ok(engine)
        await engine.close()

    async def ask_ok(engine):
        engine.backend.error = None
        assert (await ask(engine, "y", image_id=cached(engine))).outputs[0].text

    run(main())


def test_warmup_and_not_ready_before_start(bundle):
    async def main():
        stub = StubBackend()
        engine = make_engine(bundle, stub, warmup=True)
        with pytest.raises(Overloaded) as exc:
            engine.admit()
        assert exc.value.code == "not_ready"
        await engine.start()
        assert engine.ready and len(stub.calls) == 1  # the warm-up request
        await engine.close()

    run(main())


def test_torch_backend_batch_equals_single_rows(bundle):
    """Two different images batched together give each the caption it gets alone."""

    async def main():
        engine = make_engine(bundle, max_batch_size=4, max_wait_ms=50)
        await engine.start()
        images = [scene_image(seed=1), scene_image(seed=2)]
        alone = [(await ask(engine, "caption:", image=im)).outputs[0].text for im in images]
        together = await asyncio.gather(*(ask(engine, "caption:", image=im) for im in images))
        assert [r.outputs[0].text for r in together] == alone
        assert engine.metrics.batch_size.labels("generate")._sum.get() >= 4  # the pair ran as one batch
        await engine.close()

    run(main())


def test_questions_about_a_cached_image_start_from_its_kept_prefix(bundle):
    """The [quality][queries] positions of a cached image are prefilled once per quality and kept with it;
    every answer equals the one the same question gets with the image uploaded."""

    async def main():
        engine = make_engine(bundle, max_batch_size=4)
        await engine.start()
        image = scene_image(seed=3)
        asks = [("question: what colour is the circle? answer:", None), ("question: how many? answer:", None),
                ("caption:", 2), ("caption:", None)]
        uploaded = [(await ask(engine, p, image=image, quality=q)).outputs[0] for p, q in asks]
        async with engine.admit() as ticket:
            entry = await engine.encode_image(ticket, image, image.size)
        decoder = engine._generator.decoder
        computed = []
        plain = decoder.prefill_prefix
        decoder.prefill_prefix = lambda embeds: computed.append(embeds.shape[0]) or plain(embeds)
        before = engine.cache.nbytes
        for (p, q), want in zip(asks, uploaded):
            got = (await ask(engine, p, image_id=entry.image_id, quality=q)).outputs[0]
            assert got.token_ids == want.token_ids and got.text == want.text
        assert computed == [engine.prefix_length(None), engine.prefix_length(2)]  # once per quality
        assert set(entry.prefixes) == {(None, None), (2, None)}
        kept = sum(p.nbytes for p in entry.prefixes.values())
        assert kept > 0 and engine.cache.nbytes == entry.nbytes == before + kept
        await engine.close()

    run(main())


def test_bytes_an_entry_keeps_later_count_and_evict_older_entries():
    from qformer.generation import Prefix

    cache = ImageCache(max_bytes=3 * 960, ttl_s=60, metrics=Metrics())
    q = torch.zeros(5, 48)
    ids = [cache.put(q, 10, 10).image_id for _ in range(3)]
    entry = cache.get(ids[2])
    entry.prefixes["k"] = Prefix((torch.zeros(2, 5, 12),), (torch.zeros(2, 5, 12),))  # 960 bytes
    cache.account(entry)
    assert entry.nbytes == 1920 and cache.nbytes == 2880 and len(cache) == 2  # the oldest entry went
    assert cache.get(ids[0]) is None and cache.get(ids[1]) is not None


def test_image_cache_is_a_byte_bounded_lru_with_ttl():
    now = [1000.0]
    metrics = Metrics()
    cache = ImageCache(max_bytes=3 * 5 * 48 * 4, ttl_s=60, metrics=metrics, clock=lambda: now[0])
    q = torch.zeros(5, 48)
    ids = [cache.put(q, 10, 10).image_id for _ in range(3)]
    assert len(cache) == 3 and cache.nbytes == 3 * 960
    assert cache.get(ids[0]) is not None  # now the most recently used
    new = cache.put(q, 10, 10).image_id
    assert cache.get(ids[1]) is None  # the least recently used went
    assert all(cache.get(i) is not None for i in (ids[0], ids[2], new))
    now[0] += 61
    assert cache.get(new) is None and len(cache) == 2  # expired entries are evicted on access
    assert cache.delete(ids[0]) and not cache.delete(ids[0])
    assert metrics.cache_misses._value.get() == 2 and metrics.cache_evictions._value.get() == 2
    with pytest.raises(BadRequest):
        ImageCache(max_bytes=10, ttl_s=60, metrics=metrics).put(q, 10, 10)


# --- continuous batching (the torch backend's decoder) -----------------------------------------------

LONG = GenerationConfig(max_new_tokens=40)
SHORT = GenerationConfig(max_new_tokens=3)


class StepGate:
    """Wraps the engine decoder's `step` (model thread): records the running rows of every step and holds
    step `hold_at` (counted from now) until `go` is set, so a test can act while a request is mid-decode."""

    def __init__(self, engine, hold_at: int):
        decoder = engine._generator.decoder
        self.rows: list[int] = []
        self.held, self.go = threading.Event(), threading.Event()
        plain = decoder.step

        def step():
            self.rows.append(len(decoder.running))
            if len(self.rows) == hold_at:
                self.held.set()
                assert self.go.wait(10)
            return plain()

        decoder.step = step


def test_a_short_request_joins_a_running_long_one_and_leaves_first(bundle):
    async def main():
        engine = make_engine(bundle, max_batch_size=4)
        await engine.start()
        image = cached(engine)
        long_alone = await ask(engine, "tell me everything:", LONG, image_id=image)
        short_alone = await ask(engine, "caption:", SHORT, image_id=image)
        assert len(long_alone.outputs[0].token_ids) == 40  # it decodes all 40 steps (no early EOS)
        gate = StepGate(engine, hold_at=3)
        long = asyncio.create_task(ask(engine, "tell me everything:", LONG, image_id=image))
        await until(gate.held.is_set)
        short = asyncio.create_task(ask(engine, "caption:", SHORT, image_id=image))
        await until(lambda: len(engine._generator.items) == 1)
        gate.go.set()
        short_result = await short
        assert not long.done()  # the short one left while the long one still ran
        long_result = await long
        assert short_result.outputs[0].token_ids == short_alone.outputs[0].token_ids
        assert long_result.outputs[0].token_ids == long_alone.outputs[0].token_ids
        assert 2 in gate.rows and gate.rows[:3] == [1, 1, 1]  # joined at a token boundary, decoded together
        assert engine._generator.decoder.running == [] and engine.in_flight == 0
        await engine.close()

    run(main())


def test_cancelling_a_running_request_takes_its_row_out(bundle):
    async def main():
        engine = make_engine(bundle, max_batch_size=2)
        await engine.start()
        image = cached(engine)
        gate = StepGate(engine, hold_at=2)
        task = asyncio.create_task(ask(engine, "tell me everything:", LONG, image_id=image))
        await until(gate.held.is_set)
        task.cancel()  # what a client disconnect does
        await asyncio.gather(task, return_exceptions=True)
        assert engine.in_flight == 0
        gate.go.set()
        await until(lambda: not engine._generator.active and not engine._generator.decoder.running)
        assert len(gate.rows) < 5  # left at the next token boundary, not after 40 steps
        assert engine.metrics.rejected.labels("cancelled")._value.get() == 1
        assert (await ask(engine, "caption:", SHORT, image_id=image)).outputs[0].token_ids
        await engine.close()

    run(main())


def test_a_running_request_past_its_deadline_is_504_and_leaves_the_batch(bundle):
    async def main():
        engine = make_engine(bundle, max_batch_size=2, timeout_s=0.3)
        await engine.start()
        image = cached(engine)
        gate = StepGate(engine, hold_at=2)
        with pytest.raises(DeadlineExceeded):  # the model thread is held past the deadline
            await ask(engine, "tell me everything:", LONG, image_id=image)
        assert engine.in_flight == 0
        gate.go.set()
        await until(lambda: not engine._generator.active and not engine._generator.decoder.running)
        assert len(gate.rows) < 5
        await engine.close()

    run(main())


def test_more_rows_than_the_batch_and_beam_search_still_answer(bundle):
    """Three VQA rows through a batch of two (the third joins when a row is free) give the rows decoded
    alone; beam search, which the decoder does not run, goes to the backend's whole-batch path."""

    async def main():
        from qformer.generation import decode_from_queries

        engine = make_engine(bundle, max_batch_size=2)
        await engine.start()
        image = cached(engine)
        prompts = ["q1", "what colour?", "how many shapes are there?"]
        async with engine.admit() as ticket:
            got = await engine.run(ticket, Job(prompts=prompts, config=GREEDY, image_id=image))
        queries = engine.cache.get(image).queries
        want = decode_from_queries(bundle.bridge, bundle.tokenizer, queries.expand(3, -1, -1), prompts, None, GREEDY)
        assert [g.token_ids for g in got.outputs] == [w.token_ids for w in want]
        beam = await ask(engine, "caption:", BEAM, image_id=image)
        assert beam.outputs[0].token_ids
        assert engine.metrics.batch_size.labels("generate_alone")._sum.get() == 1
        await engine.close()

    run(main())


def test_a_failed_step_fails_the_running_requests_and_the_next_get_a_fresh_decoder(bundle):
    async def main():
        engine = make_engine(bundle, max_batch_size=2)
        await engine.start()
        image = cached(engine)
        broken = engine._generator.decoder

        def step():
            raise RuntimeError("a bug at 0x7f00")

        broken.step = step
        with pytest.raises(InternalError) as exc:
            await ask(engine, "caption:", SHORT, image_id=image)
        assert exc.value.status == 500 and "0x7f" not in exc.value.message
        assert engine._generator.decoder is not broken and not engine._generator.active
        assert engine.in_flight == 0
        assert len((await ask(engine, "caption:", SHORT, image_id=image)).outputs[0].token_ids) == 3
        await engine.close()

    run(main())
