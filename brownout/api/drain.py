"""Graceful shutdown: the server stops taking requests and lets those in flight finish.

`Drain.run(timeout_s)` starts it (brownout.api.serving calls it on SIGTERM). From then on the
guard answers new requests 503 with a Retry-After of the time left; requests in flight go on
until they are done or the timeout passes. Then every response still running is ended: each
reads its engine outputs through a queue the drain watches (`watch`), and the drain puts a
503 error into every such queue, so a stream ends with a final error event and [DONE] and a
non-streaming request answers 503. Requests that reach the engine later are ended the same
way as soon as they watch their queue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from brownout.api.errors import APIError, retry_after

logger = logging.getLogger(__name__)

# After the timeout, the time the ended responses get to send their last bytes.
DRAIN_GRACE_S = 5.0


class Drain:
    """Counts the requests in flight and ends them when a shutdown's timeout passes."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self._deadline: Optional[float] = None
        self._in_flight = 0
        self._idle: Optional[asyncio.Event] = None
        self._queues: set[asyncio.Queue] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> None:
        self._in_flight += 1

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def time_left_s(self) -> float:
        if self._deadline is None:
            return 0.0
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def error(self) -> APIError:
        """What a request refused or ended by the shutdown gets."""
        return APIError(503, "server is shutting down", code="server_shutting_down",
                        headers={"Retry-After": retry_after(self.time_left_s())})

    def watch(self, outputs: asyncio.Queue) -> None:
        """End the response reading `outputs` (with `error()`) when the timeout passes."""
        if self.expired:
            outputs.put_nowait(self.error())
        self._queues.add(outputs)

    def unwatch(self, outputs: asyncio.Queue) -> None:
        self._queues.discard(outputs)

    async def run(self, timeout_s: float) -> None:
        """Refuse new requests; wait up to `timeout_s` for those in flight, then end them."""
        self.draining = True
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        logger.info("shutting down: %d requests in flight, waiting up to %g s for them",
                    self._in_flight, timeout_s)
        if await self._wait_idle(timeout_s):
            return
        self.expired = True
        logger.warning("shutting down: ending %d requests still running after %g s",
                       self._in_flight, timeout_s)
        for outputs in self._queues:
            outputs.put_nowait(self.error())
        if not await self._wait_idle(DRAIN_GRACE_S):
            logger.warning("shutting down: %d requests did not end within %g s",
                           self._in_flight, DRAIN_GRACE_S)

    async def _wait_idle(self, timeout_s: float) -> bool:
        if self._in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True
