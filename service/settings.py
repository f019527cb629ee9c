"""Service settings: one frozen dataclass; every field is a `qbridge serve` option and a `QBRIDGE_*` variable.

    QBRIDGE_MAX_BATCH_SIZE=16 qbridge serve --model qformer/demo/bundle --port 8000
    Settings.from_env()                       # environment over defaults
    Settings.from_env(port=9000)              # keyword overrides over both

The CLI (`service.cli`) builds its parser from these fields, so an option without a variable (or the
reverse) cannot exist. Lists (`api_keys`, `url_allowlist`) are comma-separated in the environment and
repeatable on the command line (`--api-key K1 --api-key K2`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from qformer import DEMO_BUNDLE
from service.images import ImageLimits

ENV_PREFIX = "QBRIDGE_"
MiB = 1024 * 1024


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    # --- model and backend
    model: str = _opt(str(DEMO_BUNDLE), "bundle directory, or a hub id of a transformers BLIP-2 checkpoint "
                                        "(default: the embedded demo model)")
    model_name: str = _opt("", "name the API reports and accepts as `model` (default: derived from --model)")
    backend: str = _opt("torch", "generation backend", choices=("torch", "vllm"))
    device: str = _opt("cpu", "device for the bridge (and the torch backend)", choices=("cpu", "cuda"))
    dtype: str = _opt("", "weights dtype: float32, float16 or bfloat16 (default: as stored)")
    torch_threads: int = _opt(0, "torch intra-op threads (0: on CPU every core this process may use; on CUDA "
                                 "torch's default)")
    cache_dir: str = _opt("", "where hub checkpoints are converted to bundles (default: ~/.cache/qbridge)")
    warmup: bool = _opt(True, "run one tiny request before reporting ready")
    # --- server
    host: str = _opt("127.0.0.1", "bind address (0.0.0.0 only when you mean it)")
    port: int = _opt(8000, "bind port")
    log_level: str = _opt("info", "uvicorn log level")
    docs: bool = _opt(True, "serve /docs and /openapi.json")
    max_header_bytes: int = _opt(64 * 1024, "largest request head (request line + headers); larger gets 431")
    limit_concurrency: int = _opt(0, "uvicorn's cap on open connections, beyond it 503 (0: none)")
    # --- engine: admission, batching, deadlines, draining
    max_batch_size: int = _opt(8, "rows per encode / generate batch")
    max_wait_ms: float = _opt(5.0, "how long a batch waits for company after its first request (not at all "
                                   "when no other request is in progress)")
    queue_size: int = _opt(64, "requests admitted at once (waiting + running); beyond it 503 + Retry-After")
    timeout_s: float = _opt(30.0, "per-request deadline, queueing included; past it 504")
    grace_s: float = _opt(30.0, "on SIGTERM, how long in-flight requests may take to finish")
    drain_delay_s: float = _opt(0.0, "on SIGTERM, how long to keep answering (ready=503) before closing the port")
    retry_after_s: int = _opt(1, "Retry-After seconds sent with 503")
    image_cache_mb: float = _opt(256.0, "bytes of encoded images kept for image_id requests (LRU)")
    image_cache_ttl_s: float = _opt(3600.0, "lifetime of an uploaded image")
    # --- auth and remote images
    api_keys: tuple[str, ...] = _opt(
        (), "API key accepted as 'Authorization: Bearer KEY' (repeatable)", flag="--api-key"
    )
    url_allowlist: tuple[str, ...] = _opt(
        (), "host whose http(s) image URLs chat requests may use (repeatable; none: URLs refused)",
        flag="--allow-url-host",
    )
    url_fetch_timeout_s: float = _opt(5.0, "timeout for fetching an allowlisted image URL")
    # --- request limits (service/BAD_INPUTS.md)
    max_body_bytes: int = _opt(16 * MiB, "largest request body; larger gets 413 while streaming")
    max_image_bytes: int = _opt(10 * MiB, "largest image after base64 decoding")
    max_pixels: int = _opt(40_000_000, "largest image in pixels, checked from the header before decoding")
    max_images: int = _opt(4, "images per request")
    max_questions: int = _opt(16, "questions per VQA request")
    max_question_chars: int = _opt(2000, "characters per question")
    # --- vLLM backend
    vllm_max_model_len: int = _opt(0, "vLLM max_model_len, prompt embeddings + new tokens (0: the LLM's context)")
    vllm_gpu_memory_utilization: float = _opt(
        0.5, "vLLM gpu_memory_utilization (CUDA only; the bridge's own copy of the LLM needs room beside it)"
    )

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "queue_size", "timeout_s", "max_body_bytes", "max_image_bytes", "max_pixels",
                    "max_images", "max_questions", "max_question_chars", "max_header_bytes", "url_fetch_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_wait_ms", "grace_s", "drain_delay_s", "image_cache_mb", "image_cache_ttl_s",
                     "torch_threads", "limit_concurrency", "retry_after_s", "vllm_max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.dtype not in ("", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    # --- derived values
    @property
    def image_cache_bytes(self) -> int:
        return int(self.image_cache_mb * MiB)

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(
            max_body_bytes=self.max_body_bytes,
            max_image_bytes=self.max_image_bytes,
            max_pixels=self.max_pixels,
            max_images=self.max_images,
            max_questions=self.max_questions,
            max_question_chars=self.max_question_chars,
        )

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        values = env_values(os.environ if env is None else env)
        values.update(overrides)
        return cls(**values)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def parse_value(f: dataclasses.Field, raw: str) -> Any:
    """A field's value from its environment text (bool: 1/0, true/false, yes/no, on/off; lists: commas)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env_name(f.name)} must be true or false, got {raw!r}")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(Settings):
        name = env_name(f.name)
        if name in env:
            try:
                out[f.name] = parse_value(f, env[name])
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    return out


def default_torch_threads(device: str) -> int:
    """Intra-op threads when `torch_threads` is 0: on CPU every core this process may use (its affinity: torch's
    own default counts the machine's cores, which a container may not have), 0 (torch's default) elsewhere.
    Leaving one core to the event loop was the default until 2026-12-07: at 2 cores, 1 thread against 2 (5
    paired runs of `service.bench` at 1 and 16 clients) gave the same 1-client p50 (median ratio 0.99) and
    0.87x the captions/s at 16 clients."""
    if device != "cpu":
        return 0
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
