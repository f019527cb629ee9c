"""Every endpoint's happy path and response schema, in process (FastAPI TestClient, tiny random bundle).

    .venv/bin/python -m pytest tests/service/test_service_api.py -q
"""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import StubBackend, assert_envelope, encode, make_app, scene_image
from service import protocol


@pytest.fixture(scope="module")
def client(bundle):
    with TestClient(make_app(bundle)) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_and_models(client):
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ready"}
    models = protocol.ModelList.model_validate(client.get("/v1/models").json())
    card = models.data[0]
    assert card.id == "tiny"
    assert [q.name for q in card.qbridge.quality_levels] == ["q0", "q1", "q2"]
    assert card.qbridge.default_quality == 2 and card.qbridge.detection and card.qbridge.num_loc_bins == 32


def test_caption_multipart_and_json(client, png):
    r = client.post("/v1/caption", files={"file": ("x.png", png, "image/png")},
                    data={"max_new_tokens": "4", "quality": "q1"})
    out = protocol.CaptionResponse.model_validate(r.json())
    assert out.quality.level == 1 and out.quality.name == "q1"
    assert out.usage.completion_tokens <= 4 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == "tiny" and not out.timings.cached and out.timings.encode_ms > 0
    r2 = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 4, "quality": 1})
    assert r2.json()["caption"] == out.caption  # greedy: the same input gives the same caption
    r3 = client.post("/v1/caption", json={"image": "data:image/png;base64," + b64(png), "max_new_tokens": 4})
    assert r3.json()["quality"] == {"level": 2, "name": "q2"}  # default: the highest level


def test_caption_strategies(client, png):
    for extra in ({"num_beams": 2}, {"strategy": "sample", "temperature": 0.7, "top_p": 0.9, "seed": 3},
                  {"strategy": "greedy"}):
        r = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 3, **extra})
        assert r.status_code == 200, r.text
    a = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 5, "temperature": 1.5, "seed": 7})
    b = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 5, "temperature": 1.5, "seed": 7})
    assert a.json()["caption"] == b.json()["caption"]  # a seed makes sampling reproducible


def test_vqa_one_and_many(client, png):
    r = client.post("/v1/vqa", files={"file": ("x.png", png)},
                    data={"questions": ["what colour?", "how many?"], "max_new_tokens": "3"})
    out = protocol.VQAResponse.model_validate(r.json())
    assert [a.question for a in out.answers] == ["what colour?", "how many?"]
    r1 = client.post("/v1/vqa", json={"image": b64(png), "question": "  what colour?  ", "max_new_tokens": 3})
    one = protocol.VQAResponse.model_validate(r1.json())
    assert one.answers[0].question == "what colour?"
    assert one.answers[0].answer == out.answers[0].answer  # batched with another question: same answer


def test_detect_shape(client, png):
    r = client.post("/v1/detect", json={"image": b64(png), "max_new_tokens": 6})
    out = protocol.DetectResponse.model_validate(r.json())
    assert out.image.width == 48 and out.image.height == 36
    assert "<loc_" in out.sequence  # the tiny random model writes location tokens


def test_image_cache_skips_encoder(client, png):
    metrics = client.app.state.qbridge.metrics
    encoded = metrics.encoded_images._value.get()
    up = protocol.ImageInfo.model_validate(client.post("/v1/images", json={"image": b64(png)}).json())
    assert (up.width, up.height) == (48, 36) and up.expires_at > up.created_at
    assert metrics.encoded_images._value.get() == encoded + 1
    hits = metrics.cache_hits._value.get()
    direct = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 4}).json()
    cached = client.post("/v1/caption", json={"image_id": up.image_id, "max_new_tokens": 4}).json()
    assert cached["caption"] == direct["caption"]
    assert cached["timings"]["cached"] and cached["timings"]["encode_ms"] == 0
    det = client.post("/v1/detect", data={"image_id": up.image_id, "max_new_tokens": "4"}).json()
    assert det["image"] == {"width": 48, "height": 36}
    assert metrics.cache_hits._value.get() == hits + 2
    assert metrics.encoded_images._value.get() == encoded + 2  # only the direct request encoded
    assert client.get(f"/v1/images/{up.image_id}").json()["image_id"] == up.image_id
    assert client.delete(f"/v1/images/{up.image_id}").json() == {"image_id": up.image_id, "deleted": True}
    assert_envelope(client.delete(f"/v1/images/{up.image_id}"), 404, "image_not_found")
    assert_envelope(client.post("/v1/caption", json={"image_id": up.image_id}), 404, "image_not_found")


