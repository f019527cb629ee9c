"""What the routes share: settings, metrics, the engine (None while the model loads) and the drain flag."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from service.engine import Engine
from service.errors import Overloaded
from service.images import ImageLimits
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

DECODE_THREADS = 4  # images decoded at once, beside the model thread


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    draining: bool = False
    load_failed: bool = False
    on_load_error: Callable[[BaseException], None] | None = None  # the CLI stops the server
    decode_limiter: anyio.CapacityLimiter | None = None
    started_at: float = field(default_factory=time.time)
    loader: asyncio.Task | None = field(default=None, repr=False)

    @property
    def limits(self) -> ImageLimits:
        return self.settings.limits

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready and not self.draining

    def begin_drain(self) -> None:
        """Readiness 503 and no new admissions from now on; safe from a signal handler."""
        self.draining = True
        if self.engine is not None:
            self.engine.begin_drain()

    def require_engine(self) -> Engine:
        retry = self.settings.retry_after_s
        if self.draining:
            raise Overloaded("the server is shutting down", code="shutting_down", retry_after=retry)
        if self.engine is None:
            if self.load_failed:
                raise Overloaded("the model failed to load; see the server log", code="model_unavailable",
                                 retry_after=retry)
            raise Overloaded("the model is still loading", code="not_ready", retry_after=retry)
        return self.engine

    async def load(self) -> None:
        """Load the model in a thread and start its engine; the server answers /health/* meanwhile."""
        from service.loading import build_engine, load_model

        try:
            bundle = await asyncio.to_thread(load_model, self.settings)
            engine = build_engine(bundle, self.settings, self.metrics)
            if self.draining:
                engine.begin_drain()
            await engine.start()
            self.engine = engine
            log.info("model %s ready (backend %s, device %s)", engine.model_name, engine.backend.name, engine.device)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.load_failed = True
            log.error("model load failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            if self.on_load_error is not None:
                self.on_load_error(exc)
