"""End to end over real HTTP: a `qbridge serve` process (uvicorn) on a free port, spoken to with httpx,
the official `openai` client and the `qbridge` client commands; SIGTERM drains.

    .venv/bin/python -m pytest tests/service/test_service_e2e.py -q
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import subprocess
import sys
import time

import httpx
import pytest

from conftest import API_KEY, AUTH, ROOT, assert_envelope, free_port, start_server, stop_server
from service import protocol


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_every_endpoint_answers_well_formed(http, png):
    assert http.get("/health/live").json() == {"status": "ok"}
    assert http.get("/health/ready").json() == {"status": "ready"}
    models = protocol.ModelList.model_validate(http.get("/v1/models").json())
    assert models.data[0].id == "tiny"
    files = {"file": ("scene.png", png, "image/png")}
    cap = protocol.CaptionResponse.model_validate(
        http.post("/v1/caption", files=files, data={"max_new_tokens": "4", "quality": "0"}).json())
    assert cap.quality.level == 0 and cap.usage.completion_tokens <= 4
    vqa = protocol.VQAResponse.model_validate(
        http.post("/v1/vqa", json={"image": b64(png), "questions": ["what colour?", "how many?"],
                                   "max_new_tokens": 3}).json())
    assert len(vqa.answers) == 2
    det = protocol.DetectResponse.model_validate(
        http.post("/v1/detect", files=files, data={"max_new_tokens": "6"}).json())
    assert det.image.width == 48
    img = protocol.ImageInfo.model_validate(http.post("/v1/images", files=files).json())
    assert protocol.ImageInfo.model_validate(http.get(f"/v1/images/{img.image_id}").json()).width == 48
    assert http.delete(f"/v1/images/{img.image_id}").json()["deleted"] is True
    chat = protocol.ChatCompletionResponse.model_validate(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "how many shapes?"}, {
            "type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}}]}], "max_tokens": 3,
    }).json())
    assert chat.choices[0].finish_reason in ("stop", "length")
    text = http.get("/metrics").text
    assert 'qbridge_requests_total{endpoint="/v1/detect",method="POST",status="200"}' in text
    page = http.get("/")
    assert page.status_code == 200 and "qbridge playground" in page.text
    assert http.get("/docs").status_code == 200 and "/v1/caption" in http.get("/openapi.json").json()["paths"]
    assert http.get("/health/live").headers.get("x-request-id")


@pytest.fixture(scope="module")
def blip2_server(tmp_path_factory):
    """(model, checkpoint dir, server): `qbridge serve` on a tiny BLIP-2 (OPT LLM) that `qbridge convert` imported."""
    from qformer.hf_interop import convert
    from tests.tiny import save_tiny_blip2

    root = tmp_path_factory.mktemp("blip2")
    model, _ = save_tiny_blip2(root / "checkpoint", llm="opt")
    convert(str(root / "checkpoint"), root / "bundle")
    server = start_server(root / "bundle", root / "server.log", "--api-key", API_KEY)
    yield model, root / "checkpoint", server
    stop_server(server)


def test_a_converted_blip2_captions_and_answers_as_transformers(blip2_server, png):
    """Default requests (no prompt anywhere) give transformers' greedy output for BLIP-2's documented prompts."""
    from PIL import Image

    from service.routes import DEFAULT_MAX_NEW_TOKENS
    from tests.test_hf_parity import blip2_greedy, decoded

    model, checkpoint, server = blip2_server
    image = Image.open(io.BytesIO(png)).convert("RGB")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        cap = http.post("/v1/caption", files={"image": ("scene.png", png, "image/png")}).json()
        want = blip2_greedy(model, checkpoint, image, max_new_tokens=DEFAULT_MAX_NEW_TOKENS["caption"])
        assert cap["caption"] == decoded(checkpoint, want) and cap["usage"]["completion_tokens"] == len(want)
        assert len(want) >= 5  # real decoding, not an instant EOS
        questions = ["what colour is the circle?", "how  many shapes are there?"]
        vqa = http.post("/v1/vqa", json={"image": b64(png), "questions": questions}).json()
    for question, got in zip(questions, vqa["answers"]):
        want = blip2_greedy(model, checkpoint, image, " ".join(question.split()), DEFAULT_MAX_NEW_TOKENS["vqa"])
        assert got["answer"] == decoded(checkpoint, want) and want, question


def test_image_id_skips_the_vision_encoder(http, png):
    before = http.get("/metrics").text
    up = http.post("/v1/images", json={"image": b64(png)}).json()
    for _ in range(3):
        out = http.post("/v1/caption", json={"image_id": up["image_id"], "max_new_tokens": 3}).json()
        assert out["timings"]["cached"] is True and out["timings"]["encode_ms"] == 0
    after = http.get("/metrics").text
    assert metric(after, "qbridge_image_cache_hits_total") - metric(before, "qbridge_image_cache_hits_total") == 3
    assert metric(after, "qbridge_encoded_images_total") - metric(before, "qbridge_encoded_images_total") == 1
    http.delete(f"/v1/images/{up['image_id']}")
    assert_envelope(http.post("/v1/caption", json={"image_id": up["image_id"]}), 404, "image_not_found")
    assert metric(http.get("/metrics").text, "qbridge_image_cache_misses_total") >= 1


def test_openai_client_chat_with_an_image(live_server, png):
    from openai import OpenAI

    client = OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png), "detail": "low"}},
    ]}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    content = done.choices[0].message.content
    assert content and done.usage.completion_tokens <= 4 and done.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == content  # greedy: the stream says what the plain answer said
    assert finish in ("stop", "length") and usage.completion_tokens == done.usage.completion_tokens
    from openai import AuthenticationError, BadRequestError

    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "no image here"}])
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=live_server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_liveness_answers_during_a_long_generation(live_server, http, png):
    """The model runs on its own thread: the event loop answers /health/live all through a long generation."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        slow = pool.submit(http.post, "/v1/caption", json={"image": b64(png), "max_new_tokens": 256})
        latencies = []
        while not slow.done():
            t = time.perf_counter()
            assert httpx.get(live_server.url + "/health/live", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)
        assert slow.result().status_code == 200
        generation = time.perf_counter() - start
    # Bounds loose enough for a loaded 2-core CI machine (torch's threads compete with the loop for CPU),
    # tight enough to fail if the loop waited for the generation (256 tokens: seconds on 2 cores).
    assert len(latencies) >= 3, (latencies, generation)
    assert max(latencies) < min(1.0, generation / 3), (max(latencies), generation)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qformer.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_client_commands(live_server, tmp_path, png):
    image = tmp_path / "scene.png"
    image.write_bytes(png)
    key = ("--api-key", API_KEY)
    cap = run_cli("caption", str(image), "--url", live_server.url, "--max-new-tokens", "3", *key)
    assert cap.returncode == 0 and cap.stdout.strip(), cap.stderr
    ask = run_cli("ask", str(image), "--question", "what colour?", "--url", live_server.url, "--max-new-tokens", "3",
                  *key)
    assert ask.returncode == 0 and len(ask.stdout.strip().splitlines()) == 1, ask.stderr
    det = run_cli("detect", str(image), "--url", live_server.url, "--max-new-tokens", "4", *key)
    assert det.returncode == 0, det.stderr  # the random model finds no well-formed box: no lines
    denied = run_cli("ask", str(image), "-q", "x", "--url", live_server.url)
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr
    unknown = run_cli("ask", str(image), "--task", "largest-colour", "--url", live_server.url, *key)
    assert unknown.returncode == 1 and "HTTP 400: unknown task; this model's tasks: none" in unknown.stderr
    nothing = run_cli("ask", str(image), "--url", live_server.url, *key)
    assert nothing.returncode == 2 and "give --question (repeatable) or --task" in nothing.stderr
    denied = run_cli("caption", str(image), "--url", live_server.url)
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr


