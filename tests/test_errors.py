"""The error envelope and the FastAPI handlers: every non-2xx is {"error": {...}}, with no echo or leak.

    .venv/bin/python -m pytest tests/test_errors.py -q
"""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from service import errors
from service.errors import (
    BadAspectRatio,
    BadRequest,
    DeadlineExceeded,
    ImageTooLarge,
    ImageTooSmall,
    InvalidBase64,
    InvalidImage,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    TooManyItems,
    Unauthorized,
    UnsupportedMediaType,
    UrlNotAllowed,
    envelope,
    error_response,
    install_error_handlers,
)

SECRET = "s3cr3t-/home/app/model.py-0x7f00deadbeef"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=0, le=8)
    name: str = Field(default="x", max_length=5)
    tags: list[str] = Field(default_factory=list, max_length=2)


def build_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom():
        raise RuntimeError(SECRET)

    @app.get("/too-large")
    def too_large():
        raise ImageTooLarge("image is 30000x30000 = 900.0 megapixels; the limit is 40 megapixels", param="image")

    @app.get("/auth")
    def auth():
        raise Unauthorized()

    @app.get("/busy")
    def busy():
        raise Overloaded(retry_after=3)

    @app.get("/slow")
    def slow():
        raise DeadlineExceeded()

    @app.get("/images/{image_id}")
    def image(image_id: str):
        raise NotFound("unknown image_id", param="image_id")

    @app.get("/http")
    def http():
        raise HTTPException(status_code=400, detail=SECRET)

    @app.post("/items")
    def items(item: Item):
        return {"ok": True}

    @app.middleware("http")
    async def reject_marked(request, call_next):
        if request.headers.get("x-too-big"):
            raise PayloadTooLarge("request body exceeds the limit of 16.0 MiB")
        return await call_next(request)

    return app


@pytest.fixture(scope="module")
def client():
    # raise_server_exceptions=False: Starlette re-raises after the 500 handler has answered.
    return TestClient(build_app(), raise_server_exceptions=False)


def body_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert SECRET not in response.text and "0x7f" not in response.text and "Traceback" not in response.text
    return body["error"]


# --- classes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (BadRequest, 400, "bad_request"),
        (InvalidImage, 400, "invalid_image"),
        (InvalidBase64, 400, "invalid_base64"),
        (ImageTooSmall, 400, "image_too_small"),
        (BadAspectRatio, 400, "bad_aspect_ratio"),
        (TooManyItems, 400, "too_many_items"),
        (UrlNotAllowed, 400, "url_not_allowed"),
        (Unauthorized, 401, "invalid_api_key"),
        (NotFound, 404, "not_found"),
        (PayloadTooLarge, 413, "payload_too_large"),
        (ImageTooLarge, 413, "image_too_large"),
        (UnsupportedMediaType, 415, "unsupported_image_format"),
        (Overloaded, 503, "overloaded"),
        (DeadlineExceeded, 504, "timeout"),
    ],
)
def test_class_table(cls, status, code):
    err = cls()
    assert isinstance(err, ServiceError)
    assert (err.status, err.code) == (status, code)
    assert err.message and err.message == str(err)
    assert envelope(err) == {"error": {"message": err.message, "type": err.type, "param": None, "code": code}}


def test_code_and_param_override():
    err = TooManyItems("request has 5 images; the limit is 4", param="images", code="too_many_images")
    assert envelope(err)["error"] == {
        "message": "request has 5 images; the limit is 4",
        "type": "invalid_request_error",
        "param": "images",
        "code": "too_many_images",
    }
    assert Overloaded(code="shutting_down").headers == {"Retry-After": "1"}
    assert Unauthorized().headers == {"WWW-Authenticate": "Bearer"}
    assert Unauthorized().type == "authentication_error"
    assert BadRequest().headers == {}


def test_error_response_for_middleware():
    response = error_response(Overloaded(retry_after=7))
    assert response.status_code == 503 and response.headers["retry-after"] == "7"


# --- handlers ---------------------------------------------------------------------------------------


