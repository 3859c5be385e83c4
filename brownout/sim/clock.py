"""A virtual clock and a time-ordered event queue.

Events fire in order of time; events at the same time fire in the order they were
scheduled (a sequence number breaks ties), so a run is a pure function of its inputs.
The clock only moves forward, to the time of the event being fired.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Optional


class VirtualClock:
    """Seconds since the start of the simulation; callable like `time.monotonic`."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"the clock cannot go back from {self._now} to {t}")
        self._now = float(t)


class EventQueue:
    """Callbacks at virtual times; `run` fires them in (time, scheduling order)."""

    def __init__(self, clock: VirtualClock):
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()
        self.num_fired = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Fire `fn(*args)` at time `t` (never before the present)."""
        heapq.heappush(self._heap, (max(float(t), self.clock.now), next(self._seq), fn, args))

    def peek_time(self) -> Optional[float]:
        return self._heap[0][0] if self._heap else None

    def run(self, until: float = float("inf")) -> None:
        """Fire events in order until none is left or the next is later than `until`."""
        while self._heap and self._heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(self._heap)
            self.clock.advance_to(t)
            self.num_fired += 1
            fn(*args)
