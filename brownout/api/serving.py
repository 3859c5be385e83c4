"""Run the app under uvicorn with bounded connections and a graceful shutdown.

- Each request head (request line and headers) must arrive within the header timeout,
  counted from the connection's start or the end of the previous response: a connection
  that sends nothing, or half a head, is closed (`GuardedH11Protocol`). Heads are bounded
  to MAX_HEAD_BYTES: h11 answers 400 to a longer head arriving in pieces, the guard 431 to
  one that arrived whole (brownout.api.middleware). A body that stops arriving is the guard's
  (brownout.api.middleware: 408 after the body timeout); an idle keep-alive connection is
  closed after the keep-alive timeout.
- On SIGTERM (or a first Ctrl-C) the server drains (brownout.api.drain) for up to the
  shutdown timeout, then shuts down as uvicorn does; a second signal skips the wait.
- When the engine client gives up on an engine that keeps dying, the server shuts down
  and `serve` returns ENGINE_FAILED_EXIT_CODE, so a supervisor can act.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from brownout.api.drain import DRAIN_GRACE_S, Drain
from brownout.api.engine_client import EngineClient
from brownout.api.engine_restart import ENGINE_FAILED_EXIT_CODE
from brownout.api.middleware import MAX_HEAD_BYTES
from brownout.config import ServerConfig

logger = logging.getLogger(__name__)

class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive
    within `head_timeout_s` (a subclass sets it: see `guarded_protocol`)."""

    head_timeout_s: float = ServerConfig().header_timeout_s
    _head_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self._serving():
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():  # the next head is due; a pipelined one cancels it
            self._arm_head_timer()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        """A request's head has arrived and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._serving() and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(head_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn builds per connection, with this head timeout."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout_s": head_timeout_s})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM or SIGINT before it shuts down."""

    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout_s = shutdown_timeout_s
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain_requested = False
        self.exit_code = 0

    def engine_gave_up(self, reason: str) -> None:
        """The engine cannot be kept running: stop serving, exit non-zero."""
        logger.critical("shutting down: %s", reason)
        self.exit_code = ENGINE_FAILED_EXIT_CODE
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler: it only schedules the drain on the event loop.
        if self._loop is None or self._drain_requested or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig, frame) -> None:
        self._loop.create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig, frame) -> None:
        try:
            await self.drain.run(self.shutdown_timeout_s)
        finally:
            super().handle_exit(sig, frame)


def serve(app, server: ServerConfig, drain: Drain, engine: Optional[EngineClient] = None) -> int:
    """Serve `app` until a signal stops it (after draining) or `engine` gives up; the
    process's exit status."""
    config = uvicorn.Config(app, host=server.host, port=server.port, log_level="info",
                            http=guarded_protocol(server.header_timeout_s),
                            timeout_keep_alive=server.keep_alive_timeout_s,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                            timeout_graceful_shutdown=DRAIN_GRACE_S)
    uv_server = DrainingServer(config, drain, server.shutdown_timeout_s)
    if engine is not None:
        engine.on_give_up.append(uv_server.engine_gave_up)
    uv_server.run()
    return uv_server.exit_code
