"""Settings, environment variables, the `qbridge serve` parser and model resolution.

    .venv/bin/python -m pytest tests/service/test_service_settings.py -q
"""

from __future__ import annotations

import dataclasses

import pytest

from service.cli import serve_parser, settings_from_args
from service.loading import BackendUnavailable, ModelNotFound, create_backend, model_name, resolve_model
from service.settings import Settings, env_name


def test_every_field_is_an_option_and_an_env_var():
    parser = serve_parser()
    options = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(Settings):
        assert f.name in options, f.name
        assert env_name(f.name) in options[f.name].help, f.name
    assert "--api-key" in options["api_keys"].option_strings


def test_env_then_flags(monkeypatch):
    env = {"QBRIDGE_MAX_BATCH_SIZE": "3", "QBRIDGE_API_KEYS": "a, b,", "QBRIDGE_WARMUP": "off",
           "QBRIDGE_IMAGE_CACHE_MB": "1.5", "QBRIDGE_BACKEND": "vllm"}
    s = Settings.from_env(env)
    assert (s.max_batch_size, s.api_keys, s.warmup, s.backend) == (3, ("a", "b"), False, "vllm")
    assert s.image_cache_bytes == int(1.5 * 1024 * 1024)
    assert s.limits.max_questions == 16 and s.limits.max_body_bytes == 16 * 1024 * 1024
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = settings_from_args(["--max-batch-size", "5", "--api-key", "z", "--no-warmup", "--backend", "torch"])
    assert (s.max_batch_size, s.api_keys, s.warmup, s.backend) == (5, ("z",), False, "torch")
    s = settings_from_args([])
    assert s.api_keys == ("a", "b") and s.max_batch_size == 3


@pytest.mark.parametrize("bad", [{"queue_size": 0}, {"backend": "tpu"}, {"device": "mps"}, {"max_wait_ms": -1},
                                 {"dtype": "int8"}])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Settings(**bad)


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="QBRIDGE_PORT"):
        Settings.from_env({"QBRIDGE_PORT": "eighty"})
    with pytest.raises(ValueError, match="QBRIDGE_WARMUP"):
        Settings.from_env({"QBRIDGE_WARMUP": "maybe"})


def test_model_name_and_resolution(tmp_path, bundle_dir):
    assert model_name(Settings(model="qformer/demo/bundle")) == model_name(Settings()) == "demo"
    assert model_name(Settings(model="Salesforce/blip2-opt-2.7b")) == "Salesforce/blip2-opt-2.7b"
    assert model_name(Settings(model=str(bundle_dir))) == "tiny"
    assert model_name(Settings(model=str(bundle_dir), model_name="mine")) == "mine"
    assert resolve_model(str(bundle_dir)) == bundle_dir
    with pytest.raises(ModelNotFound, match="qbridge.json"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFound):
        resolve_model("not a hub id")


def test_vllm_backend_missing_is_a_clear_error(bundle, monkeypatch):
    import service.backends.vllm_backend as vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)  # as on a machine without vllm
    with pytest.raises(BackendUnavailable, match="pip install"):
        create_backend(Settings(backend="vllm"), bundle, None)


def test_uvicorn_limits_come_from_settings():
    from service.app import build_app
    from service.server import LimitedH11Protocol, uvicorn_config

    s = Settings(model="unused", max_header_bytes=32 * 1024, grace_s=7, port=1234)
    config = uvicorn_config(build_app(s), s)
    assert config.h11_max_incomplete_event_size == 32 * 1024
    assert config.http is LimitedH11Protocol and config.timeout_graceful_shutdown == 7 and config.port == 1234


def test_cpu_serving_uses_the_cores_its_process_may_use(monkeypatch):
    import os

    from service.settings import default_torch_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # a container's share
    assert default_torch_threads("cpu") == 3
    assert default_torch_threads("cuda") == 0  # torch's own default
