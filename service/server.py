"""Running the app under uvicorn: header limits with a 431 reply, and SIGTERM as "drain, then exit".

    exit_code = serve(settings)     # what `qbridge serve` calls

SIGTERM (or Ctrl-C): readiness turns 503 at once and no request is admitted any more; after
`drain_delay_s` (time for a load balancer to notice) the port closes, in-flight requests get up to
`grace_s` to finish, then the engine closes and the process exits 0. A second signal forces the exit.
"""

from __future__ import annotations

import json
import logging
import signal
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import build_app
from service.errors import ServiceError
from service.settings import Settings

log = logging.getLogger(__name__)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering 431 (not 400) when the request head outgrows the limit.

    h11 stops buffering at `h11_max_incomplete_event_size` bytes, so a 1 MB header costs that much memory
    at most, and the connection is closed after the reply.
    """

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        try:
            buffered = len(self.conn.trailing_data[0])
        except Exception:  # uvicorn/h11 internals changed: fall back to uvicorn's reply
            buffered = 0
        if not limit or buffered <= limit:
            return super().send_400_response(msg)
        err = ServiceError(f"the request header is over the limit of {limit} bytes",
                           code="request_header_fields_too_large")
        body = json.dumps({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=431, headers=headers,
                                                             reason=b"Request Header Fields Too Large")))
            self.transport.write(self.conn.send(h11.Data(data=body.encode())))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass
        self.transport.close()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_delay_s: float = 0.0):
        super().__init__(config)
        self.state = state
        self.drain_delay_s = drain_delay_s
        self.exit_code = 0
        self._signalled = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._signalled:  # a second signal: stop waiting
            self.should_exit = True
            self.force_exit = True
            return
        self._signalled = True
        log.info("signal %s: draining (ready=503), closing the port in %.1f s", signal.Signals(sig).name,
                 self.drain_delay_s)
        self.state.begin_drain()
        if self.drain_delay_s > 0:
            timer = threading.Timer(self.drain_delay_s, self._exit)
            timer.daemon = True
            timer.start()
        else:
            self._exit()

    def _exit(self) -> None:
        self.should_exit = True

    def stop(self, exit_code: int) -> None:
        """Stop from inside the server (e.g. the model failed to load)."""
        self.exit_code = exit_code
        self.should_exit = True


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=LimitedH11Protocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=int(settings.grace_s) or 1,
        limit_concurrency=settings.limit_concurrency or None,
        log_level=settings.log_level,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        ws="none",
    )


def serve(settings: Settings) -> int:
    app = build_app(settings)
    state = app.state.qbridge
    server = DrainingServer(uvicorn_config(app, settings), state, settings.drain_delay_s)
    state.on_load_error = lambda exc: server.stop(1)
    server.run()
    return server.exit_code
