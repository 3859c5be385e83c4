"""SLO controller policies without a latency model: the "dimmer" that sets the brownout
threshold tau per step.

Policies (SPEC section 1.4):
  off        tau = 1 always (the exact model).
  fixed      tau = `fixed_tau` always (accuracy tables, ablations).
  aimd       the BrownoutServe paper's controller: every `check_interval_s` take the P90
             of the last `window_s` of step latencies of each phase; above the step SLO
             multiply tau by `shrink_factor`, below `warning_ratio` * SLO add
             `increase_step` (capped at 1), otherwise hold. Phases are independent.
The `predictive` policy lives in `brownout.control.predictive`; what every policy shares (the
engine's calls, the registry) in `brownout.control.base`.
Reference: BrownoutServe (the paper's controller is kept here as `aimd`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from brownout.control.base import Clock, Controller, PlannedStep, register_policy
from brownout.control.windows import DECODE, PHASES, PREFILL
from brownout.types import StepStats, ValidationError

if TYPE_CHECKING:
    from brownout.config import SLOConfig

logger = logging.getLogger(__name__)


@register_policy
class OffController(Controller):
    name = "off"

    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        return 1.0

    def _clamp(self, tau: float) -> float:
        return 1.0  # "off" means the exact model whatever min_tau says


@register_policy
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

    @classmethod
    def create(cls, slo: SLOConfig, clock: Clock, fixed_tau: float) -> Controller:
        return cls(slo, clock, fixed_tau)

    def _decide(self, phase: str, planned: PlannedStep, now: float) -> float:
        return self.fixed_tau


@register_policy
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

