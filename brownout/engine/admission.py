"""SLO-aware admission: refuse at arrival a request whose first token cannot come in time.

A bounded queue (a count and a token limit) keeps memory safe, but under a burst above what
even the fastest tau serves, every admitted request waits behind a queue that grows for the
whole burst, and all of them miss the TTFT SLO. With `admission_ttft_factor` F set, the
engine predicts a new request's wait for its first token,

    wait = time it has already spent on its way in (tokenising, the hop to the engine)
           + max((prompt tokens still to prefill ahead of it + its own) / prefill rate,
                 slot wait + its own tokens / prefill rate)
           + one step (the step in flight when it arrives, and the step granularity of its
             prefill)
           + the 90th percentile of recent prediction errors (`WaitFeedback`),

where the slot wait counts, when every sequence slot (`max_num_seqs`) is taken, the slots
that must free before it gets one (the requests queued ahead of it, plus itself, less the
free slots) at the rate running requests have been finishing (`SlotRate`): with long outputs
a burst can fill every slot, and then new requests wait for a slot, not for prefill. It
refuses it (429 with a Retry-After of the time the queue needs to drain below the limit)
when wait > F x the TTFT SLO, so those it admits can still meet it. The error term closes the
loop: without it the first H200 runs with admission (`headline_h200_run10`, `_run11`) admitted
requests whose P90 TTFT came out 4-15 ms over the SLO, because near the limit every admitted
request is predicted just under it and anything the rate model leaves out (chunk boundaries,
the tau the controller actually picks, host time) pushes it over. The prefill rate is
measured: prompt tokens per second of step time over the recent steps that left requests
waiting (steps that were budget-bound, so their rate is what the engine does now at the tau
the controller chose), scaled by the speed-up the controller predicts from dimming to its
lowest tau (`Controller.prefill_speedup`; 1 for policies without a latency model). So a
request is refused only when even the fastest tau could not serve it in time, and the queue
may grow as far as dimming can drain it: brownout spends accuracy first and sheds load only
beyond that. Until such steps have been seen there is no queue worth refusing for, and
everything is admitted.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import numpy as np


class PrefillRate:
    """Prompt tokens per second of step time, over the last `window` budget-bound steps."""

    def __init__(self, window: int = 32, min_steps: int = 4):
        self.min_steps = min_steps
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, prefill_tokens: int, latency_s: float, queue_left: bool) -> None:
        """A collected step: its prompt tokens, its latency, and whether requests still waited
        when it was scheduled (only such steps show what the engine can do at full load)."""
        if queue_left and prefill_tokens > 0 and latency_s > 0 and math.isfinite(latency_s):
            self._steps.append((prefill_tokens, latency_s))

    @property
    def tokens_per_s(self) -> Optional[float]:
        if len(self._steps) < self.min_steps:
            return None
        return sum(t for t, _ in self._steps) / sum(s for _, s in self._steps)


class WaitFeedback:
    """Errors of the wait prediction, measured when admitted requests get their first token:
    `margin` is their `quantile` (P90, the SLO's percentile) over the last `window` requests,
    added to every later prediction. Bounded to [-limit / 2, limit / 2]: one stall (or an idle
    engine that beats its prediction) cannot open the gate wide by itself, and it never shuts:
    errors are measured only on admitted requests, so a margin of the whole limit would refuse
    every request and never be measured again; at half of it, requests behind a short queue
    still come in and keep the errors current."""

    def __init__(self, window: int = 128, min_samples: int = 16, quantile: float = 0.9):
        self.window, self.min_samples, self.quantile = window, min_samples, quantile
        self._errors: deque[float] = deque(maxlen=window)
        self._margin: Optional[float] = None

    def observe(self, predicted_s: float, actual_s: float) -> None:
        if math.isfinite(predicted_s) and math.isfinite(actual_s):
            self._errors.append(actual_s - predicted_s)
            self._margin = None  # recomputed on the next read

    def margin(self, limit_s: float) -> float:
        if len(self._errors) < self.min_samples:
            return 0.0
        if self._margin is None:
            self._margin = float(np.quantile(self._errors, self.quantile))
        return min(max(self._margin, -0.5 * limit_s), 0.5 * limit_s)


class SlotRate:
    """Sequence slots freed per second: running requests that finished (or were aborted)
    over the last `window_s` seconds; None until `min_events` were seen in that window. It is
    the rate while the engine ran with the requests it had, so while it fills up it
    under-counts and the slot wait errs long; the measured errors (`WaitFeedback`) correct
    what is left."""

    def __init__(self, window_s: float = 4.0, min_events: int = 4):
        self.window_s, self.min_events = window_s, min_events
        self._times: deque[float] = deque()

    def observe(self, t: float) -> None:
        self._times.append(t)
        self._forget(t)  # bounded even when nobody reads the rate (no admission factor)

    def per_s(self, now: float) -> Optional[float]:
        self._forget(now)
        if len(self._times) < self.min_events:
            return None
        return len(self._times) / self.window_s

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()


def slot_wait(queued_ahead: int, free_slots: int, rate: Optional[float]) -> float:
    """Seconds until a slot is free for a new request behind `queued_ahead` waiting ones; 0
    when a slot is free for it now or the rate is unknown (nothing to go on)."""
    need = queued_ahead + 1 - max(0, free_slots)
    if need <= 0 or rate is None or rate <= 0:
        return 0.0
    return need / rate


def admission_wait(ahead_tokens: int, own_tokens: int, rate: Optional[float],
                   step_s: float = 0.0, elapsed_s: float = 0.0,
                   slot_wait_s: float = 0.0) -> Optional[float]:
    """Predicted seconds until a new request's first token, or None when the rate is unknown.
    `step_s`: a step's latency, added once (without it the first H200 run with admission,
    `headline_h200_run10`, admitted requests whose P90 TTFT came out ~35 ms, 1.5 steps, over
    the limit even with brownout off). `elapsed_s`: the time since the request arrived at the
    server (its TTFT clock started there). `slot_wait_s`: the wait for a sequence slot
    (`slot_wait`); its prefill starts only after it."""
    if rate is None or rate <= 0:
        return None
    prefill = max((ahead_tokens + own_tokens) / rate, max(0.0, slot_wait_s) + own_tokens / rate)
    return max(0.0, elapsed_s) + prefill + step_s


def refuse_for(wait_s: Optional[float], limit_s: float) -> Optional[float]:
    """None to admit; else the Retry-After in seconds: how long the queue needs to drain
    until a request like this one would fit under the limit (at least 1 s)."""
    if wait_s is None or wait_s <= limit_s:
        return None
    return max(1.0, math.ceil(wait_s - limit_s))
