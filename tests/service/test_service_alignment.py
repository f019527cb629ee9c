"""/v1/classify, /v1/match and /v1/embeddings: the Q-Former's own heads (qformer.alignment) served, no LLM.

Answers equal the library on the same image computed in-process; equal requests batch in the engine's
`align` stage; deadlines and cancellation apply there as elsewhere; service/BAD_INPUTS.md rows 23-27; the
official `openai` client and the `qbridge classify` / `qbridge match` commands against a real server.
    .venv/bin/python -m pytest tests/service/test_service_alignment.py -q
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import (
    API_KEY,
    ROOT,
    StubBackend,
    assert_envelope,
    encode,
    make_app,
    make_engine,
    qformer_tokenizer,
    scene_image,
)
from qformer import alignment
from service import protocol
from service.engine import AlignJob, EmbedJob
from service.errors import DeadlineExceeded

TOL = 1e-4
LABELS = ["red circle", "blue square", "green triangle", "star"]
TEMPLATES = ["a photo of a {}.", "there is a {} here", "a drawing of the {}"]
TEXTS = ["a red circle and a blue square", "three small green triangles", "a large yellow star"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny bundle that can align, whose scores differ clearly between images, labels and texts: a CLIP
    tower (the tiny BLIP-2 one's features are ~1e-9, the same for every image) and a Q-Former re-initialised
    at unit scale (BERT's 0.02 makes every text's [CLS] feature the same). Else equality checks prove little."""
    from qformer.bundle import load_bundle, save_bundle
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(vision_kind="clip", num_loc_bins=32, num_quality_levels=3)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in bridge.qformer.named_parameters():
            if p.dim() == 2 and name.endswith("weight"):
                p.normal_(0, p.shape[1] ** -0.5)
        bridge.qformer.embeddings.word_embeddings.weight.normal_(0, 1)
        bridge.qformer.temp.fill_(0.02)
    out = tmp_path_factory.mktemp("aligned") / "tiny"
    return load_bundle(save_bundle(bridge, tok, proc, out, qformer_tokenizer=qformer_tokenizer()))


@pytest.fixture(scope="module")
def client(aligned):
    with TestClient(make_app(aligned)) as c:  # the torch backend: align batches share its model thread
        yield c


@pytest.fixture(scope="module")
def pngs():
    return [encode(scene_image(seed=s)) for s in (0, 1, 2)]


def features(bundle, *seeds: int) -> torch.Tensor:
    """(B, N, Dv) frozen vision features of the scenes, computed in-process."""
    pixels = bundle.image_processor(images=[scene_image(seed=s) for s in seeds], return_tensors="pt").pixel_values
    return bundle.bridge.encode_images(pixels)


def probabilities(body: dict) -> dict[str, float]:
    return {item["label"]: item["probability"] for item in body["labels"]}


