"""SLO controller policies: the "dimmer" that sets the brownout threshold tau per step.

The engine calls, from its single-threaded step loop:
  `choose_tau(planned)` just before a step runs (tau for that step's phase),
  `observe_step(stats)` after it ran, and
  `observe_request(ttft_s, tpot_s, t)` when a request finishes.
Policies (SPEC section 1.4):
  off        tau = 1 always (the exact model).
  fixed      tau = `fixed_tau` always (accuracy tables, ablations).
  aimd       the BrownoutServe paper's controller: every `check_interval_s` take the P90
             of the last `window_s` of step latencies of each phase; above the step SLO
             multiply tau by `shrink_factor`, below `warning_ratio` * SLO add
             `increase_step` (capped at 1), otherwise hold. Phases are independent.
  predictive an online step-latency model picks, before each step, the largest tau whose
             predicted latency meets the SLO (see `brownout.control.predictive`).
Reference: BrownoutServe (the paper's controller is kept here as `aimd`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from brownout.config import SLOConfig
from brownout.control.windows import DECODE, PHASES, PREFILL, LatencyWindows, phase_of
from brownout.types import StepStats, ValidationError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(slots=True)
class PlannedStep:
    """What the scheduler is about to run; all the controller may know before the step."""

    num_prefill_tokens: int  # prompt tokens scheduled in this step (a chunk counts)
    num_decode_tokens: int  # one per decoding request
    batch_size: int  # requests in the step
    num_waiting: int = 0  # requests still queued after this step was scheduled
    waiting_tokens: int = 0  # prompt tokens of those queued requests
    has_prefill: Optional[bool] = None  # default: num_prefill_tokens > 0

    def __post_init__(self) -> None:
        if self.has_prefill is None:
            self.has_prefill = self.num_prefill_tokens > 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def phase(self) -> str:
        return phase_of(bool(self.has_prefill))


class Controller:
    """Base class: latency bookkeeping and violation counters shared by every policy."""

    name = "base"

    def __init__(self, slo: SLOConfig, clock: Clock = time.monotonic):
        self.slo = slo
        self._clock = clock
        # Step latencies per phase and request-level TTFT/TPOT; the horizon covers the
        # longest window any policy looks at.
        horizon = max(slo.window_s, slo.check_interval_s, 10.0)
        self.windows = LatencyWindows(horizon, clock, keys=(*PHASES, "ttft", "tpot"))
        self._tau = {PREFILL: 1.0, DECODE: 1.0}
        self.violations: dict[str, int] = {
            "prefill_step": 0, "decode_step": 0, "ttft": 0, "tpot": 0,
            "prefill_check": 0, "decode_check": 0}

    # -- what the engine reads --------------------------------------------------------
    @property
    def tau_prefill(self) -> float:
        return self._tau[PREFILL]

    @property
    def tau_decode(self) -> float:
        return self._tau[DECODE]

    def step_slo(self, phase: str) -> float:
        return self.slo.prefill_step_s if phase == PREFILL else self.slo.decode_step_s

    def prefill_speedup(self) -> float:
        """How much faster than at its current tau the engine could prefill by dimming to the
        lowest (>= 1). The engine's TTFT admission scales its measured prefill rate by it, so a
        request is refused only when even the fastest tau could not serve it in time, and the
        queue may grow as far as dimming can drain it. Policies without a latency model claim
        no speed-up (they are refused at the rate they serve now)."""
        return 1.0

    def _clamp(self, tau: float) -> float:
        return min(1.0, max(self.slo.min_tau, float(tau)))

    # -- the engine's calls -----------------------------------------------------------
    def choose_tau(self, planned: PlannedStep) -> float:
        phase = planned.phase
        tau = self._clamp(self._decide(phase, planned, self._clock()))
        self._tau[phase] = tau
        return tau

    def observe_step(self, stats: StepStats) -> None:
        phase = phase_of(stats.has_prefill)
        if self.windows.add(phase, stats.latency_s):
            if stats.latency_s > self.step_slo(phase):
                self.violations[f"{phase}_step"] += 1
        self._after_step(phase, stats, self._clock())

    def observe_request(self, ttft_s: Optional[float], tpot_s: Optional[float],
                        t: Optional[float] = None) -> None:
        if ttft_s is not None and self.windows.add("ttft", ttft_s, t):
            self.violations["ttft"] += int(ttft_s > self.slo.ttft_s)
        if tpot_s is not None and self.windows.add("tpot", tpot_s, t):
            self.violations["tpot"] += int(tpot_s > self.slo.tpot_s)

    # -- what policies override -------------------------------------------------------
    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        raise NotImplementedError

    def _after_step(self, phase: str, stats: StepStats, now: float) -> None:
        """Hook after a step was recorded."""


class OffController(Controller):
    name = "off"

    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        return 1.0

    def _clamp(self, tau: float) -> float:
        return 1.0  # "off" means the exact model whatever min_tau says


class FixedController(Controller):
    name = "fixed"

    def __init__(self, slo: SLOConfig, clock: Clock = time.monotonic, fixed_tau: float = 1.0):
        super().__init__(slo, clock)
        if isinstance(fixed_tau, bool) or not isinstance(fixed_tau, (int, float)) \
                or not 0.0 <= fixed_tau <= 1.0:
            raise ValidationError("fixed_tau", f"must be in [0, 1], got {fixed_tau!r}")
        if fixed_tau < slo.min_tau:
            logger.warning("fixed_tau %.3f is below min_tau %.3f; using min_tau",
                           fixed_tau, slo.min_tau)
        self.fixed_tau = self._clamp(fixed_tau)
        self._tau = {PREFILL: self.fixed_tau, DECODE: self.fixed_tau}

    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        return self.fixed_tau


class AIMDController(Controller):
    """The paper's periodic multiplicative-decrease / additive-increase dimmer."""

    name = "aimd"

    def __init__(self, slo: SLOConfig, clock: Clock = time.monotonic):
        super().__init__(slo, clock)
        self._last_check = clock()

    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        self.maybe_check(now)
        return self._tau[phase]

    def _after_step(self, phase: str, stats: StepStats, now: float) -> None:
        self.maybe_check(now)

    def maybe_check(self, now: float) -> bool:
        """Run the periodic check if `check_interval_s` has passed since the last one."""
        if now - self._last_check < self.slo.check_interval_s:
            return False
        # Re-arm from now rather than catching up missed checks after an idle spell.
        self._last_check = now
        for phase in PHASES:
            self._check_phase(phase, now)
        return True

    def _check_phase(self, phase: str, now: float) -> None:
        p = self.windows.percentile(phase, self.slo.percentile, self.slo.window_s, now)
        if p is None:
            return  # no steps of this phase lately: nothing to judge, hold
        slo = self.step_slo(phase)
        tau = self._tau[phase]
        if p > slo:
            self.violations[f"{phase}_check"] += 1
            tau = tau * self.slo.shrink_factor
        elif p < self.slo.warning_ratio * slo:
            tau = min(1.0, tau + self.slo.increase_step)
        self._tau[phase] = self._clamp(tau)
        logger.debug("aimd check %s: p%.0f=%.4fs slo=%.4fs tau=%.3f",
                     phase, self.slo.percentile, p, slo, self._tau[phase])

    def set_tau(self, phase: str, tau: float) -> None:
        """Align the state with a tau chosen elsewhere (the predictive fallback uses it)."""
        self._tau[phase] = self._clamp(tau)


def make_controller(slo: SLOConfig, clock: Clock = time.monotonic,
                    fixed_tau: float = 1.0) -> Controller:
    """The controller named by `slo.policy` (off | fixed | aimd | predictive)."""
    if slo.policy == "off":
        return OffController(slo, clock)
    if slo.policy == "fixed":
        return FixedController(slo, clock, fixed_tau)
    if slo.policy == "aimd":
        return AIMDController(slo, clock)
    if slo.policy == "predictive":
        from brownout.control.predictive import PredictiveController  # avoids an import cycle
        return PredictiveController(slo, clock)
    raise ValidationError("slo_policy", f"must be one of off|fixed|aimd|predictive, "
                                        f"got {slo.policy!r}")
