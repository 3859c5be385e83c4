"""The full degradation ladder: the predictive controller with rungs 3 and 4, which cost no
accuracy, taken before dimming (rungs 1 and 2) wherever they suffice.

Every rung is priced as predicted latency gained per unit of accuracy spent. Rungs 3 and 4
spend none, so they are always preferred; the predictive controller then dims (tau, k') only
for what the smaller step still misses.

Rung 3, the step's token budget (the Sarathi-Serve trade), chosen before each step is
scheduled with the same latency model (its prefill fit), among the engine's step sizes (its
captured graphs, so a chosen budget is never padded up), predicted at tau 1 (the undimmed
step):
  TPOT      with D requests decoding, every step adds its latency to each of their TPOTs:
            the TPOT cap is the largest budget whose predicted P90 step (D decodes and
            budget - D prompt tokens) fits the TPOT target, tpot_s * (1 - margin - decode
            pressure); the smallest budget when none does (dimming takes the rest).
  TTFT      the prompt tokens queued and in prefill drain in ceil(tokens / (budget - D))
            steps; the TTFT cap is the smallest budget whose drain (and a step more) fits
            ttft_s * (1 - margin).
  choice    the configured budget (the fastest drain) with no decodes, when the user-facing
            TPOT P90 is under its SLO by the hysteresis with no decode pressure, or when TTFT
            is at risk (prefill pressure, or a growing queue): with many decodes beside it a
            step's fixed cost is large and a smaller chunk pays it for fewer prompt tokens,
            so there dimming answers TPOT. Otherwise (TPOT at risk, TTFT not) the TPOT cap,
            where it suffices: some chunk size meets the TPOT target undimmed and the queue
            still drains in time at it (TTFT cap <= TPOT cap); where it does not, the
            configured budget, and dimming answers TPOT. So a step is smaller under TPOT
            pressure and larger (back to the configured budget) under TTFT pressure.
Rung 4, the running-batch cap: the largest batch B (at most max_num_seqs) whose predicted
TPOT meets the TPOT target, tpot_s * (1 - margin - decode pressure) (the pressure counted
only as far as one sequence still meets the target), at the fastest rung the
controller may count on (min_tau; the smallest priced k' once shed steps confirmed its
speed-up). A decoding sequence's TPOT is the mean period of the steps it rides in, so it is
priced as the mean step of B decodes (the decode fit, plus its residual bias) plus the prompt
work the traffic brings per decode, B * (q_tok * c_tok + q_seq * c_seq): q_tok prompt
tokens and q_seq prefilling sequences per decode token, as measured over the last few
seconds of steps, at the prefill fit's per-token and per-sequence costs (a running batch
held at B takes in new prompts as fast as it finishes requests, so this is what each step
carries on average, whatever the chunking), plus the host time measured between steps.
Past the cap not even the lowest rung meets TPOT, and where not even one sequence meets it
there is no cap (the batch is not what breaks TPOT), so further requests wait (the
scheduler admits none beyond the cap) and TTFT admission, which counts slots up to the cap,
refuses those whose first token would miss. The decode fit alone would not price the
prompt work: it has seen only steps whose tokens equal their sequences.
Until the models are fitted both rungs keep the configured values.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from brownout.control.base import QueueState, register_policy
from brownout.control.predictive import PredictiveController
from brownout.control.windows import DECODE, PREFILL
from brownout.types import StepStats

# the user-facing TPOT P90 is read at most this often: a percentile over the window per step
# would cost host time on every step, and the window moves slowly
TPOT_READ_S = 0.05
# the running cap is recomputed at least this often, as the traffic's prompt mix, the host
# time and the pressure move between refits: a binary search per step would cost host time
CAP_REFRESH_S = 0.25
# the prompt mix and the host time are averaged with this half-life: long enough to span
# many requests' prompts, short enough to follow a burst's mix within a few seconds
MIX_HALF_LIFE_S = 2.0
# a gap between steps counts at most this much: one stalled step (a pause of the host) must
# not move the mean that prices every step
HOST_GAP_CLIP_S = 0.01


@register_policy
class LadderController(PredictiveController):
    name = "ladder"
    # take the cut also where it does not suffice (the larger of the TPOT and the TTFT cap,
    # dimming for the rest): less accuracy spent for slower prefill; off by default, where
    # the simulated H200 runs (benchmarks/results/sim/ladder_sim.md) refuse more with it
    partial_cut = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tpot_read: tuple[float, Optional[float]] = (-math.inf, None)  # (time, TPOT P90)
        self._cap_key: Optional[tuple] = None
        self._cap_time = -math.inf
        # decayed sums: prompt tokens, prefilling sequences, decode tokens; host gaps, steps
        self._mix = np.zeros(3)
        self._gap = np.zeros(2)
        # (time of its end, of the update, whether work was left after it)
        self._last_step: Optional[tuple[float, float, bool]] = None

    # -- rung 3 -------------------------------------------------------------------------
    def choose_token_budget(self, queue: QueueState) -> Optional[int]:
        """The step's budget: a cut one, or the configured one (the largest step size)."""
        budget = self._budget(queue)
        if budget is None and self.budget_sizes:
            budget = self.budget_sizes[-1]
        self.token_budget = budget
        return budget

    def _budget(self, queue: QueueState) -> Optional[int]:
        prompt = queue.running_prefill_tokens + queue.waiting_tokens
        decoding = queue.num_running - queue.num_prefilling
        if not self.ready or prompt <= 0 or decoding <= 0:
            return None
        # TPOT safe, or TTFT at risk: the configured budget drains fastest (dimming, not
        # smaller chunks, then answers TPOT: with many decodes beside it a step's fixed cost
        # is large, and a smaller chunk pays it for fewer prompt tokens)
        if self._ttft_at_risk() or self._tpot_headroom():
            return None
        sizes = [b for b in self.budget_sizes if b >= decoding + self.tuning.min_prefill_chunk]
        if len(sizes) < 2:
            return None
        p90 = self._steps_p90(np.minimum(np.array(sizes), decoding + prompt), decoding + 1)
        if p90 is None:
            return None
        t = self.tuning
        tpot_target = self.slo.tpot_s * (1.0 - t.margin - self._pressure[DECODE])
        fits = np.flatnonzero(p90 <= tpot_target)
        steps = np.array([math.ceil(prompt / (b - decoding)) + 1 for b in sizes])
        drains = np.flatnonzero(steps * p90 <= self.slo.ttft_s * (1.0 - t.margin))
        if fits.size and drains.size and drains[0] <= fits[-1]:  # the cut suffices
            return int(sizes[fits[-1]])
        if not self.partial_cut:  # it does not: the configured budget, dimming answers TPOT
            return None
        i = max(int(fits[-1]) if fits.size else 0, int(drains[0]) if drains.size else len(sizes) - 1)
        return int(sizes[i]) if i < len(sizes) - 1 else None

    def _steps_p90(self, tokens: np.ndarray, batch: int) -> Optional[np.ndarray]:
        """Predicted P90 of undimmed steps of each token count in `tokens`, `batch` requests."""
        theta = self.latency_model(PREFILL).theta  # steps with prompt tokens: prefill steps
        experts = [self.experts.full(float(n)) for n in tokens]
        if theta is None or any(e is None for e in experts):
            return None
        lat = np.maximum(theta[0] + theta[1] * tokens + theta[2] * batch
                         + theta[3] * np.array(experts, dtype=float), 0.0)
        p90 = self._p90(PREFILL, lat)
        return p90 if np.all(np.isfinite(p90)) else None

    def _ttft_at_risk(self) -> bool:
        """The user-facing TTFT P90 is over its SLO while requests wait (prefill pressure), or
        the waiting queue grows."""
        return self._pressure[PREFILL] > 0 or self._queue_growing()

    def _tpot_headroom(self) -> bool:
        """The user-facing TPOT P90 is under its SLO by the hysteresis, without pressure."""
        if self._pressure[DECODE] > 0:
            return False
        now = self._clock()
        if now - self._tpot_read[0] >= TPOT_READ_S:  # a percentile per step costs host time
            self._tpot_read = (now, self.windows.percentile("tpot", self.slo.percentile,
                                                             self.slo.window_s, now))
        p = self._tpot_read[1]
        return p is None or p <= self.slo.tpot_s * (1.0 - self.tuning.hysteresis)

    # -- rung 4 -------------------------------------------------------------------------
    def running_cap(self, queue: QueueState) -> Optional[int]:
        # recomputed when a latency fit was refit, and every CAP_REFRESH_S for the rest
        key = (self.latency.num_samples // self.tuning.refit_every,
               self.phase_latency[DECODE].num_samples // self.tuning.refit_every,
               self.phase_latency[PREFILL].num_samples // self.tuning.refit_every,
               self.latency_model(DECODE) is self.latency, self.latency_model(PREFILL) is self.latency,
               self.credited_shed_ratio(), queue.max_num_seqs)
        now = self._clock()
        if key != self._cap_key or now - self._cap_time >= CAP_REFRESH_S:
            self._cap_key, self._cap_time = key, now
            self.cap = self._cap(queue.max_num_seqs)
        return self.cap

    def _after_step(self, phase: str, stats: StepStats, now: float) -> None:
        super()._after_step(phase, stats, now)
        end = stats.start_time + stats.latency_s
        decay = 1.0
        if self._last_step is not None:
            prev_end, prev_now, busy = self._last_step
            decay = 0.5 ** (max(now - prev_now, 0.0) / MIX_HALF_LIFE_S)
            gap = stats.start_time - prev_end
            if busy and gap >= 0.0:  # with work left the gap is host time, not idling
                self._gap = self._gap * decay + (min(gap, HOST_GAP_CLIP_S), 1.0)
            else:
                self._gap *= decay
        self._last_step = (end, now, stats.num_running > 0 or stats.num_waiting > 0)
        prefilling = stats.batch_size - stats.num_decode_tokens if stats.has_prefill else 0
        self._mix = self._mix * decay + (stats.num_prefill_tokens, max(prefilling, 0),
                                         stats.num_decode_tokens)

    def prompt_mix(self) -> tuple[float, float]:
        """(prompt tokens, prefilling sequences) the recent steps carried per decode token."""
        tokens, seqs, decodes = self._mix
        # under one decode token of weight the ratio says nothing (and may overflow)
        return (tokens / decodes, seqs / decodes) if decodes >= 1.0 else (0.0, 0.0)

    def host_gap_s(self) -> float:
        """Mean host time between the recent steps (pauses for work left out)."""
        total, steps = self._gap
        return total / steps if steps > 0 else 0.0

    def _cap(self, max_num_seqs: int) -> Optional[int]:
        if not self.ready:
            return None
        target = self.slo.tpot_s * (1.0 - self.tuning.margin)
        if self.predicted_tpot(1) > target:
            # no batch meets TPOT: what breaks it is not the batch (the prompt work beside
            # the decodes, or the fit), so a cap would refuse requests and buy no TPOT
            return None
        # the decode pressure tightens the target as far as one sequence still meets it: the
        # cap then shrinks while TPOT is missed, and never vanishes at the peak of pressure
        pressed = target - self.slo.tpot_s * self._pressure[DECODE]
        target = pressed if self.predicted_tpot(1) <= pressed else target
        if self.predicted_tpot(max_num_seqs) <= target:
            return max_num_seqs
        # binary search: predicted TPOT grows with the batch, up to the steps of the experts
        # ratio between token buckets
        lo, hi = 1, max_num_seqs  # the fastest rung meets the target at lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predicted_tpot(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    def predicted_tpot(self, batch: int) -> float:
        """Predicted TPOT of a sequence among `batch` decoding ones at the fastest rung: the
        mean step of `batch` decodes (decode fit and its residual bias), the prompt work the
        recent traffic brings per decode at the prefill fit's costs, and the host gap."""
        lat = self.predict_latency([float(self.grid[-1])], batch, batch, phase=DECODE)
        theta = self.latency_model(PREFILL).theta
        if lat is None or theta is None or not np.isfinite(lat[0]):
            return math.inf
        q_tok, q_seq = self.prompt_mix()
        prompt = batch * (q_tok * max(float(theta[1]), 0.0) + q_seq * max(float(theta[2]), 0.0))
        step = (float(lat[0]) + prompt) * self.credited_shed_ratio() + self._bias[DECODE]
        return max(step, 0.0) + self.host_gap_s()