def test_image_upload_multipart(client, png):
    r = client.post("/v1/images", files={"file": ("a.png", png)})
    assert r.status_code == 200 and r.json()["image_id"].startswith("img_")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


def test_chat_completion_vqa_and_caption(client, png):
    msg = [{"role": "system", "content": "be brief"},
           {"role": "user", "content": [{"type": "text", "text": "What colour is the circle?"},
                                        {"type": "image_url", "image_url": {"url": data_url(png)}}]}]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msg, "max_tokens": 3})
    out = protocol.ChatCompletionResponse.model_validate(r.json())
    assert out.choices[0].message.role == "assistant" and out.model == "tiny"
    vqa = client.post("/v1/vqa", json={"image": b64(png), "question": "What colour is the circle?",
                                       "max_new_tokens": 3}).json()
    assert out.choices[0].message.content == vqa["answers"][0]["answer"]
    cap = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                        {"type": "text", "text": "Describe this image."}]}]
    r = client.post("/v1/chat/completions", json={"messages": cap, "max_completion_tokens": 4})
    caption = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 4}).json()["caption"]
    assert r.json()["choices"][0]["message"]["content"] == caption


def test_chat_stream(client, png):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}]}]
    with client.stream("POST", "/v1/chat/completions", json={"messages": msg, "max_tokens": 4, "stream": True,
                                                               "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    caption = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 4}).json()["caption"]
    assert text == caption


def test_chat_unknown_model_and_no_image(client, png):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}]}]
    assert_envelope(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": msg}), 404,
                    "model_not_found")
    assert_envelope(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}),
                    400, "missing_image")
    assert_envelope(client.post("/v1/chat/completions", json={"messages": msg, "n": 2}), 422, "validation_error")


def test_chat_task_mapping():
    from service.chat import task_for

    for text in ("", "   ", "describe", "Describe this image.", "caption", "Caption the photo in detail"):
        assert task_for(text) == ("caption", ""), text
    for text in ("What colour is the circle?", "how many shapes", "is there a square"):
        assert task_for(text) == ("vqa", " ".join(text.split()))


def test_metrics_exposition(client, png):
    client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 2})
    text = client.get("/metrics").text
    assert 'qbridge_requests_total{endpoint="/v1/caption",method="POST",status="200"}' in text
    for name in ("qbridge_request_duration_seconds_bucket", "qbridge_queue_depth", "qbridge_batch_size_bucket",
                 "qbridge_image_cache_hits_total", "qbridge_image_cache_misses_total", "qbridge_pending_items"):
        assert name in text, name


def test_playground_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external CDNs
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "CaptionRequestForm" in spec["components"]["schemas"]
    assert spec["components"]["schemas"]["CaptionRequestForm"]["properties"]["file"]["format"] == "binary"


