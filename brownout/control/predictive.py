"""Predictive SLO controller: pick, before each step, the largest tau that will meet the SLO.

Model (fitted online from `StepStats`, see `brownout.control.latency_model`):
  E(tau, T)        distinct experts touched by a step of T tokens at tau = E1(T) * r(tau)
  L_p(T, B, E)     step latency ~ a + b*T + c*B + d*E + r*routed (ridge, exponential
                   forgetting), one fit per phase p, each fed by its own phase's steps only:
                   a prefill chunk is compute-bound and a decode step memory-bound, so
                   fewer experts save a different share of each, and one fit over both
                   gives prefill the expert slope of the (more numerous) decode steps,
                   mispricing what dimming saves a prefill chunk (the speed-up admission
                   credits). A prediction for phase p uses the pooled fit (every step)
                   while L_p has fewer than `min_samples` steps, no fit yet, or dimmed
                   steps under `phase_fit_dimmed_share` of its (decayed) weight: a phase
                   fit fed mostly undimmed steps cannot tell its expert slope from its
                   intercept (at tau 1 the experts touched barely move), so it would price
                   dimming at nothing and the controller would never dim to learn
                   otherwise, while every dimmed step of either phase teaches the pooled
                   fit. Readiness is the pooled fit's.
  bias, sigma      per phase, moving mean and spread of the out-of-sample residual
                   (observed latency - prediction made before the step); the bias corrects
                   what the linear model misses, sigma prices the noise.
Decision for a planned step of phase p (prefill or decode) with T tokens and B requests:
  target   = SLO_p * (1 - margin - pressure_p - growth)
             SLO_prefill = prefill_step_s; SLO_decode = min(decode_step_s, tpot_s).
             pressure_p rises while the user-facing P90 (TTFT for prefill, TPOT for decode,
             over `window_s`) exceeds its SLO and decays otherwise; for prefill only while
             requests wait (TTFT above the SLO with an empty queue is the window still
             holding a drained backlog: faster steps no longer help it, so the pressure
             decays at `idle_decay` per second); growth is added while
             the waiting queue is growing, so the controller dims before latency breaks.
  P90(tau) = L(T, B, E(tau, T)) + bias_p + z * sigma_p  for tau on a grid 1.0, 0.95, ..., 0
  tau      = the largest grid tau with P90(tau) <= target; for prefill steps with
             prompts to prefill, also, for each prompt i in the order they are served
             (`PlannedStep.prefill_queue`), waited_i + ceil(tokens up to and including
             i / T_prefill) * P90(tau) <= ttft_s * (1 - margin): each prompt gets its first
             token within the TTFT SLO of its arrival, so a queue admitted on the credit of
             dimming (`prefill_speedup`) is dimmed for even while its tail alone would drain
             at the current tau; a prompt no grid tau saves is left out (without the queue,
             the waiting tokens must drain: (waiting_tokens / T + 1) * P90(tau) within the
             same budget); if no tau qualifies, best effort: the
             largest tau that keeps `gain_share` of the speed-up the fastest tau offers over
             tau = 1 (a latency curve flat below some tau stops at that knee rather than
             spend accuracy for the last percent; a decode step while the TPOT P90 is over
             its SLO takes the fastest tau); idle, also any tau within
             `effort_tolerance` of the fastest (tau 1 when the step would be no faster, as
             for a host-bound step, so no accuracy is spent for nothing). With requests
             waiting every percent of step time is a percent of the rate the queue drains
             at, so small gains are taken.
Exploring: where no tau qualifies and steps of this size (log2 of T) were never seen at the
fastest tau often enough to know their own experts ratio, the step runs at the fastest tau
(unshed) instead of best effort: the pooled ratio of other sizes may hide what dimming saves
this one, and a model that prices dimming at nothing never dims to learn otherwise.
Smoothing: lowering is immediate (safety first); raising needs P90 <= target * (1 -
hysteresis) and is limited to `max_raise_per_s` per second, so tau does not flap.
Until the models have `min_samples` steps (or when steps carry no expert counts), the
policy behaves exactly like `aimd`, whose state it keeps in step with its own choices.
Expert shedding (with a price table, `enable_ladder`): when the tau-only choice is
predicted to miss its target, `choose_rungs` considers every (grid tau, priced k' < k) and
takes the cheapest in accuracy that meets the target, else the most speed-up per unit of
accuracy (brownout.control.shedding). A shed step teaches only the shedding model, so the
latency and experts models stay those of the full model.
Every knob named above is a field of `PredictiveTuning` (brownout.control.tuning).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from brownout.control.base import Clock, Controller, PlannedStep, register_policy
from brownout.control.latency_model import ExpertsModel, StepLatencyModel
from brownout.control.policies import AIMDController
from brownout.control.prices import PriceTable
from brownout.control.shedding import ShedModel, choose_shed
from brownout.control.tuning import DEFAULT_TUNING, PredictiveTuning
from brownout.control.windows import DECODE, PHASES, PREFILL
from brownout.types import Rungs, StepStats

if TYPE_CHECKING:
    from brownout.config import SLOConfig

logger = logging.getLogger(__name__)

# two taus (or latencies) closer than this are the same grid point
TAU_EPS = 1e-12
# a log line of the model's view at most this often
LOG_EVERY_S = 5.0
# a phase's own fit, once in use, gives way to the pooled fit only when its dimmed share falls
# under this fraction of the share it needed to enter, so predictions do not flip at the edge
PHASE_FIT_LEAVE_RATIO = 0.5


@register_policy
class PredictiveController(Controller):
    name = "predictive"

    def __init__(self, slo: SLOConfig, clock: Clock = time.monotonic,
                 tuning: PredictiveTuning = DEFAULT_TUNING):
        super().__init__(slo, clock)
        self.tuning = tuning
        self.grid = np.linspace(1.0, 0.0, tuning.grid_points)  # descending: the first fit wins
        self.grid = self.grid[self.grid >= slo.min_tau - TAU_EPS]
        if self.grid.size == 0 or self.grid[-1] > slo.min_tau:
            self.grid = np.append(self.grid, slo.min_tau)
        self.experts = ExpertsModel(tuning)
        self.latency = StepLatencyModel(tuning)  # pooled: every step, the fallback
        self.phase_latency = {p: StepLatencyModel(tuning) for p in PHASES}  # own steps only
        # per phase: decayed weights of (dimmed steps, all steps) its own fit was fed
        self._phase_dimmed = {p: (0.0, 0.0) for p in PHASES}
        self._phase_fit_on = {p: False for p in PHASES}  # the phase's own fit predicts it
        self._fallback = AIMDController(slo, clock)
        self._bias = {p: 0.0 for p in PHASES}
        self._var = {p: 0.0 for p in PHASES}
        self._pressure = {p: 0.0 for p in PHASES}
        self._last_choose = {p: -math.inf for p in PHASES}
        self._pending: Optional[tuple[str, float]] = None  # (phase, predicted latency)
        self._waiting: deque[tuple[float, int]] = deque()
        self._last_pressure_update = clock()
        self._last_log = -math.inf
        self._mode = ""
        self._last_prefill: Optional[tuple[int, int]] = None  # (tokens, batch) of the last prefill plan
        self._shed: Optional[ShedModel] = None  # with a price table listing k' < k
        self._shed_pending: Optional[tuple[str, int, float]] = None  # (phase, k', predicted at k)

    # -- readiness ----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (self.latency.theta is not None and self.experts.ready
                and self.latency.num_samples >= self.tuning.min_samples)

    @property
    def max_pressure(self) -> float:
        """The most SLO pressure tightens a phase's target."""
        return self.tuning.max_pressure

    def target_slo(self, phase: str) -> float:
        """The step latency aimed at: the step SLO, for decode also the TPOT SLO."""
        if phase == PREFILL:
            return self.slo.prefill_step_s
        return min(self.slo.decode_step_s, self.slo.tpot_s)

    def enable_ladder(self, prices: PriceTable) -> None:
        super().enable_ladder(prices)
        self._shed = ShedModel(self.tuning, prices.model_top_k) if prices.shed_levels else None

    # -- prediction ---------------------------------------------------------------------
    def latency_model(self, phase: str) -> StepLatencyModel:
        """The latency fit a step of `phase` is predicted with: the phase's own once it has
        `min_samples` steps, a fit and dimmed steps of at least `phase_fit_dimmed_share` of its
        weight, the pooled one before."""
        model = self.phase_latency[phase]
        share = self.dimmed_share(phase)
        if self._phase_fit_on[phase]:  # hysteresis: predictions do not flip at the threshold
            self._phase_fit_on[phase] = share >= PHASE_FIT_LEAVE_RATIO * self.tuning.phase_fit_dimmed_share
        else:
            self._phase_fit_on[phase] = share >= self.tuning.phase_fit_dimmed_share
        if (self._phase_fit_on[phase] and model.theta is not None
                and model.num_samples >= self.tuning.min_samples):
            return model
        return self.latency

    def dimmed_share(self, phase: str) -> float:
        """The share of dimmed steps in the weight of `phase`'s own fit (its forgetting
        applied to both), 0 before any step."""
        dimmed, total = self._phase_dimmed[phase]
        return dimmed / total if total > 0 else 0.0

    def predict_latency(self, taus, tokens: int, batch: int, *, phase: str) -> Optional[np.ndarray]:
        """Model-only latency (no bias) of a `phase` step at each tau; None when unfit."""
        theta = self.latency_model(phase).theta
        experts = self.experts.predict(np.atleast_1d(np.asarray(taus, dtype=float)), max(tokens, 1))
        if experts is None or theta is None:
            return None
        routed = (np.atleast_1d(np.asarray(taus, dtype=float)) < 1.0).astype(float)
        return np.maximum(theta[0] + theta[1] * tokens + theta[2] * batch + theta[3] * experts
                          + theta[4] * routed, 0.0)

    def prefill_speedup(self) -> float:
        """Predicted latency of the last planned prefill step at the current rung over that at
        the fastest (the lowest tau, and the smallest priced k' when shedding; 1.0 until the
        model is fitted). Shedding counts only once `shed_credit_samples` shed steps taught
        its model: admission lets the queue grow as far as this speed-up drains it, so it
        holds only what the controller has seen the rungs deliver, not the prior's guess."""
        if not self.ready or self._last_prefill is None:
            return 1.0
        lat = self.predict_latency([self._tau[PREFILL], float(self.grid[-1])], *self._last_prefill,
                                   phase=PREFILL)
        if lat is None or not np.all(np.isfinite(lat)) or lat[1] <= 0:
            return 1.0
        if self._shed is not None and self._shed.num_samples >= self.tuning.shed_credit_samples:
            # the fastest rung also sheds to the smallest priced k'
            lat[1] *= self._shed.ratio(min(self.prices.shed_levels))
            if self._top_k[PREFILL] is not None:
                lat[0] *= self._shed.ratio(self._top_k[PREFILL])
        return max(1.0, float(lat[0] / lat[1]))

    def _p90(self, phase: str, lat: np.ndarray) -> np.ndarray:
        return lat + self._bias[phase] + self.tuning.z * math.sqrt(self._var[phase])

    # -- decision -----------------------------------------------------------------------
    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        self._note_waiting(now, planned.num_waiting)
        self._pending = None
        self._mode = ""
        if phase == PREFILL:
            self._last_prefill = (planned.num_tokens, planned.batch_size)
        prev = self._tau[phase]
        taus = np.append(self.grid, prev)  # the grid, then the current tau
        lat = self.predict_latency(taus, planned.num_tokens, planned.batch_size, phase=phase) \
            if self.ready else None
        if lat is None or not np.all(np.isfinite(lat)):
            tau = self._fallback.choose_tau(planned)
            self._last_choose[phase] = now
            return tau
        p90 = self._p90(phase, lat)
        tau = self._pick(phase, planned, p90, now)
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self._log_decision(phase, planned, tau, p90)
        self._last_choose[phase] = now
        self._fallback.set_tau(phase, tau)
        hit = np.flatnonzero(np.abs(taus - tau) < TAU_EPS)
        pred = lat[hit[:1]] if hit.size else \
            self.predict_latency([tau], planned.num_tokens, planned.batch_size, phase=phase)
        self._pending = (phase, float(pred[0]))
        return tau

    def _exempted(self, phase: str) -> None:
        # the step runs at tau 1, not at the rung predicted for it: no residual to learn
        self._pending = None
        self._shed_pending = None

    def _choose_rungs(self, planned: PlannedStep) -> Rungs:
        """The tau-only choice, or a shed rung (tau, k') when that choice misses its target."""
        tau = self.choose_tau(planned)
        phase = planned.phase
        self._top_k[phase] = None
        self._shed_pending = None
        # an exploring step runs unshed: a shed step does not teach the experts model
        rung = self._shed_rung(phase, planned, tau) \
            if self._shed is not None and self._mode != "explore" else None
        if rung is None:
            return Rungs(tau=tau)
        tau, top_k = rung
        self._tau[phase] = tau
        self._top_k[phase] = top_k
        self._fallback.set_tau(phase, tau)
        return Rungs(tau=tau, top_k=top_k)

    def _shed_rung(self, phase: str, planned: PlannedStep, tau: float) -> Optional[tuple[float, int]]:
        if not self.ready or self._pending is None:
            return None
        lat = self.predict_latency(np.append(self.grid, tau), planned.num_tokens, planned.batch_size,
                                   phase=phase)
        if lat is None or not np.all(np.isfinite(lat)):
            return None
        p90 = self._p90(phase, lat)
        target = self._target(phase)

        fastest = self._credited_fastest_p90(p90[:-1])

        def feasible(p: np.ndarray) -> np.ndarray:
            return self._feasible(phase, planned, p, target, fastest)

        if feasible(p90[-1:])[0]:  # tau alone meets the target: no accuracy spent on k'
            return None
        rung = choose_shed(self.grid, p90[:-1], (tau, float(p90[-1])), feasible, self.prices,
                           self._shed, self.tuning.gain_share)
        if rung is not None:
            i = int(np.argmin(np.abs(self.grid - rung[0])))
            self._pending = None  # the residual tracks the full model's steps only
            self._shed_pending = (phase, rung[1], float(lat[i]))
            self._mode = f"shed to k' {rung[1]}"
        return rung

    def _observe_shed(self, phase: str, stats: StepStats) -> None:
        """A shed step: observed latency over the full model's prediction teaches g(k')."""
        pending, self._shed_pending, self._pending = self._shed_pending, None, None
        if pending is not None and self._shed is not None and pending[:2] == (phase, stats.top_k):
            self._shed.update(stats.top_k, stats.latency_s, pending[2] + self._bias[phase])

    def _log_decision(self, phase: str, planned: PlannedStep, tau: float, p90: np.ndarray) -> None:
        """What the model believes, now and then: enough to tell afterwards why it dimmed so far."""
        at = {t: float(p90[int(np.argmin(np.abs(self.grid - t)))]) * 1e3 for t in (1.0, 0.5, 0.0)}
        theta = self.latency_model(phase).theta
        logger.info(
            "predictive %s step of %d tokens / %d seqs, %d waiting: tau %.2f (%s); predicted P90 "
            "%.1f / %.1f / %.1f ms at tau 1 / 0.5 / 0 against a target of %.1f ms; latency model "
            "a %.2f ms, per token %.2f us, per seq %.2f us, per expert slot %.2f us, routing %.2f ms; "
            "experts at tau 0.5 / 0: %.2f / %.2f of tau 1", phase, planned.num_tokens,
            planned.batch_size, planned.num_waiting, tau, self._mode, at[1.0], at[0.5], at[0.0],
            self._target(phase) * 1e3, theta[0] * 1e3, theta[1] * 1e6, theta[2] * 1e6, theta[3] * 1e6,
            theta[4] * 1e3, *self.experts.ratio(np.array([0.5, 0.0]), max(planned.num_tokens, 1)))

    def _target(self, phase: str) -> float:
        growth = self.tuning.growth_margin if self._queue_growing() else 0.0
        return self.target_slo(phase) * (1.0 - self.tuning.margin - self._pressure[phase] - growth)

    def credited_shed_ratio(self) -> float:
        """The latency ratio of the smallest priced k' that admission and the running cap may
        count on: 1 until `shed_credit_samples` shed steps taught the shedding model."""
        if self._shed is not None and self._shed.num_samples >= self.tuning.shed_credit_samples:
            return self._shed.ratio(min(self.prices.shed_levels))
        return 1.0

    def _credited_fastest_p90(self, p90_grid: np.ndarray) -> float:
        """The P90 of the fastest rung admission credits (`prefill_speedup`): the fastest
        grid tau, shed to the smallest priced k' once shed steps have shown what it saves."""
        fastest = float(np.min(p90_grid))
        if self._shed is not None and self._shed.num_samples >= self.tuning.shed_credit_samples:
            fastest *= self._shed.ratio(min(self.prices.shed_levels))
        return fastest

    def _feasible(self, phase: str, planned: PlannedStep, p90: np.ndarray,
                  target: float, fastest: Optional[float] = None) -> np.ndarray:
        """Which rungs of predicted P90 `p90` meet the step target and, for prefill, every
        savable queued prompt's first token (`fastest`: the fastest rung's P90, what
        savable is judged by; default: the fastest in `p90`)."""
        ok = p90 <= target
        if phase != PREFILL or planned.num_tokens <= 0:
            return ok
        budget = self.slo.ttft_s * (1.0 - self.tuning.margin)
        if planned.prefill_queue and planned.num_prefill_tokens > 0:
            # later steps take the configured budget less the decodes beside them, whatever
            # this step takes (a prompt's tail, or what the free slots and blocks allowed)
            full = max(self.budget_sizes) if self.budget_sizes else planned.num_prefill_tokens
            later = max(planned.num_prefill_tokens, full - planned.num_decode_tokens)
            ok &= queue_meets_ttft(planned.prefill_queue, planned.num_prefill_tokens, p90,
                                   self._clock(), budget, fastest, later_chunk=later)
        elif planned.waiting_tokens > 0:
            # the last waiting prompt's first token: the queue's drain time plus its own step
            drain = planned.waiting_tokens * p90 / planned.num_tokens + p90
            ok &= drain <= budget
        return ok

    def _pick(self, phase: str, planned: PlannedStep, p90: np.ndarray, now: float) -> float:
        """p90: predicted P90 latency at each grid tau, then at the current tau."""
        target = self._target(phase)
        prev = self._tau[phase]
        fastest = self._credited_fastest_p90(p90[:-1])
        ok = self._feasible(phase, planned, p90, target, fastest)
        ok_grid, ok_prev = ok[:-1], bool(ok[-1])
        if not ok_prev:  # dim at once to the largest tau that qualifies (or best effort)
            if ok_grid.any():
                self._mode = "dim"
                return float(self.grid[np.argmax(ok_grid)])
            if not planned.exempt and not self.experts.bucket_known(planned.num_tokens,
                                                                       float(self.grid[-1])):
                # no rung meets the target, and what dimming saves a step of this size was
                # never seen: the pooled experts ratio of other sizes may hide it (a handful
                # of tokens keeps most of its experts at tau 0, a large chunk few), so the
                # fastest tau is tried until the size's own ratio is known
                self._mode = "explore"
                return float(self.grid[-1])
            urgent = phase == DECODE and self._pressure[DECODE] > 0
            self._mode = "best effort, fastest" if urgent else "best effort"
            return self._best_effort(p90[:-1], queued=planned.num_waiting > 0,
                                     noise=self.tuning.noise_sigmas * math.sqrt(self._var[phase]),
                                     fastest_only=urgent)
        self._mode = "hold or raise"
        # Raise only with headroom (hysteresis), and only so fast.
        ok_up = self._feasible(phase, planned, p90[:-1], target * (1.0 - self.tuning.hysteresis),
                               fastest)
        up = float(self.grid[np.argmax(ok_up)]) if ok_up.any() else prev
        if up <= prev:
            return prev
        dt = now - self._last_choose[phase]
        return min(up, prev + self.tuning.max_raise_per_s * max(dt, 0.0))

    def _best_effort(self, p90_grid: np.ndarray, queued: bool = False, noise: float = 0.0,
                     fastest_only: bool = False) -> float:
        """No tau meets the target: spend accuracy only as far as it buys speed, i.e. the
        largest tau that keeps `gain_share` of the speed-up the fastest tau offers over tau = 1.
        A latency curve flat below some tau (a compute-bound prefill chunk, where fewer distinct
        experts stop saving time) stops at that knee instead of sliding to the bottom for the
        last percent. Idle, also any tau within `effort_tolerance` of the fastest (tau 1 for a
        host-bound step, which dimming would not speed up); while requests wait every percent of
        step time is a percent of drain rate, so small gains are taken. A gain no larger than
        `noise` (`noise_sigmas` times the spread of one step's latency around the model) is not
        told apart from it: tau stays 1, since a gain the step noise hides costs accuracy and
        buys nothing.
        `fastest_only` (decode steps while the TPOT P90 is over its SLO): every decode step's
        time adds to every running request's TPOT, so the knee's last tenth of the speed-up is
        taken too, down to the fastest tau: decode held at the knee leaves TPOT windows that
        the fastest tau closes."""
        fastest = float(p90_grid.min())
        gain = max(float(p90_grid[0]) - fastest, 0.0)  # grid[0] is tau = 1
        if gain <= noise:
            return float(self.grid[0])
        if fastest_only:
            return float(self.grid[np.argmax(p90_grid <= fastest + TAU_EPS)])
        allowed = fastest + (1.0 - self.tuning.gain_share) * gain
        if not queued:
            allowed = max(allowed, fastest * (1.0 + self.tuning.effort_tolerance))
        near = p90_grid <= allowed + TAU_EPS
        return float(self.grid[np.argmax(near)])

    # -- feedback -----------------------------------------------------------------------
    def _after_step(self, phase: str, stats: StepStats, now: float) -> None:
        self._fallback.observe_step(stats)
        self._update_pressure(now)
        if stats.top_k is not None:  # a shed step teaches the shedding model only
            self._observe_shed(phase, stats)
            return
        lat = stats.latency_s
        if lat is None or not math.isfinite(lat) or lat < 0:
            self._pending = None
            return
        tokens = stats.num_prefill_tokens + stats.num_decode_tokens
        if stats.experts_touched:
            experts = float(sum(stats.experts_touched))
            if not stats.exempt_tokens:  # exempt tokens kept their experts: not the tau's count
                self.experts.update(stats.tau, tokens, experts)
            routed = float(stats.tau < 1.0)
            decay = self.phase_latency[phase].decay
            dimmed, total = self._phase_dimmed[phase]
            self._phase_dimmed[phase] = (decay * dimmed + routed, decay * total + 1.0)
            for model in (self.latency, self.phase_latency[phase]):
                model.add(tokens, stats.batch_size, experts, lat, routed)
                # The fit moves slowly: refitting every few steps saves host time per step.
                if model.theta is None or model.num_samples % self.tuning.refit_every == 0:
                    model.fit()
        if self._pending is not None and self._pending[0] == phase:
            self._update_residual(phase, lat - self._pending[1], self._pending[1])
        self._pending = None

    def _update_residual(self, phase: str, residual: float, predicted: float = 0.0) -> None:
        """Moving mean and spread of the residual. A deviation is clipped to `clip_sigmas`
        sigma, or `clip_share_of_prediction` of the predicted latency when larger (the floor
        while sigma is still small), so one stalled step (a pause of the host, ten times a
        normal step) moves the prediction by a little, not by the stall; a lasting change still
        gets through, a clipped step at a time, and the latency fit follows it too."""
        t = self.tuning
        a = t.residual_alpha
        dev = residual - self._bias[phase]
        cap = max(t.clip_sigmas * math.sqrt(self._var[phase]),
                  t.clip_share_of_prediction * abs(predicted))
        if cap > 0:
            dev = max(-cap, min(cap, dev))
        self._bias[phase] += a * dev
        self._var[phase] = (1 - a) * (self._var[phase] + a * dev * dev)

    def _update_pressure(self, now: float) -> None:
        """Every `pressure_interval_s`: tighten a phase's target while its user-facing SLO is
        missed."""
        t = self.tuning
        if now - self._last_pressure_update < t.pressure_interval_s:
            return
        self._last_pressure_update = now
        queue_empty = not self._waiting or self._waiting[-1][1] == 0
        for phase, key, slo in ((PREFILL, "ttft", self.slo.ttft_s),
                                (DECODE, "tpot", self.slo.tpot_s)):
            p = self.windows.percentile(key, self.slo.percentile, self.slo.window_s, now)
            if phase == PREFILL and queue_empty:
                self._pressure[phase] = max(0.0, self._pressure[phase] - t.idle_decay)
            elif p is not None and p > slo:
                self._pressure[phase] = min(t.max_pressure, self._pressure[phase] + t.pressure_rise)
            else:
                self._pressure[phase] = max(0.0, self._pressure[phase] - t.pressure_fall)

    def _note_waiting(self, now: float, num_waiting: int) -> None:
        self._waiting.append((now, int(num_waiting)))
        while self._waiting and self._waiting[0][0] < now - self.tuning.queue_growth_window_s:
            self._waiting.popleft()

    def _queue_growing(self) -> bool:
        if len(self._waiting) < 2:
            return False
        return self._waiting[-1][1] > self._waiting[0][1] and self._waiting[-1][1] > 0


