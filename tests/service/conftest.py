"""Fixtures for the service tests: a tiny random bundle, in-process apps, a stub backend and a real server.

    .venv/bin/python -m pytest tests/test_service*.py tests/service -q -p no:cacheprovider

The bundle is built in code (tests/tiny.py), once per session. `live_server` is a real `qbridge serve`
process on a free port, shared by the end-to-end and bad-input tests (it needs an API key: `auth`).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from qformer.generation import Generated

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# --- images ----------------------------------------------------------------------------------------


def scene_image(size=(48, 36), seed: int = 0) -> Image.Image:
    from tests.tiny import scene

    return scene(seed, size)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def png() -> bytes:
    return encode(scene_image())


# --- the tiny bundle -------------------------------------------------------------------------------


def qformer_tokenizer():
    """The Q-Former's text tokenizer of the tiny bundles: right padding, as training saves it (the [CLS]
    feature sits at position 0)."""
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """The tiny bundle every service test serves; it can align (text branch + qformer_tokenizer)."""
    from qformer.bundle import save_bundle
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(num_loc_bins=32, num_quality_levels=3)
    return save_bundle(bridge, tok, proc, tmp_path_factory.mktemp("bundles") / "tiny",
                       qformer_tokenizer=qformer_tokenizer())


@pytest.fixture(scope="session")
def bundle(bundle_dir):
    from qformer.bundle import load_bundle

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return load_bundle(bundle_dir)


# --- a backend whose answers the test decides --------------------------------------------------------


class StubBackend:
    """Answers every prompt with `text_for(prompt)`, split into location tokens and text pieces.

    `gate` (an asyncio.Event) holds every batch until set; `delay` sleeps; `error` is raised instead.
    `calls` records (prompts, quality, config) per batch.
    """

    name = "stub"
    uses_model_thread = False
    max_concurrent_batches = 1

    def __init__(self, text_for=None, *, delay: float = 0.0, gate=None, error: BaseException | None = None):
        self.text_for = text_for or (lambda prompt: "a red circle")
        self.delay = delay
        self.gate = gate
        self.error = error
        self.calls: list[tuple[list[str], list[int] | None, object]] = []
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def generate(self, query_embeds, prompts, quality, config):
        assert query_embeds.shape[0] == len(prompts)
        self.calls.append((list(prompts), quality, config))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [self._one(p) for p in prompts]

    def _one(self, prompt: str) -> Generated:
        text = self.text_for(prompt)
        tokens = re.findall(r"<loc_\d+>|[^<]+", text)
        return Generated(text=text.strip(), token_ids=list(range(len(tokens))), logprobs=[-0.1] * len(tokens),
                         finish_reason="stop", tokens=tokens)

    async def close(self) -> None:
        self.closed = True


def make_engine(bundle, backend=None, **config):
    from service.backends.torch_backend import TorchBackend
    from service.engine import Engine, EngineConfig

    config.setdefault("warmup", False)
    backend = backend or TorchBackend(bundle.bridge, bundle.tokenizer)
    return Engine(bundle, backend, EngineConfig(**config), model_name="tiny")


def make_app(bundle, backend=None, engine_config: dict | None = None, **settings):
    """An app over an engine built in code; use it as `with TestClient(app) as client:` (starts the engine)."""
    from service.app import build_app
    from service.settings import Settings

    engine = make_engine(bundle, backend, **(engine_config or {}))
    return build_app(Settings(model="unused", **settings), engine=engine)


# --- a real server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    port: int
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(bundle_dir: Path, log: Path, *extra: str, env: dict | None = None, timeout: float = 90) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "qformer.cli", "serve", "--model", str(bundle_dir), "--port", str(port),
           "--torch-threads", "2", "--log-level", "warning", *extra]
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log_text()[-3000:]}")


def stop_server(server: Server, timeout: float = 30) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def live_server(bundle_dir, tmp_path_factory):
    server = start_server(bundle_dir, tmp_path_factory.mktemp("logs") / "server.log", "--api-key", API_KEY,
                          "--queue-size", "32")
    yield server
    stop_server(server)


@pytest.fixture()
def http(live_server):
    with httpx.Client(base_url=live_server.url, headers=AUTH, timeout=60) as client:
        yield client


def assert_envelope(resp, status: int, code: str | None = None, *, sent: bytes | str | None = None) -> dict:
    """A non-2xx reply in the error envelope, with a fixed message that leaks nothing."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    text = resp.text
    for leak in ("Traceback", "0x7f", "/home/", "/tmp/", ".py", "object at", "Error:"):
        assert leak not in text, (leak, text)
    if sent is not None:
        probe = sent if isinstance(sent, str) else sent.decode("latin-1")
        probe = probe[:40]
        if len(probe) >= 12:
            assert probe not in text, "the reply echoes the input"
    return err