def test_service_error(client):
    r = client.get("/too-large")
    assert r.status_code == 413
    assert body_of(r) == {
        "message": "image is 30000x30000 = 900.0 megapixels; the limit is 40 megapixels",
        "type": "invalid_request_error",
        "param": "image",
        "code": "image_too_large",
    }


def test_headers(client):
    r = client.get("/auth")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert body_of(r)["code"] == "invalid_api_key"
    r = client.get("/busy")
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert body_of(r)["type"] == "service_unavailable_error"
    r = client.get("/slow")
    assert r.status_code == 504 and body_of(r)["code"] == "timeout"
    r = client.get("/images/abc")
    assert r.status_code == 404 and body_of(r)["param"] == "image_id"


def test_unknown_route_and_wrong_method(client):
    r = client.get("/no/such/route/" + SECRET)
    assert r.status_code == 404
    assert body_of(r) == {"message": "not found", "type": "not_found_error", "param": None, "code": "not_found"}
    r = client.get("/items")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert body_of(r)["code"] == "method_not_allowed"


def test_http_exception_detail_is_not_echoed(client):
    r = client.get("/http")
    assert r.status_code == 400
    assert body_of(r)["message"] == "bad request"


@pytest.mark.parametrize(
    ("payload", "message", "param"),
    [
        ({"n": SECRET}, "invalid value for 'body.n': must be an integer", "body.n"),
        ({"n": 10**9}, "invalid value for 'body.n': must be <= 8", "body.n"),
        ({"n": -1}, "invalid value for 'body.n': must be >= 0", "body.n"),
        ({"n": 1, "name": SECRET}, "invalid value for 'body.name': must have at most 5 characters", "body.name"),
        ({"n": 1, "tags": [SECRET] * 3}, "invalid value for 'body.tags': must have at most 2 items", "body.tags"),
        ({"n": 1, "tags": [1]}, "invalid value for 'body.tags.0': must be a string", "body.tags.0"),
        ({}, "invalid value for 'body.n': field required", "body.n"),
        ({"n": 1, SECRET: 1}, "invalid value for 'body': unknown field", "body"),
        ({"n": 1, "zz_extra": 1}, "invalid value for 'body': unknown field", "body"),
        ({"n": SECRET, "name": SECRET}, "invalid value for 'body.n': must be an integer (and 1 more)", "body.n"),
        ([SECRET], "invalid value for 'body': must be an object", "body"),
    ],
)
def test_validation_422_names_the_field_not_the_value(client, payload, message, param):
    r = client.post("/items", json=payload)
    assert r.status_code == 422
    assert body_of(r) == {"message": message, "type": "invalid_request_error", "param": param, "code": "validation_error"}


def test_validation_of_malformed_and_huge_bodies(client):
    r = client.post("/items", content=b'{"n": ' + SECRET.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and body_of(r)["message"] == "request body is not valid JSON"
    big = {"n": 1, "tags": ["x" * 1000] * 1000}  # FastAPI's default 422 would echo all 1 MB back
    r = client.post("/items", json=big)
    assert r.status_code == 422 and len(r.content) < 500


def test_unexpected_exception_is_500_without_text(client, caplog):
    with caplog.at_level(logging.ERROR, logger=errors.__name__):
        r = client.get("/boom")
    assert r.status_code == 500
    assert body_of(r) == {"message": "internal error", "type": "server_error", "param": None, "code": "internal_error"}
    record = next(rec for rec in caplog.records if rec.name == errors.__name__)
    assert record.exc_info and record.exc_info[0] is RuntimeError  # the traceback goes to the log


def test_service_error_raised_in_middleware_keeps_its_status(client):
    r = client.get("/auth", headers={"x-too-big": "1"})
    assert r.status_code == 413 and body_of(r)["code"] == "payload_too_large"


def test_loc_parts_that_are_not_identifiers_are_masked():
    err = errors.validation_error([{"type": "int_parsing", "loc": ("body", "weights", "<script>", 3)}])
    assert err.message == "invalid value for 'body.weights.?.3': must be an integer"
    assert errors.validation_error([]).status == 422
