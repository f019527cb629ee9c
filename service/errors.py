"""Typed service errors, the OpenAI-style error envelope, and the FastAPI handlers that render them.

Every non-2xx response is ``{"error": {"message", "type", "param", "code"}}``. The HTTP status lives on
the exception class (one obvious way: ``err.status``). Messages are fixed text written by this
service; they may name a limit and the value seen (numbers), but never carry exception text, file
paths, memory addresses or an echo of the client's input (service/BAD_INPUTS.md, every row).

    install_error_handlers(app)          # once, in build_app
    raise ImageTooLarge("image is 30000x30000 = 900.0 megapixels; the limit is 40 megapixels")
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error a client may see. Subclasses fix status, type, code and a default message."""

    status: int = 400
    type: str = "invalid_request_error"
    default_code: str = "bad_request"
    default_message: str = "bad request"

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers) if headers else {}
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class BadRequest(ServiceError):
    status = 400
    default_code = "bad_request"
    default_message = "bad request"


class InvalidImage(ServiceError):
    status = 400
    default_code = "invalid_image"
    default_message = "the image could not be decoded"


class InvalidBase64(ServiceError):
    status = 400
    default_code = "invalid_base64"
    default_message = "the image is not valid base64"


class ImageTooSmall(ServiceError):
    status = 400
    default_code = "image_too_small"
    default_message = "the image is too small"


class BadAspectRatio(ServiceError):
    status = 400
    default_code = "bad_aspect_ratio"
    default_message = "the image aspect ratio is too extreme"


class TooManyItems(ServiceError):
    """Too many images or questions in one request; ``code`` is ``too_many_images`` or ``too_many_questions``."""

    status = 400
    default_code = "too_many_items"
    default_message = "too many items in the request"


class UrlNotAllowed(ServiceError):
    status = 400
    default_code = "url_not_allowed"
    default_message = "remote image URLs are not allowed"


class Unauthorized(ServiceError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"
    default_message = "missing or invalid API key"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        # RFC 6750: a 401 for bearer auth names the scheme the client should use.
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class NotFound(ServiceError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"
    default_message = "not found"


class PayloadTooLarge(ServiceError):
    status = 413
    default_code = "payload_too_large"
    default_message = "the request body is too large"


class ImageTooLarge(ServiceError):
    status = 413
    default_code = "image_too_large"
    default_message = "the image has too many pixels"


class UnsupportedMediaType(ServiceError):
    status = 415
    default_code = "unsupported_image_format"
    default_message = "unsupported image format; allowed formats: JPEG, PNG, WebP, GIF, BMP"


class Overloaded(ServiceError):
    """503 + Retry-After. ``code`` may also be ``not_ready``, ``shutting_down`` or ``out_of_memory``."""

    status = 503
    type = "service_unavailable_error"
    default_code = "overloaded"
    default_message = "the server is overloaded; retry later"

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(max(0, int(retry_after))))


class ValidationFailed(ServiceError):
    """422 from request schema validation; built only by `validation_error`."""

    status = 422
    default_code = "validation_error"
    default_message = "request validation failed"


class InternalError(ServiceError):
    status = 500
    type = "server_error"
    default_code = "internal_error"
    default_message = "internal error"


class DeadlineExceeded(ServiceError):
    status = 504
    type = "timeout_error"
    default_code = "timeout"
    default_message = "the request did not finish before its deadline"


def envelope(err: ServiceError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: ServiceError):
    """The JSONResponse for ``err``; also for middleware, which runs outside FastAPI's exception handlers."""
    from fastapi.responses import JSONResponse

    return JSONResponse(envelope(err), status_code=err.status, headers=err.headers or None)


# --- FastAPI handlers ------------------------------------------------------------------------------

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

# Pydantic error types -> fixed phrases. Constraint values (le, max_length, ...) come from our schema,
# so naming them is fine; pydantic's own `msg` and `input` are never used (custom validators can put
# the input into `msg`, and `input` is the input).
_VALIDATION_PHRASES = {
    "missing": "field required",
    "extra_forbidden": "unknown field",
    "json_invalid": "request body is not valid JSON",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be a boolean",
    "bool_parsing": "must be a boolean",
    "literal_error": "must be one of the allowed values",
    "enum": "must be one of the allowed values",
    "string_pattern_mismatch": "does not match the required pattern",
    "string_unicode": "must be valid UTF-8 text",
    "union_tag_invalid": "has an unknown type tag",
}
_CONSTRAINT_PHRASES = {
    "greater_than": ("gt", "must be > {}"),
    "greater_than_equal": ("ge", "must be >= {}"),
    "less_than": ("lt", "must be < {}"),
    "less_than_equal": ("le", "must be <= {}"),
    "multiple_of": ("multiple_of", "must be a multiple of {}"),
    "string_too_short": ("min_length", "must have at least {} characters"),
    "string_too_long": ("max_length", "must have at most {} characters"),
    "too_short": ("min_length", "must have at least {} items"),
    "too_long": ("max_length", "must have at most {} items"),
}
_SAFE_LOC_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")


def _loc_path(loc: Any) -> str:
    """'body.questions.3'. Dict keys are client-chosen: only identifier-like parts are kept, others become '?'."""
    parts = []
    for part in loc if isinstance(loc, (list, tuple)) else (loc,):
        if isinstance(part, int):
            parts.append(str(part))
        elif isinstance(part, str) and _SAFE_LOC_PART.fullmatch(part):
            parts.append(part)
        else:
            parts.append("?")
    return ".".join(parts)


def _validation_phrase(err: dict[str, Any]) -> str:
    kind = str(err.get("type", ""))
    if kind in _CONSTRAINT_PHRASES:
        key, template = _CONSTRAINT_PHRASES[kind]
        value = (err.get("ctx") or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return template.format(value)
        return "is out of range"
    return _VALIDATION_PHRASES.get(kind, "is invalid")


def validation_error(errors: list[dict[str, Any]]) -> ServiceError:
    """422 naming the first failing field and the rule it broke; never the value given."""
    if not errors:
        return ValidationFailed()
    first = errors[0]
    phrase = _validation_phrase(first)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first.get("type") == "json_invalid":
        return ValidationFailed(phrase + more, param="body")
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        loc = loc[:-1]  # the unknown key is the client's text: name the object that holds it instead
    path = _loc_path(loc)
    return ValidationFailed(f"invalid value for '{path}': {phrase}{more}", param=path)


def _http_error(status: int, headers: dict[str, str] | None) -> ServiceError:
    """Starlette/FastAPI HTTPException (unknown route, wrong method, multipart parse error, ...)."""
    try:
        phrase = HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = "error"
    code = _HTTP_CODES.get(status, re.sub(r"[^a-z0-9]+", "_", phrase))
    # Keep protocol headers such as `Allow` on a 405; the detail text is dropped (it can be library text).
    err = ServiceError(phrase, code=code, headers=headers)
    err.status = status  # the one place a status is set per instance: it comes from the HTTPException
    err.type = _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return err


def install_error_handlers(app) -> None:
    """Render ServiceError, validation errors, Starlette HTTP errors and unexpected exceptions as envelopes."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_service_error(request, exc: ServiceError):
        return error_response(exc)

    async def on_validation_error(request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    async def on_http_error(request, exc: StarletteHTTPException):
        return error_response(_http_error(exc.status_code, getattr(exc, "headers", None)))

    async def on_unexpected(request, exc: Exception):
        # Reached through Starlette's ServerErrorMiddleware, which also re-raises after responding.
        if isinstance(exc, ServiceError):  # raised by a middleware, outside the handlers above
            return error_response(exc)
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return error_response(InternalError())

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
