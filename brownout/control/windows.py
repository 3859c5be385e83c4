"""Time-windowed latency samples and their percentiles, for the SLO controller.

Samples are kept per key ("prefill" and "decode" step latencies, plus request-level
"ttft" and "tpot"). A sample is stamped with the controller's clock (injectable, so tests
drive time by hand) and dropped once it is older than the store's horizon. Non-finite
values are ignored: a NaN latency from a broken timer must never poison a percentile.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Iterable, Optional

import numpy as np

PREFILL = "prefill"  # steps that carry any prefill work (chunked prefill counts)
DECODE = "decode"  # decode-only steps
PHASES = (PREFILL, DECODE)


def phase_of(has_prefill: bool) -> str:
    return PREFILL if has_prefill else DECODE


class LatencyWindows:
    """Per-key deques of (time, value), pruned past `horizon_s`."""

    def __init__(self, horizon_s: float, clock: Callable[[], float] = time.monotonic,
                 keys: Iterable[str] = PHASES, max_samples: int = 200_000):
        if not horizon_s > 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self.horizon_s = float(horizon_s)
        self._clock = clock
        self._max_samples = max_samples  # a hard cap so a stuck clock cannot grow memory
        self._data: dict[str, deque[tuple[float, float]]] = {k: deque() for k in keys}

    def add(self, key: str, value: float, t: Optional[float] = None) -> bool:
        """Record `value` at time `t` (default: now). Returns False if it was dropped."""
        if value is None or not math.isfinite(value):
            return False
        t = self._clock() if t is None else t
        dq = self._data.setdefault(key, deque())
        dq.append((t, float(value)))
        if len(dq) > self._max_samples:
            dq.popleft()
        self._prune(dq, t)
        return True

    def _prune(self, dq: deque, now: float) -> None:
        cutoff = now - self.horizon_s
        while dq and dq[0][0] < cutoff:
            dq.popleft()

    def values(self, key: str, window_s: float, now: Optional[float] = None) -> np.ndarray:
        """Samples of `key` stamped in (now - window_s, now]."""
        dq = self._data.get(key)
        if not dq:
            return np.empty(0)
        now = self._clock() if now is None else now
        since = now - window_s
        out = []
        for t, v in reversed(dq):  # newest first: stop at the first old sample
            if t <= since:
                break
            if t <= now:
                out.append(v)
        return np.asarray(out[::-1], dtype=float)

    def percentile(self, key: str, q: float, window_s: float,
                   now: Optional[float] = None) -> Optional[float]:
        """The q-th percentile (0..100, linear interpolation) of the window; None if empty."""
        vals = self.values(key, window_s, now)
        if vals.size == 0:
            return None
        return float(np.percentile(vals, q))

    def count(self, key: str, window_s: float, now: Optional[float] = None) -> int:
        return int(self.values(key, window_s, now).size)

    def clear(self) -> None:
        for dq in self._data.values():
            dq.clear()