def assert_ranked(body: dict) -> None:
    probs = [item["probability"] for item in body["labels"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)


# --- answers equal the library --------------------------------------------------------------------------


def test_classify_equals_the_library_with_one_template_and_with_several(client, aligned, pngs):
    want = alignment.classify(aligned.bridge, aligned.qformer_tokenizer, features(aligned, 0), LABELS)[0]
    assert want.max() - want.min() > 0.05  # scores differ: the comparison below can fail
    r = client.post("/v1/classify", json={"image": b64(pngs[0]), "labels": LABELS})
    out = protocol.ClassifyResponse.model_validate(r.json())
    assert out.templates == list(alignment.DEFAULT_TEMPLATES) and out.model == "tiny"
    assert not out.timings.cached and out.timings.encode_ms > 0 and out.timings.align_ms > 0
    assert_ranked(r.json())
    got = probabilities(r.json())
    assert set(got) == set(LABELS)
    for label, p in zip(LABELS, want.tolist()):
        assert got[label] == pytest.approx(p, abs=TOL), label

    ensembled = alignment.classify(aligned.bridge, aligned.qformer_tokenizer, features(aligned, 0), LABELS,
                                   TEMPLATES)[0]
    assert (ensembled - want).abs().max() > 10 * TOL  # the templates matter
    r = client.post("/v1/classify", files={"file": ("x.png", pngs[0], "image/png")},
                    data={"labels": LABELS, "templates": TEMPLATES})  # multipart: list fields repeat
    assert r.status_code == 200, r.text
    assert r.json()["templates"] == TEMPLATES
    assert_ranked(r.json())
    got = probabilities(r.json())
    for label, p in zip(LABELS, ensembled.tolist()):
        assert got[label] == pytest.approx(p, abs=TOL), label

    best = alignment.classify(aligned.bridge, aligned.qformer_tokenizer, features(aligned, 0), LABELS, TEMPLATES,
                              ensemble="max")[0]
    assert (best - ensembled).abs().max() > 10 * TOL  # the two ensembles differ
    r = client.post("/v1/classify", json={"image": b64(pngs[0]), "labels": LABELS, "templates": TEMPLATES,
                                          "ensemble": "max"})
    assert r.status_code == 200, r.text
    assert r.json()["ensemble"] == "max"
    got = probabilities(r.json())
    for label, p in zip(LABELS, best.tolist()):
        assert got[label] == pytest.approx(p, abs=TOL), label


def test_match_equals_the_library_in_request_order(client, aligned, pngs):
    want = alignment.match(aligned.bridge, aligned.qformer_tokenizer, features(aligned, 1), TEXTS)
    itm, itc = want["itm"][0].tolist(), want["itc"][0].tolist()
    assert max(itm) - min(itm) > 0.05 and max(itc) - min(itc) > 10 * TOL
    for kwargs in ({"json": {"image": data_url(pngs[1]), "texts": TEXTS}},
                   {"files": {"image": ("x.png", pngs[1], "image/png")}, "data": {"texts": TEXTS}}):
        r = client.post("/v1/match", **kwargs)
        out = protocol.MatchResponse.model_validate(r.json())
        assert [m.text for m in out.matches] == TEXTS
        for m, p, s in zip(out.matches, itm, itc):
            assert m.itm_probability == pytest.approx(p, abs=TOL) and m.itc_similarity == pytest.approx(s, abs=TOL)


def test_embeddings_of_texts_and_images_equal_the_library(client, aligned, pngs):
    inputs = [TEXTS[0], data_url(pngs[2]), TEXTS[1], data_url(pngs[0])]
    r = client.post("/v1/embeddings", json={"model": "tiny", "input": inputs, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list" and body["model"] == "tiny"
    out = protocol.EmbeddingResponse.model_validate(body)
    assert [d.index for d in out.data] == [0, 1, 2, 3] and all(d.object == "embedding" for d in out.data)
    got = torch.tensor([d.embedding for d in out.data])
    texts = alignment.text_embeddings(aligned.bridge, aligned.qformer_tokenizer, [TEXTS[0], TEXTS[1]])
    images = alignment.image_embeddings(aligned.bridge, features(aligned, 2, 0))
    torch.testing.assert_close(got, torch.stack([texts[0], images[0], texts[1], images[1]]), atol=TOL, rtol=0)
    assert got.shape[1] == aligned.bridge.cfg.qformer.embed_dim
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    ids = aligned.qformer_tokenizer([TEXTS[0], TEXTS[1]]).input_ids
    queries = aligned.bridge.cfg.qformer.num_query_tokens
    assert out.usage.prompt_tokens == out.usage.total_tokens == len(ids[0]) + len(ids[1]) + 2 * queries

    one = client.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    (item,) = one["data"]
    import numpy as np

    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(vector.copy()), texts[0], atol=TOL, rtol=0)


def test_image_id_answers_every_alignment_endpoint_without_the_encoder(client, aligned, pngs):
    metrics = client.app.state.qbridge.metrics
    up = client.post("/v1/images", json={"image": b64(pngs[0])}).json()
    entry = client.app.state.qbridge.engine.cache.get(up["image_id"])
    assert entry.features is not None and entry.features.shape == features(aligned, 0)[0].shape
    assert entry.nbytes == sum(t.element_size() * t.nelement() for t in (entry.queries, entry.features))
    encoded = metrics.encoded_images._value.get()
    direct = client.post("/v1/classify", json={"image": b64(pngs[0]), "labels": LABELS}).json()
    cached = client.post("/v1/classify", data={"image_id": up["image_id"], "labels": LABELS}).json()
    assert cached["timings"]["cached"] and cached["timings"]["encode_ms"] == 0
    assert probabilities(cached) == pytest.approx(probabilities(direct), abs=TOL)
    want = alignment.match(aligned.bridge, aligned.qformer_tokenizer, features(aligned, 0), TEXTS)
    matched = client.post("/v1/match", json={"image_id": up["image_id"], "texts": TEXTS}).json()
    assert [m["itm_probability"] for m in matched["matches"]] == pytest.approx(want["itm"][0].tolist(), abs=TOL)
    emb = client.post("/v1/embeddings", json={"input": [up["image_id"], "a red circle"]}).json()
    image = alignment.image_embeddings(aligned.bridge, features(aligned, 0))[0]
    torch.testing.assert_close(torch.tensor(emb["data"][0]["embedding"]), image, atol=TOL, rtol=0)
    assert metrics.encoded_images._value.get() == encoded + 1  # only the direct request encoded
    # The generating endpoints read the same cache entry as before.
    assert client.post("/v1/caption", json={"image_id": up["image_id"], "max_new_tokens": 3}).status_code == 200
    det = client.post("/v1/detect", json={"image_id": up["image_id"], "max_new_tokens": 4}).json()
    assert det["image"] == {"width": 48, "height": 36}


def test_models_reports_the_alignment_capability(client, aligned):
    caps = protocol.ModelList.model_validate(client.get("/v1/models").json()).data[0].qbridge
    assert caps.alignment is True and caps.embedding_dim == aligned.bridge.cfg.qformer.embed_dim
    assert caps.limits["max_labels"] == protocol.MAX_LABELS


def test_alignment_and_generation_share_the_model_thread(client, pngs):
    """Classify and caption requests in flight together (torch backend, continuous decoding) all answer."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        caps = [pool.submit(client.post, "/v1/caption", json={"image": b64(pngs[0]), "max_new_tokens": 12})
                for _ in range(2)]
        cls = [pool.submit(client.post, "/v1/classify", json={"image": b64(pngs[1]), "labels": LABELS})
               for _ in range(2)]
        assert [f.result().status_code for f in caps + cls] == [200] * 4
    # Equal up to float rounding: the two may or may not have shared a batch (a batch sums in another order).
    first, second = probabilities(cls[0].result().json()), probabilities(cls[1].result().json())
    assert first.keys() == second.keys() and all(abs(first[k] - second[k]) <= 1e-5 for k in first)


# --- batching, deadlines, cancellation, drain (the engine) --------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def uploaded(engine, *seeds: int) -> list[str]:
    ids = []
    for s in seeds:
        async with engine.admit() as ticket:
            ids.append((await engine.encode_image(ticket, scene_image(seed=s), (48, 36))).image_id)
    return ids


async def job(engine, j):
    async with engine.admit() as ticket:
        return await engine.run(ticket, j)


def recorder(engine) -> list[tuple]:
    """Records (kind, texts, items) for every align batch the engine runs."""
    calls = []
    plain = engine._align_sync

    def spy(kind, texts, templates, ensemble, payloads):
        calls.append((kind, texts, len(payloads)))
        return plain(kind, texts, templates, ensemble, payloads)

    engine._align_sync = spy
    return calls


def test_equal_alignment_requests_batch_into_one_forward(aligned):
    async def main():
        engine = make_engine(aligned, StubBackend(), max_batch_size=8, max_wait_ms=20)
        await engine.start()
        a, b, c = await uploaded(engine, 0, 1, 2)
        alone = [await job(engine, AlignJob("classify", tuple(LABELS), image_id=i)) for i in (a, b, c)]
        calls = recorder(engine)
        await engine._aligner.slots.acquire()  # the model thread is busy: requests queue up
        jobs = [AlignJob("classify", tuple(LABELS), image_id=i) for i in (a, b, c)]
        jobs += [AlignJob("classify", ("cat", "dog"), image_id=a),
                 AlignJob("match", tuple(TEXTS[:2]), image_id=a), AlignJob("match", tuple(TEXTS[:2]), image_id=b),
                 AlignJob("classify", tuple(LABELS), ensemble="max", image_id=b)]
        embeds = [EmbedJob([("text", t)]) for t in TEXTS]
        tasks = [asyncio.create_task(job(engine, j)) for j in jobs + embeds]
        await until(lambda: len(engine._aligner.items) == len(tasks))
        before = engine.metrics.batch_size.labels("align")._sum.get()
        engine._aligner.slots.release()
        results = await asyncio.gather(*tasks)
        assert sorted(calls) == sorted([("classify", tuple(LABELS), 3), ("classify", ("cat", "dog"), 1),
                                        ("classify", tuple(LABELS), 1),  # another ensemble: its own batch
                                        ("match", tuple(TEXTS[:2]), 2), ("embed_text", (), 3)])
        # rows: 1 per classify image, one per (image, text) pair of a match, one per embedded text
        assert engine.metrics.batch_size.labels("align")._sum.get() - before == 3 + 1 + 1 + 2 * 2 + 3
        for got, want in zip(results[:3], alone):  # batched together, each image gets what it got alone
            assert got.scores["probability"] == pytest.approx(want.scores["probability"], abs=1e-5)
        assert alone[0].scores["probability"] != pytest.approx(alone[1].scores["probability"], abs=1e-3)
        pairs = alignment.match(aligned.bridge, aligned.qformer_tokenizer, features(aligned, 0, 1), TEXTS[:2])
        for got, i in zip(results[4:6], (0, 1)):
            assert got.scores["itm"] == pytest.approx(pairs["itm"][i].tolist(), abs=1e-5)
            assert got.scores["itc"] == pytest.approx(pairs["itc"][i].tolist(), abs=1e-5)
        texts = alignment.text_embeddings(aligned.bridge, aligned.qformer_tokenizer, TEXTS)
        torch.testing.assert_close(torch.cat([r.vectors for r in results[-3:]]), texts, atol=1e-5, rtol=0)
        await engine.close()

    run(main())


def test_an_alignment_request_past_its_deadline_is_504_and_never_computed(aligned):
    async def main():
        engine = make_engine(aligned, StubBackend(), timeout_s=0.2)
        await engine.start()
        (image,) = await uploaded(engine, 0)
        calls = recorder(engine)
        await engine._aligner.slots.acquire()
        with pytest.raises(DeadlineExceeded) as exc:
            await job(engine, AlignJob("match", ("a circle",), image_id=image))
        assert exc.value.status == 504 and not engine._aligner.items and engine.in_flight == 0
        engine._aligner.slots.release()
        await asyncio.sleep(0.05)
        assert calls == []
        await engine.close()

    run(main())


def test_a_cancelled_alignment_request_frees_its_slot_and_is_dropped(aligned):
    async def main():
        engine = make_engine(aligned, StubBackend())
        await engine.start()
        (image,) = await uploaded(engine, 0)
        calls = recorder(engine)
        await engine._aligner.slots.acquire()
        task = asyncio.create_task(job(engine, AlignJob("classify", ("circle", "square"), image_id=image)))
        await until(lambda: len(engine._aligner.items) == 1)
        task.cancel()  # what a client disconnect does
        await asyncio.gather(task, return_exceptions=True)
        assert engine.in_flight == 0 and not engine._aligner.items
        assert engine.metrics.rejected.labels("cancelled")._value.get() == 1
        engine._aligner.slots.release()
        got = await job(engine, EmbedJob([("text", "a circle"), ("image_id", image)]))
        assert got.vectors.shape == (2, aligned.bridge.cfg.qformer.embed_dim)
        assert [kind for kind, _, _ in calls] in (["embed_text", "embed_image"], ["embed_image", "embed_text"])
        await engine.close()

    run(main())


def test_draining_and_a_full_queue_refuse_alignment_requests_with_503(aligned, pngs):
    app = make_app(aligned, StubBackend(), engine_config={"queue_size": 1})
    with TestClient(app) as client:
        engine = app.state.qbridge.engine
        ticket = engine.admit()  # the only slot
        body = {"image": b64(pngs[0]), "labels": LABELS}
        r = client.post("/v1/classify", json=body)
        assert_envelope(r, 503, "overloaded")
        assert "Retry-After" in r.headers
        ticket.release()
        assert client.post("/v1/classify", json=body).status_code == 200
        engine.begin_drain()
        for path, payload in [("/v1/classify", body), ("/v1/match", {"image": b64(pngs[0]), "texts": TEXTS}),
                              ("/v1/embeddings", {"input": "a circle"})]:
            assert_envelope(client.post(path, json=payload), 503, "shutting_down")


# --- bad input: service/BAD_INPUTS.md rows 23-27 -------------------------------------------------------


def still_healthy(client, pngs) -> None:
    assert client.get("/health/ready").status_code == 200
    assert client.post("/v1/classify", json={"image": b64(pngs[0]), "labels": LABELS}).status_code == 200


def test_row23_a_bundle_that_cannot_align_is_400_with_the_reason(aligned, pngs, tmp_path):
    from qformer.bundle import Bundle, load_bundle, save_bundle
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(num_loc_bins=0, with_text=False)
    no_text = load_bundle(save_bundle(bridge, tok, proc, tmp_path / "no-text", qformer_tokenizer=qformer_tokenizer()))
    no_tokenizer = Bundle(aligned.bridge, aligned.tokenizer, aligned.image_processor, aligned.path, None)
    image = b64(pngs[0])
    requests = [("/v1/classify", {"json": {"image": image, "labels": LABELS}}),
                ("/v1/classify", {"files": {"file": ("x.png", pngs[0])}, "data": {"labels": LABELS}}),
                ("/v1/match", {"json": {"image": image, "texts": TEXTS}}),
                ("/v1/embeddings", {"json": {"input": ["a circle"]}}),
                ("/v1/embeddings", {"json": {"input": "a circle", "dimensions": 3}})]
    for bundle, why in [(no_text, "no text branch"), (no_tokenizer, "qformer_tokenizer")]:
        with TestClient(make_app(bundle, StubBackend())) as client:
            for path, kwargs in requests:
                err = assert_envelope(client.post(path, **kwargs), 400, "alignment_not_supported")
                assert why in err["message"] and err["param"] is None, (path, err)
            caps = client.get("/v1/models").json()["data"][0]["qbridge"]
            assert caps["alignment"] is False and caps["embedding_dim"] is None
            assert client.post("/v1/caption", json={"image": image, "max_new_tokens": 2}).status_code == 200
            up = client.post("/v1/images", json={"image": image}).json()
            entry = client.app.state.qbridge.engine.cache.get(up["image_id"])
            assert entry.features is None  # nothing kept that nothing reads


def test_row24_labels_and_texts_counts_lengths_and_blanks(client, pngs):
    image = b64(pngs[0])
    for labels, param in [(None, "labels"), ([], "labels"), (["x"] * 65, "labels"), (["ok", "y" * 201], "labels.1")]:
        body = {"image": image} if labels is None else {"image": image, "labels": labels}
        err = assert_envelope(client.post("/v1/classify", json=body), 422, "validation_error")
        assert err["param"] == param, err
    err = assert_envelope(client.post("/v1/classify", files={"file": ("x.png", pngs[0])}), 422)  # form without labels
    assert err["param"] == "labels"
    for labels, code, param in [(["circle", " \t "], "empty_label", "labels.1"),
                                (["circle", "sq\x00uare"], "invalid_text", "labels.1"),
                                (["red  circle", "square", "red circle"], "duplicate_label", "labels.2")]:
        err = assert_envelope(client.post("/v1/classify", json={"image": image, "labels": labels}), 400, code)
        assert err["param"] == param, err
    for texts, param in [(None, "texts"), ([], "texts"), (["t"] * 33, "texts"), (["z" * 2001], "texts.0")]:
        body = {"image": image} if texts is None else {"image": image, "texts": texts}
        err = assert_envelope(client.post("/v1/match", json=body), 422, "validation_error")
        assert err["param"] == param, err
    err = assert_envelope(client.post("/v1/match", json={"image": image, "texts": ["a circle", "\n"]}), 400,
                          "empty_text")
    assert err["param"] == "texts.1"
    assert_envelope(client.post("/v1/match", json={"image": image, "texts": "a circle"}), 422)  # not a list
    still_healthy(client, pngs)


@pytest.mark.parametrize("template", ["a photo", "{} and {}", "a {x} of a {}", "a {0} photo", "{} }", "a {{}} b"])
def test_row25_a_template_needs_exactly_one_pair_of_braces(client, pngs, template):
    body = {"image": b64(pngs[0]), "labels": LABELS, "templates": ["a photo of a {}.", template]}
    err = assert_envelope(client.post("/v1/classify", json=body), 400, "invalid_template")
    assert err["param"] == "templates.1" and "{}" in err["message"]
    still_healthy(client, pngs)


@pytest.mark.parametrize("ensemble", ["median", "", "MAX", 1])
def test_row25_an_unknown_ensemble_is_a_4xx(client, pngs, ensemble):
    body = {"image": b64(pngs[0]), "labels": LABELS, "templates": TEMPLATES, "ensemble": ensemble}
    err = assert_envelope(client.post("/v1/classify", json=body), 422)
    assert "ensemble" in json.dumps(err)
    still_healthy(client, pngs)


def test_row25_template_counts_and_lengths_are_schema_bounds(client, pngs):
    image = b64(pngs[0])
    for templates, param in [([], "templates"), (["{}"] * 17, "templates"), (["{}" + "x" * 199], "templates.0")]:
        err = assert_envelope(client.post("/v1/classify", json={"image": image, "labels": LABELS,
                                                                "templates": templates}), 422)
        assert err["param"] == param, err
    still_healthy(client, pngs)


def test_row26_image_problems_on_the_alignment_endpoints(client, pngs):
    for path, extra in [("/v1/classify", {"labels": LABELS}), ("/v1/match", {"texts": TEXTS})]:
        assert_envelope(client.post(path, json=extra), 400, "missing_image")
        err = assert_envelope(client.post(path, json={**extra, "image_id": "img_abcdefghijkl"}), 404,
                              "image_not_found")
        assert err["param"] == "image_id"
        assert_envelope(client.post(path, json={**extra, "image_id": "../etc/passwd"}), 422)
        assert_envelope(client.post(path, json={**extra, "image": "!!not base64!!"}), 400, "invalid_base64")
        junk = bytes(range(256)) * 4
        assert_envelope(client.post(path, files={"file": ("x.png", junk)}, data=extra), 400, "invalid_image")
        assert_envelope(client.post(path, json={**extra, "image": b64(pngs[0]), "image_id": "img_abcdefghijkl"}),
                        400, "multiple_image_sources")
        assert_envelope(client.post(path, content=b"x", headers={"Content-Type": "text/plain"}), 415)
    still_healthy(client, pngs)


def test_row27_bad_embeddings_inputs(client, pngs):
    good = data_url(pngs[0])
    cases = [
        ({}, 422, "validation_error", "input"),
        ({"input": []}, 422, "validation_error", "input"),
        ({"input": ["x"] * 65}, 422, "validation_error", "input"),
        ({"input": [1, 2, 3]}, 422, "validation_error", "input.0"),  # token arrays are not accepted
        ({"input": {"text": "x"}}, 422, "validation_error", "input"),
        ({"input": 5}, 422, "validation_error", "input"),
        ({"input": None}, 422, "validation_error", "input"),
        ({"input": ""}, 400, "empty_input", "input"),
        ({"input": ["ok", ""]}, 400, "empty_input", "input.1"),
        ({"input": ["ok", "w" * 2001]}, 400, "text_too_long", "input.1"),
        ({"input": ["a\x00b"]}, 400, "invalid_text", "input.0"),
        ({"input": ["data:text/plain;base64,aGVsbG8="]}, 400, "invalid_base64", "input.0"),
        ({"input": ["ok", "data:image/png;base64," + b64(bytes(range(256)))]}, 400, "invalid_image", "input.1"),
        ({"input": ["img_abcdefghijkl"]}, 404, "image_not_found", "input.0"),
        ({"input": [good] * 5}, 400, "too_many_images", "input"),
        ({"input": "x", "dimensions": 7}, 400, "unsupported_dimensions", "dimensions"),
        ({"input": "x", "model": "other"}, 404, "model_not_found", "model"),
        ({"input": "x", "encoding_format": "int8"}, 422, "validation_error", "encoding_format"),
        ({"input": "x", "unknown_field_42": 1}, 422, "validation_error", None),
    ]
    for body, status, code, param in cases:
        err = assert_envelope(client.post("/v1/embeddings", json=body), status, code)
        if param is not None:
            assert err["param"] == param, (body.keys(), err)
    assert_envelope(client.post("/v1/embeddings", files={"file": ("x.png", pngs[0])}), 415, "unsupported_media_type")
    assert_envelope(client.post("/v1/embeddings", content=b"{nope", headers={"Content-Type": "application/json"}),
                    422)
    ok = client.post("/v1/embeddings", json={"input": ["data: not a URL, just text", good],
                                             "dimensions": client.app.state.qbridge.engine.embed_dim})
    assert ok.status_code == 200, ok.text  # text that starts with 'data:' stays text
    still_healthy(client, pngs)


# --- a real server: the openai client and the client commands ----------------------------------------


def test_openai_client_embeddings(live_server, bundle, png):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    texts = ["a red circle", "two blue squares and a star"]
    want_texts = alignment.text_embeddings(bundle.bridge, bundle.qformer_tokenizer, texts)
    pixels = bundle.image_processor(images=[scene_image()], return_tensors="pt").pixel_values
    want_image = alignment.image_embeddings(bundle.bridge, bundle.bridge.encode_images(pixels))[0]
    done = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 by default
    assert [d.index for d in done.data] == [0, 1] and done.model == "tiny" and done.object == "list"
    torch.testing.assert_close(torch.tensor([d.embedding for d in done.data]), want_texts, atol=TOL, rtol=0)
    assert done.usage.prompt_tokens == done.usage.total_tokens > 0
    floats = client.embeddings.create(model="tiny", input=texts[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), want_texts[0], atol=TOL, rtol=0)
    image_id = client.post("/images", cast_to=dict, body={"image": b64(png)})["image_id"]
    mixed = client.embeddings.create(model="tiny", input=[data_url(png), texts[1], image_id])
    got = torch.tensor([d.embedding for d in mixed.data])
    torch.testing.assert_close(got, torch.stack([want_image, want_texts[1], want_image]), atol=TOL, rtol=0)
    with pytest.raises(NotFoundError):
        client.embeddings.create(model="not-served", input="x")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qformer.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_client_commands_classify_and_match(live_server, tmp_path, png):
    image = tmp_path / "scene.png"
    image.write_bytes(png)
    key = ("--api-key", API_KEY, "--url", live_server.url)
    out = run_cli("classify", str(image), "--labels", "circle", "red square", "star", *key)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert sorted(label for label, _ in rows) == ["circle", "red square", "star"]
    probs = [float(p) for _, p in rows]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
    out = run_cli("classify", str(image), "--labels", "circle", "star", "--template", "a {}", "--template",
                  "the {} here", "--json", *key)
    assert out.returncode == 0 and '"templates"' in out.stdout and "the {} here" in out.stdout, out.stderr
    out = run_cli("classify", str(image), "--labels", "circle", "star", "--template", "a {}", "--template",
                  "the {} here", "--ensemble", "max", "--json", *key)
    assert out.returncode == 0 and '"ensemble": "max"' in out.stdout.replace('":"', '": "'), out.stderr
    out = run_cli("match", str(image), "--text", "a red circle", "-t", "a star", *key)
    assert out.returncode == 0, out.stderr
    assert [line.split("\t")[2] for line in out.stdout.strip().splitlines()] == ["a red circle", "a star"]
    bad = run_cli("classify", str(image), "--labels", "circle", "--template", "no braces", *key)
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "{}" in bad.stderr
    denied = run_cli("match", str(image), "--text", "x", "--url", live_server.url)
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr
    for command in ("classify", "match"):
        helped = run_cli(command, "--help")
        assert helped.returncode == 0 and "--url" in helped.stdout and "Q-Former" in helped.stdout
