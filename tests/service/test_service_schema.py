"""Schemathesis over /openapi.json against the in-process app: no 5xx, and every answer matches the schema.

The engine's backend is a stub (the checks are about the HTTP layer; generation speed is not), the vision
encoder is the tiny random one. A bounded number of examples per operation keeps the run under a minute.
    .venv/bin/python -m pytest tests/service/test_service_schema.py -q
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from conftest import StubBackend, make_app, qformer_tokenizer  # noqa: E402


def _app():
    """Built at import: schemathesis parametrizes at collection time, before fixtures exist."""
    import tempfile

    from qformer.bundle import load_bundle, save_bundle
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(num_loc_bins=32, num_quality_levels=3)
    # With a qformer_tokenizer: /v1/classify, /v1/match and /v1/embeddings answer 200s whose shape is checked.
    bundle = load_bundle(save_bundle(bridge, tok, proc, tempfile.mkdtemp(prefix="qbridge-schema-") + "/tiny",
                                     qformer_tokenizer=qformer_tokenizer()))
    return make_app(bundle, StubBackend(), max_body_bytes=1024 * 1024)


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
ALIGNMENT_OPERATIONS = {("POST", "/v1/classify"), ("POST", "/v1/match"), ("POST", "/v1/embeddings")}


def test_the_schema_lists_the_alignment_operations():
    """What `schema.parametrize()` enumerates includes the alignment endpoints, with their bodies documented."""
    found = {(op.method.upper(), op.path) for op in (result.ok() for result in schema.get_all_operations())}
    assert ALIGNMENT_OPERATIONS <= found, found
    raw = schema.raw_schema
    for name in ("ClassifyRequest", "ClassifyRequestForm", "MatchRequest", "MatchRequestForm", "EmbeddingRequest",
                 "ClassifyResponse", "MatchResponse", "EmbeddingResponse"):
        assert name in raw["components"]["schemas"], name
    assert "multipart/form-data" not in raw["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    # Valid-by-schema data may still be refused with 400 (random bytes are not an image, a question may be
    # only whitespace), so "positive data is accepted" does not hold by design; every other check does.
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, response.text
