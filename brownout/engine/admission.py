"""Admission: whether an arriving request joins the queue, or is refused with a Retry-After.

The queue is bounded (a count and a token limit), which keeps memory safe. Under a burst
above what even the fastest tau serves, though, every admitted request would wait behind a
queue that grows for the whole burst, and all of them would miss the TTFT SLO. So with
`admission_ttft_factor` F set, `Admission` predicts a new request's wait for its first token,

    wait = time it has already spent on its way in (tokenising, the hop to the engine)
           + max((prompt tokens still to prefill ahead of it + its own) / prefill rate,
                 slot wait + its own tokens / prefill rate)
           + one step (the step in flight when it arrives, and the step granularity of its
             prefill)
           + the 90th percentile of recent prediction errors (`WaitFeedback`),

and refuses it (429 with a Retry-After of the time the queue needs to drain below the
limit) when wait > F x the TTFT SLO, so those it admits can still meet it.

* The slot wait counts, when every sequence slot (`max_num_seqs`) is taken, the slots that
  must free before it gets one (the requests queued ahead of it, plus itself, less the free
  slots) at the rate running requests have been finishing (`SlotRate`): with long outputs a
  burst can fill every slot, and then new requests wait for a slot, not for prefill.
* The error term closes the loop: near the limit every admitted request is predicted just
  under it, so anything the rate model leaves out (chunk boundaries, the tau the controller
  actually picks, host time) would push its TTFT over the SLO; the measured errors of
  earlier first tokens add it back.
* The prefill rate is measured: prompt tokens per second of step time over the recent steps
  that left requests waiting (budget-bound steps, so their rate is what the engine does now
  at the tau the controller chose), scaled by the speed-up the controller predicts from
  dimming to its lowest tau (`Controller.prefill_speedup`; 1 for policies without a latency
  model; the speed-up of expert shedding counts only once shed steps have shown it). So a
  request is refused only when even the fastest tau could not serve it in time, and the
  queue may grow as far as dimming can drain it: brownout spends accuracy first and sheds
  load only beyond that. The predictive controller keeps that promise: it checks each
  queued prompt's first token against the TTFT SLO from its arrival and dims prefill when
  the current tau would miss it. Until such steps have been seen there is no queue worth
  refusing for, and everything is admitted.
* The running cap (the controller's rung 4, `set_running_cap`): the batch the latency model
  says meets the TPOT SLO at the fastest rung. The scheduler admits no request beyond it,
  and the slot wait counts free slots under it, so once the batch is at the cap a request
  whose slot would come too late for its first token is refused here, with the predicted
  Retry-After.
* Priority classes (the priority scheduling policy): a request waits only behind the
  queued work of its own and more important classes (lower `priority` values), and each
  class has its own measured errors, so under overload the least important class is
  refused first.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional

import numpy as np

from brownout.config import SchedulerConfig
from brownout.engine.request import Request
from brownout.engine.scheduler import QueueView
from brownout.types import AdmissionError

# A refused client is told to wait at least this long: sooner, the queue has not moved.
MIN_RETRY_AFTER_S = 1.0
# The wait-error margin moves a prediction by at most this share of the limit either way
# (see `WaitFeedback`).
_MAX_MARGIN_SHARE = 0.5
# The step-time average starts at a typical step, so the first Retry-After is sensible, and
# weighs each new step this much: it follows a change of load within a few dozen steps.
_INITIAL_STEP_S = 0.05
_STEP_EMA_WEIGHT = 0.1


class Admission:
    """Asked once per arriving request (`admit`); fed the collected steps, first tokens and
    finishes. Reads the scheduler's queue only through its live `QueueView`."""

    def __init__(self, config: SchedulerConfig, ttft_slo_s: float, view: QueueView):
        self.config = config
        self.view = view
        self.factor = config.admission_ttft_factor  # None: admit while the queue has room
        self.limit_s = (self.factor or 0.0) * ttft_slo_s
        self.prefill_rate = PrefillRate()
        self.wait_feedback = WaitFeedback()
        # under the priority policy each class has its own errors: a less important class is
        # overtaken by later arrivals, so its predictions err long, which must not refuse
        # the more important classes
        self._class_feedback: dict[int, WaitFeedback] = {}
        self.slot_rate = SlotRate()  # sequence slots freed per second
        self.step_time_s = _INITIAL_STEP_S  # moving average of collected steps' latency
        self.num_refused_full = 0  # refused because the queue was full
        self.num_refused_slo = 0  # refused because their TTFT could not be met

    def admit(self, num_tokens: int, arrival: float, now: float,
              prefill_speedup: Callable[[], float], priority: int = 0) -> Optional[float]:
        """Admit a request of `num_tokens` prompt tokens that arrived at `arrival`, or raise
        AdmissionError; returns its predicted wait for its first token (None: none made).
        Under the priority policy only the queued work of its own and more important classes
        is ahead of it, so under overload the least important class is refused first."""
        view, sched = self.view, self.config
        if view.num_waiting >= sched.max_waiting_requests or \
                view.waiting_tokens + num_tokens > sched.max_waiting_tokens:
            self.num_refused_full += 1
            raise AdmissionError("the waiting queue is full", self.retry_after_s())
        rate = self.prefill_rate.tokens_per_s  # at the tau the controller runs now
        if self.factor is None or rate is None:  # no rate yet: no queue worth refusing for
            return None
        rate *= prefill_speedup()  # refuse only what even the lowest tau could not serve
        queued, queued_tokens = view.num_waiting, view.waiting_tokens
        if sched.policy == "priority":
            queued, queued_tokens = view.ahead_of(priority)
        wait = admission_wait(queued_tokens + view.running_prefill_tokens, num_tokens, rate,
                              step_s=self.step_time_s, elapsed_s=now - arrival,
                              slot_wait_s=self.slot_wait_s(now, queued))
        expected = wait + self._feedback(priority).margin(self.limit_s)  # corrected by measured errors
        retry = refuse_for(expected, self.limit_s)
        if retry is not None:
            self.num_refused_slo += 1
            raise AdmissionError(f"its first token would come in ~{expected:.2f} s, over the "
                                 f"{self.limit_s:.2f} s admission limit ({self.factor:g} x the "
                                 f"TTFT SLO)", retry)
        return wait

    def retry_after_s(self) -> float:
        """How long the queued work takes to drain at full steps, for a refused client."""
        queued = self.view.waiting_tokens + self.view.num_running
        steps = queued / self.config.max_num_batched_tokens
        return max(MIN_RETRY_AFTER_S, round(steps * self.step_time_s, 1))

    def slot_wait_s(self, now: float, queued_ahead: Optional[int] = None) -> float:
        """Seconds a request arriving now, behind `queued_ahead` waiting requests (default:
        all), would wait for a sequence slot (the running cap counts, `set_running_cap`)."""
        ahead = self.view.num_waiting if queued_ahead is None else queued_ahead
        return slot_wait(ahead, self.view.free_slots, self.slot_rate.per_s(now))

    def set_running_cap(self, cap: Optional[int]) -> None:
        """The running-batch cap for the next steps (the controller's rung 4; None: none).
        The scheduler admits no request beyond it, and the slot wait counts only slots under
        it, so a request that would wait past the TTFT limit for one is refused at arrival
        with the predicted Retry-After."""
        self.view.running_cap = cap

    def observe_step(self, prefill_tokens: int, latency_s: float, queue_left: bool) -> None:
        """A collected step: its prompt tokens, its latency, and whether requests still waited
        when it was scheduled."""
        self.step_time_s = (1 - _STEP_EMA_WEIGHT) * self.step_time_s + _STEP_EMA_WEIGHT * latency_s
        self.prefill_rate.observe(prefill_tokens, latency_s, queue_left=queue_left)

    def observe_first_token(self, req: Request, now: float) -> None:
        """A request's first token: the error of its predicted wait, if one was made."""
        if req.predicted_wait_s is not None:
            self._feedback(req.priority).observe(req.predicted_wait_s, now - req.arrival_time)

    def _feedback(self, priority: int) -> WaitFeedback:
        if self.config.policy != "priority":
            return self.wait_feedback
        return self._class_feedback.setdefault(priority, WaitFeedback())

    def observe_finish(self, now: float, held_slot: bool) -> None:
        """A request finished (or was aborted); `held_slot`: it freed a sequence slot."""
        if held_slot:
            self.slot_rate.observe(now)

    def snapshot(self, now: float) -> dict:
        return dict(running_cap=self.view.max_running,
                    num_refused_slo_total=self.num_refused_slo,
                    num_refused_full_total=self.num_refused_full,
                    # under the priority policy: the most important class seen
                    admission_margin_s=self._feedback(
                        min(self._class_feedback, default=0)).margin(self.limit_s),
                    admission_slot_wait_s=self.slot_wait_s(now),
                    admission_predicted_wait_s=self.predicted_wait_s(now))

    def predicted_wait_s(self, now: float) -> float:
        """Seconds a request arriving now would wait for its first token at the tau the
        controller runs now (its own prompt not counted), with the measured error margin: what
        a router compares between engines (0 for an idle one). Before a prefill rate is
        measured, a step per request queued ahead and one for itself."""
        view = self.view
        if view.num_running == 0 and view.num_waiting == 0:
            return 0.0  # an idle engine: no step in flight, no queue ahead
        wait = admission_wait(view.waiting_tokens + view.running_prefill_tokens, 0,
                              self.prefill_rate.tokens_per_s, step_s=self.step_time_s,
                              slot_wait_s=self.slot_wait_s(now))
        if wait is None:
            wait = self.step_time_s * (view.num_waiting + 1)
        return max(0.0, wait + self._feedback(min(self._class_feedback, default=0)).margin(self.limit_s))


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
    added to every later prediction. Bounded to half the limit either way: one stall (or an
    idle engine that beats its prediction) cannot open the gate wide by itself, and it never
    shuts: errors are measured only on admitted requests, so a margin of the whole limit would
    refuse every request and never be measured again; at half of it, requests behind a short
    queue still come in and keep the errors current."""

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
        bound = _MAX_MARGIN_SHARE * limit_s
        return min(max(self._margin, -bound), bound)


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
    `step_s`: a step's latency, added once: a request arrives while a step runs, and its
    prefill ends only at a step boundary; the prefill rate alone counts neither, so near the
    limit it admits requests whose TTFT comes out a step or more over it. `elapsed_s`: the
    time since the request arrived at the server (its TTFT clock started there).
    `slot_wait_s`: the wait for a sequence slot (`slot_wait`); its prefill starts only after
    it."""
    if rate is None or rate <= 0:
        return None
    prefill = max((ahead_tokens + own_tokens) / rate, max(0.0, slot_wait_s) + own_tokens / rate)
    return max(0.0, elapsed_s) + prefill + step_s


def refuse_for(wait_s: Optional[float], limit_s: float) -> Optional[float]:
    """None to admit; else the Retry-After in seconds: how long the queue needs to drain
    until a request like this one would fit under the limit (at least 1 s)."""
    if wait_s is None or wait_s <= limit_s:
        return None
    return max(MIN_RETRY_AFTER_S, math.ceil(wait_s - limit_s))
