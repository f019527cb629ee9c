"""The FastAPI application.

    app = build_app(Settings.from_env())            # loads the model in the background at startup
    app = build_app(settings, engine=my_engine)     # tests: an engine built in code (started at startup)

`qbridge serve` (service.cli) runs it under uvicorn with header limits, graceful drain and the 431 reply.
Until the model is loaded and warm, /health/ready and every model route answer 503 (`not_ready`);
/health/live answers from the first moment.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service import protocol, routes
from service.engine import Engine
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import ApiKeyAuth, BodyLimit, RequestMetrics
from service.settings import Settings
from service.state import DECODE_THREADS, AppState

log = logging.getLogger(__name__)

# Request bodies the routes parse themselves (JSON or multipart); documented here for /docs and clients.
_DOCUMENTED_BODIES = {
    "CaptionRequest": (protocol.CaptionRequest, True),
    "VQARequest": (protocol.VQARequest, True),
    "DetectRequest": (protocol.DetectRequest, True),
    "ClassifyRequest": (protocol.ClassifyRequest, True),
    "MatchRequest": (protocol.MatchRequest, True),
    "ImageUploadRequest": (protocol.ImageUploadRequest, True),
    "ChatCompletionRequest": (protocol.ChatCompletionRequest, False),
    "EmbeddingRequest": (protocol.EmbeddingRequest, False),
}


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: AppState = app.state.qbridge
    state.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
    state.draining = False
    if state.engine is not None:
        await state.engine.start()
    else:
        state.loader = asyncio.create_task(state.load(), name="qbridge-load")
    try:
        yield
    finally:
        state.begin_drain()
        if state.loader is not None and not state.loader.done():
            state.loader.cancel()
            await asyncio.gather(state.loader, return_exceptions=True)
        if state.engine is not None:
            await state.engine.drain(state.settings.grace_s)
            await state.engine.close()


def build_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = engine.metrics if engine is not None else Metrics()
    app = FastAPI(
        title="qbridge",
        version="0.1.0",
        summary="Captions at a quality level, VQA and detection from a Q-Former bridge; zero-shot classification, "
                "image-text matching and embeddings from its Q-Former's own heads; OpenAI-compatible chat and "
                "embeddings.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
        redoc_url=None,
    )
    app.state.qbridge = AppState(settings=settings, metrics=metrics, engine=engine)
    install_error_handlers(app)
    _allow_every_method_on_405(app)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.include_router(routes.router)
    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys)
    app.add_middleware(RequestMetrics, metrics=metrics)
    _install_openapi(app)
    return app


async def _client_gone(request, exc: ClientDisconnect) -> Response:
    # The client left while its body was being read: nothing to answer, and not a server error.
    return Response(status_code=499)


def _allow_every_method_on_405(app: FastAPI) -> None:
    """A 405's `Allow` lists the methods of every route on that path (Starlette names only the first route's)."""
    original = app.exception_handlers[StarletteHTTPException]

    async def on_http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            methods: set[str] = set()
            for route in app.router.routes:
                match, _ = route.matches(request.scope)
                if match != Match.NONE:
                    methods |= set(getattr(route, "methods", None) or ())
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
        return await original(request, exc)

    app.add_exception_handler(StarletteHTTPException, on_http_error)


def _install_openapi(app: FastAPI) -> None:
    """The generated schema plus the request bodies routes read themselves (JSON and multipart variants)."""

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, (model, form) in _DOCUMENTED_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[name] = body
            if form:
                upload = {"type": "string", "format": "binary"}  # service.bodies.UPLOAD_PARTS
                form_schema = {**body, "properties": {
                    **body["properties"],
                    "file": {**upload, "description": "the image file"},
                    "image": {**upload, "description": "the image file (as 'file'), or as a text field base64 "
                                                       "or a data URL"},
                }}
                form_schema["required"] = [r for r in body.get("required", []) if r != "image"]
                form_schema["title"] = name + "Form"
                components[name + "Form"] = form_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
