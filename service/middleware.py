"""Pure ASGI middleware: request metrics and ids, API-key auth, and the streaming body-size limit.

Order, outermost first (see `service.app.build_app`):

    RequestMetrics   x-request-id on every response; counts and latencies per route template and status
    ApiKeyAuth       default-deny: every path except /health/live and /health/ready needs a Bearer key
    BodyLimit        413 before reading a body whose Content-Length is over the limit, or as soon as the
                     bytes streamed so far (chunked, or a lying Content-Length) pass it
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterable

from service.errors import PayloadTooLarge, Unauthorized, envelope
from service.memory import LARGE_BYTES, release_free_memory
from service.metrics import Metrics

PUBLIC_PATHS = frozenset({"/health/live", "/health/ready"})


async def send_error(send, err, *, close: bool = False) -> None:
    """Write an error envelope straight to ASGI `send` (no Starlette objects: this runs outside the app)."""
    import json

    body = json.dumps(envelope(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = uuid.uuid4().hex
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            labels = (endpoint, scope.get("method", ""), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)


class ApiKeyAuth:
    """`Authorization: Bearer KEY`, keys compared as SHA-256 digests with `hmac.compare_digest`.

    The decision looks at the decoded path the router will see (`scope["path"]`) and allows only the exact
    public paths, so `//v1/...`, `/V1/...`, `/%2Fv1/...` or `/health/live/../..` are simply not public.
    Keys in the query string are ignored. Keys are kept as digests only.
    """

    def __init__(self, app, keys: Iterable[str]):
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def allowed(self, scope) -> bool:
        values = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        digest = hashlib.sha256(token).digest()
        ok = False
        for expected in self.digests:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(digest, expected)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.digests or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        if self.allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(send, Unauthorized())


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is over the limit of {self.max_bytes} bytes", param="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the server's HTTP parser has already refused a malformed length
                if declared > self.max_bytes:
                    await send_error(send, self._error(), close=True)
                    return
        received = 0
        exceeded = False
        response_started = False
        replaced = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise self._error()  # a ServiceError: the app's handlers render it as 413
            return message

        async def guarded_send(message):
            nonlocal response_started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if exceeded and message["status"] != 413:
                    # Some layer turned the overflow into another error (e.g. a parser wrapping it): 413 wins.
                    replaced = True
                    response_started = True
                    await send_error(send, self._error(), close=True)
                    return
                response_started = True
                if exceeded:
                    message = dict(message)
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLarge:
            if exceeded and not response_started:
                await send_error(send, self._error(), close=True)
            else:
                raise
        finally:
            if received > LARGE_BYTES:
                release_free_memory()  # the body's buffers are garbage now (see service.memory)