def test_detect_boxes_in_original_pixels_after_exif(bundle):
    """Boxes come back in the displayed (EXIF-rotated) frame of the full-size original."""
    seq = "red circle<loc_8><loc_0><loc_16><loc_16>; blue square<loc_0><loc_16><loc_31><loc_31>"
    stub = StubBackend(lambda prompt: seq if prompt.startswith("detect") else "x")
    img = scene_image((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed: 40 x 60
    jpeg = encode(img, "JPEG", exif=exif)
    with TestClient(make_app(bundle, stub)) as client:
        out = client.post("/v1/detect", files={"file": ("x.jpg", jpeg)}).json()
        assert out["image"] == {"width": 40, "height": 60}
        red, blue = sorted(out["detections"], key=lambda d: d["label"], reverse=True)
        assert red["label"] == "red circle"
        # bin centres: (8.5/32 * 40, 0.5/32 * 60, 16.5/32 * 40, 16.5/32 * 60)
        assert red["box"] == pytest.approx([10.625, 0.9375, 20.625, 30.9375], abs=0.01)
        assert red["box_normalized"] == pytest.approx([8.5 / 32, 0.5 / 32, 16.5 / 32, 16.5 / 32])
        assert blue["box"] == pytest.approx([0.625, 30.9375, 39.375, 59.0625], abs=0.01)
        assert red["score"] == pytest.approx(0.9048, abs=1e-3)  # exp(-0.1): one label token
        filtered = client.post("/v1/detect", files={"file": ("x.jpg", jpeg)},
                               data={"labels": ["Blue  Square"], "max_objects": "5"}).json()
        assert [d["label"] for d in filtered["detections"]] == ["blue square"]
        assert stub.calls[-1][0] == ["detect Blue Square:"]
        assert client.post("/v1/detect", files={"file": ("x.jpg", jpeg)},
                           data={"score_threshold": "0.95"}).json()["detections"] == []
        assert len(client.post("/v1/detect", files={"file": ("x.jpg", jpeg)},
                               data={"max_objects": "1"}).json()["detections"]) == 1


def test_every_task_route_asks_the_bundles_own_prompts(tmp_path):
    """Captions, VQA, detection and chat write the prompts of the served bundle's qbridge.json."""
    from qformer.bundle import load_bundle, save_bundle
    from qformer.prompts import TaskPrompts
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(num_loc_bins=32)
    bridge.cfg = bridge.cfg.replace(prompts=TaskPrompts(caption="", vqa="Q: {question} A:", detect="boxes:",
                                                        detect_labels="find {labels}:"))
    own = load_bundle(save_bundle(bridge, tok, proc, tmp_path / "own"))
    image = b64(encode(scene_image()))

    def chat(text):
        url = {"url": "data:image/png;base64," + image}
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                          {"type": "image_url", "image_url": url}]}]}

    stub = StubBackend()
    with TestClient(make_app(own, stub)) as client:
        for path, body in [("/v1/caption", {"image": image}),
                           ("/v1/vqa", {"image": image, "question": "what  colour?"}),
                           ("/v1/detect", {"image": image}),
                           ("/v1/detect", {"image": image, "labels": ["red circle"]}),
                           ("/v1/chat/completions", chat("Describe this image.")),
                           ("/v1/chat/completions", chat("how many shapes?"))]:
            assert client.post(path, json=body).status_code == 200, (path, body)
    assert [prompts for prompts, _, _ in stub.calls] == [
        [""], ["Q: what colour? A:"], ["boxes:"], ["find red circle:"], [""], ["Q: how many shapes? A:"]]


def test_detect_without_location_tokens_is_400(tmp_path):
    from qformer.bundle import load_bundle, save_bundle
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(num_loc_bins=0, num_quality_levels=0)
    plain = load_bundle(save_bundle(bridge, tok, proc, tmp_path / "plain"))
    with TestClient(make_app(plain, StubBackend())) as client:
        err = assert_envelope(client.post("/v1/detect", json={"image": b64(encode(scene_image()))}), 400,
                              "detection_not_supported")
        assert "location tokens" in err["message"]
        assert client.get("/v1/models").json()["data"][0]["qbridge"]["detection"] is False
        assert_envelope(client.post("/v1/caption", json={"image": b64(encode(scene_image())), "quality": 1}), 422)
        r = client.post("/v1/caption", json={"image": b64(encode(scene_image()))})
        assert r.status_code == 200 and r.json()["quality"] is None


def test_loading_app_reports_not_ready(tmp_path):
    """build_app without an engine loads in the background: live at once, ready only when loaded."""
    from service.app import build_app
    from service.settings import Settings

    app = build_app(Settings(model=str(tmp_path / "missing")))
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        for _ in range(100):
            if app.state.qbridge.load_failed:
                break
            import time

            time.sleep(0.05)
        assert_envelope(client.get("/health/ready"), 503, "model_unavailable")
        assert_envelope(client.post("/v1/caption", json={"image": "x"}), 503, "model_unavailable")