def queue_meets_ttft(queue: Sequence[tuple[int, float]], chunk: int, p90: np.ndarray, now: float,
                     budget_s: float, fastest_s: Optional[float] = None,
                     later_chunk: Optional[int] = None) -> np.ndarray:
    """Whether every queued prompt that can still make it gets its first token within
    `budget_s` of its arrival, at each latency in `p90` (a step's P90 at each rung).
    `queue`: (prompt tokens still to compute, arrival time) in the order they are served,
    this step's chunks included (`PlannedStep.prefill_queue`); `chunk`: the prompt tokens a
    step takes, `later_chunk` those of each later step (default: `chunk`). A prompt's first
    token comes at the end of the step that computes its last token: this step for the
    prompts it finishes, else 1 + ceil((its own and all earlier tokens - chunk) /
    later_chunk) steps from now. Prompts held back by sequence slots or KV blocks rather
    than by tokens are not modelled. The check counts
    the time a prompt has already waited, so a queue admitted on the credit of dimming
    (`prefill_speedup`) is dimmed for, although its tail alone would drain at the current
    rung. A prompt that misses even at `fastest_s` (the fastest rung's P90; default: the
    smallest in `p90`), having waited too long already, is left out: no rung saves it, and
    counting it would dim every step until it is served."""
    tokens = np.array([t for t, _ in queue], dtype=float)
    left = budget_s - (now - np.array([a for _, a in queue], dtype=float))  # inf: no deadline
    later = max(int(later_chunk if later_chunk is not None else chunk), 1)
    steps = 1.0 + np.ceil(np.maximum(np.cumsum(tokens) - chunk, 0.0) / later)
    p90 = np.atleast_1d(np.asarray(p90, dtype=float))
    fastest = float(p90.min()) if fastest_s is None else min(fastest_s, float(p90.min()))
    savable = steps * fastest <= left
    return (steps[savable, None] * p90[None, :] <= left[savable, None]).all(axis=0)