def test_bench_runs(live_server, tmp_path, png):
    image = tmp_path / "scene.png"
    image.write_bytes(png)
    out = subprocess.run([sys.executable, "-m", "service.bench", "--url", live_server.url, "--image", str(image),
                          "--requests", "4", "--concurrency", "1,2", "--max-new-tokens", "2", "--api-key", API_KEY,
                          "--endpoint", "vqa", "--cached"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for kind in ("server", "cached"):  # uploaded each time, then by image_id after one POST /v1/images
        rows = [line.split(", ")[-1].split() for line in lines if line.startswith(f"{kind} at") and "faster" not in line]
        assert [r[0] for r in rows] == ["1", "2"] and all(r[-1] == "0" for r in rows), kind  # no errors
    assert any(line.startswith("cached at") and "x faster" in line for line in lines)


def test_bench_measures_transformers_our_loop_and_a_server_in_one_run(bundle_dir):
    out = subprocess.run([sys.executable, "-m", "service.bench", "--model", str(bundle_dir), "--requests", "2",
                          "--concurrency", "1,2", "--max-new-tokens", "3", "--warmup", "1", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    table = [line for line in lines if line.startswith(("transformers", "our", "server")) and ":" not in line]
    names = [line.split("  ")[0] for line in table]
    assert names == ["transformers generate, batch 1", "our decode loop, batch 1",
                     "transformers generate, one batch of 2", "our decode loop, one batch of 2", "server torch, 1 client",
                     "server torch, 2 clients"]
    servers = [line.split() for line in table if line.startswith("server")]
    assert all(r[-1] == "0" and float(r[4]) > 0 for r in servers)  # no errors, captions/s measured
    assert any(line.startswith("server torch: 2 clients:") and "transformers batch 1" in line for line in lines)
    # one caption at a time through the three in turn; the one-client ratios come from those rounds
    paired = [line.split("  ")[0] for line in lines if line.startswith("paired with torch: ")]
    assert paired == ["paired with torch: transformers generate, batch 1", "paired with torch: our decode loop, batch 1",
                      "paired with torch: server torch, 1 client"]
    assert any(line.startswith("server torch: 1 client, paired over 2 rounds") and "server overhead" in line
               for line in lines)


def test_serve_refuses_a_missing_model_clearly(tmp_path):
    out = run_cli("serve", "--model", str(tmp_path / "nope"), "--port", "1")
    assert out.returncode == 2 and "not found" in out.stderr and "qbridge.json" in out.stderr
    out = run_cli("serve", "--help")
    assert out.returncode == 0 and "QBRIDGE_MAX_BATCH_SIZE" in out.stdout and "--api-key" in out.stdout


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "qbridge.json").write_text('{"format_version": 99}')
    out = run_cli("serve", "--model", str(broken), "--port", str(free_port()), "--log-level", "warning")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "model load failed" in out.stderr and "format 99 is not supported" in out.stderr


def test_sigterm_drains_then_exits(bundle_dir, tmp_path, png):
    server = start_server(bundle_dir, tmp_path / "drain.log", "--drain-delay-s", "1.5", "--grace-s", "30")
    try:
        url = server.url
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            # ~2 s of generation on 2 cores; the three share one batch
            inflight = [pool.submit(httpx.post, url + "/v1/caption",
                                    json={"image": b64(png), "max_new_tokens": 128}, timeout=60) for _ in range(3)]
            for _ in range(200):
                if metric(httpx.get(url + "/metrics").text, "qbridge_queue_depth") == 3:
                    break
                time.sleep(0.02)
            server.proc.send_signal(15)
            t0 = time.perf_counter()
            ready = httpx.get(url + "/health/ready")
            assert_envelope(ready, 503, "shutting_down")
            assert time.perf_counter() - t0 < 1.0
            assert httpx.get(url + "/health/live").status_code == 200  # alive while draining
            refused = httpx.post(url + "/v1/caption", json={"image": b64(png)})
            assert_envelope(refused, 503, "shutting_down")
            assert "Retry-After" in refused.headers
            assert [f.result().status_code for f in inflight] == [200, 200, 200]  # in-flight work finishes
        assert server.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health/live")
    finally:
        stop_server(server)
