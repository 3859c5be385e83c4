"""What every SLO controller policy shares: the planned-step contract, the `Controller` base
class (latency windows, violation counters, the engine's three calls) and the policy registry.

The engine calls, from its single-threaded step loop:
  `choose_token_budget(queue)` and `running_cap(queue)` before it schedules a step (the
  ladder's rungs 3 and 4: the step's token budget and the running-batch cap; None keeps the
  configured ones, which is what every policy but `ladder` answers),
  `choose_rungs(planned)` just before a step runs (tau and k' for that step's phase; a
  policy without expert shedding answers `choose_tau(planned)` at the model's k; a step
  holding a request of a class exempt from dimming runs at tau 1 and the model's k),
  `observe_step(stats)` after it ran, and
  `observe_request(ttft_s, tpot_s, t)` when a request finishes.
A policy is a `Controller` subclass registered under its `name` with `@register_policy`;
`make_controller` builds the one `SLOConfig.policy` names, and `brownout.config` checks that
name against `policy_names()`. Importing any module of `brownout.control` runs the package's
`__init__`, which imports every policy, so the registry is complete whenever it is read.
This module imports `brownout.config` for type hints only: config imports the registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, TypeVar

from brownout.control.prices import PriceTable
from brownout.control.windows import DECODE, PHASES, PREFILL, LatencyWindows, phase_of
from brownout.types import Rungs, StepStats, ValidationError

if TYPE_CHECKING:
    from brownout.config import SLOConfig

Clock = Callable[[], float]

# latency samples are kept at least this long, beyond the SLO window and check interval, so
# every policy finds the whole window it reads
MIN_HORIZON_S = 10.0


class QueueState(Protocol):
    """What the controller reads of the scheduler's queue before a step is scheduled (the
    scheduler's `QueueView` is one)."""

    max_num_seqs: int
    num_waiting: int
    num_running: int
    waiting_tokens: int
    running_prefill_tokens: int
    num_prefilling: int


@dataclass(slots=True)
class PlannedStep:
    """What the scheduler is about to run; all the controller may know before the step."""

    num_prefill_tokens: int  # prompt tokens scheduled in this step (a chunk counts)
    num_decode_tokens: int  # one per decoding request
    batch_size: int  # requests in the step
    num_waiting: int = 0  # requests still queued after this step was scheduled
    waiting_tokens: int = 0  # prompt tokens of those queued requests
    has_prefill: Optional[bool] = None  # default: num_prefill_tokens > 0
    exempt: bool = False  # holds a request of a class exempt from dimming (runs undimmed)
    # (prompt tokens still to compute, arrival time on the controller's clock) of every
    # request not yet through its prefill, in the order the scheduler serves them, this
    # step's chunks included (`Scheduler.prefill_queue`; arrival +inf: no first token to
    # wait for); filled for steps with prefill work, () when the engine gives none
    prefill_queue: tuple[tuple[int, float], ...] = ()

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
        horizon = max(slo.window_s, slo.check_interval_s, MIN_HORIZON_S)
        self.windows = LatencyWindows(horizon, clock, keys=(*PHASES, "ttft", "tpot"))
        self._tau = {PREFILL: 1.0, DECODE: 1.0}
        self._top_k: dict[str, Optional[int]] = {PREFILL: None, DECODE: None}  # None: model's k
        self.prices: Optional[PriceTable] = None  # accuracy prices of the rungs (enable_ladder)
        self._spent = {"time": 0.0, "time_price": 0.0, "tokens": 0.0, "token_price": 0.0}
        # rungs 3 and 4 as last chosen (None: the configured step budget and batch size)
        self.token_budget: Optional[int] = None
        self.cap: Optional[int] = None
        # the step token counts the engine runs without padding waste (its captured graphs),
        # ascending, the configured step budget last; a chosen budget is one of them
        self.budget_sizes: tuple[int, ...] = ()
        self.num_exempt_steps = 0  # steps holding an exempt request while the policy dimmed
        # the engine keeps exempt tokens undimmed inside a dimmed step (per-token routing); when
        # False a step holding an exempt request runs undimmed as a whole
        self.exempt_per_token = False
        self.violations: dict[str, int] = {
            "prefill_step": 0, "decode_step": 0, "ttft": 0, "tpot": 0,
            "prefill_check": 0, "decode_check": 0}

    @classmethod
    def create(cls, slo: SLOConfig, clock: Clock, fixed_tau: float) -> Controller:
        """The registry's factory: `make_controller`'s arguments, of which a policy takes
        what it needs (only `fixed` reads `fixed_tau`)."""
        return cls(slo, clock)

    # -- what the engine reads --------------------------------------------------------
    @property
    def tau_prefill(self) -> float:
        return self._tau[PREFILL]

    @property
    def tau_decode(self) -> float:
        return self._tau[DECODE]

    @property
    def top_k_prefill(self) -> Optional[int]:
        return self._top_k[PREFILL]

    @property
    def top_k_decode(self) -> Optional[int]:
        return self._top_k[DECODE]

    def set_step_sizes(self, max_num_batched_tokens: int, sizes: Sequence[int] = ()) -> None:
        """The token counts a step's budget may take: `sizes` (the engine's captured step
        sizes) up to the configured budget, which is always one."""
        self.budget_sizes = tuple(sorted({int(s) for s in sizes if 0 < s < max_num_batched_tokens}
                                         | {int(max_num_batched_tokens)}))

    def enable_ladder(self, prices: PriceTable) -> None:
        """Measured accuracy prices of the rungs: the run's accuracy spent is accounted with
        them, and a policy that sheds experts may choose among the priced k'."""
        self.prices = prices

    def accuracy_spent(self) -> Optional[dict[str, float]]:
        """Mean price (perplexity increase) of the rungs the run's steps used, weighted by step
        time and by step tokens; None without prices."""
        if self.prices is None:
            return None
        s = self._spent
        return {"time_weighted": s["time_price"] / s["time"] if s["time"] > 0 else 0.0,
                "token_weighted": s["token_price"] / s["tokens"] if s["tokens"] > 0 else 0.0}

    def _account(self, stats: StepStats) -> None:
        price = self.prices.price(stats.tau, stats.top_k) if self.prices is not None else None
        if price is None or not stats.latency_s >= 0:
            return
        tokens = stats.num_prefill_tokens + stats.num_decode_tokens
        if tokens > 0 and stats.exempt_tokens:  # exempt tokens ran at tau 1: they spend nothing
            price *= max(0.0, 1.0 - stats.exempt_tokens / tokens)
        s = self._spent
        s["time"] += stats.latency_s
        s["time_price"] += price * stats.latency_s
        s["tokens"] += tokens
        s["token_price"] += price * tokens

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

    def choose_token_budget(self, queue: QueueState) -> Optional[int]:
        """The next step's token budget (rung 3); None: the configured one."""
        return None

    def running_cap(self, queue: QueueState) -> Optional[int]:
        """The running batch's cap (rung 4); None: `max_num_seqs`."""
        return None

    def choose_rungs(self, planned: PlannedStep) -> Rungs:
        """The step's rungs. With per-token exemption (`exempt_per_token`) the step runs at
        them and the exempt tokens keep tau 1 and the model's k inside it; without, a step
        holding an exempt request runs at tau 1 and the model's k as a whole: the policy
        still decides (its clocks and state move as for any step) and its choice is what
        the controller reports, so dimming resumes on the next step."""
        rungs = self._choose_rungs(planned)
        if planned.exempt and (rungs.tau < 1.0 or rungs.top_k is not None):
            self.num_exempt_steps += 1
            if not self.exempt_per_token:
                self._exempted(planned.phase)
                return Rungs(tau=1.0, token_budget=self.token_budget)
        return Rungs(rungs.tau, rungs.top_k, self.token_budget)

    def _choose_rungs(self, planned: PlannedStep) -> Rungs:
        """The policy's tau and k' for the step; policies that shed experts override it."""
        return Rungs(tau=self.choose_tau(planned))

    def _exempted(self, phase: str) -> None:
        """Hook: the step about to run is exempt from the rungs the policy chose."""

    def observe_step(self, stats: StepStats) -> None:
        phase = phase_of(stats.has_prefill)
        self._account(stats)
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


# -- the registry ------------------------------------------------------------------------
ControllerFactory = Callable[["SLOConfig", Clock, float], Controller]  # (slo, clock, fixed_tau)
_POLICIES: dict[str, ControllerFactory] = {}
ControllerClass = TypeVar("ControllerClass", bound=type[Controller])


def register_policy(cls: ControllerClass) -> ControllerClass:
    """Class decorator: `--slo-policy cls.name` builds this controller (via `cls.create`)."""
    if cls.name in _POLICIES:
        raise ValueError(f"two controller policies are named {cls.name!r}")
    _POLICIES[cls.name] = cls.create
    return cls


def policy_names() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(_POLICIES)


def unknown_policy(policy: str) -> ValidationError:
    """The error for a policy name nobody registered, naming the allowed ones."""
    return ValidationError("slo_policy", f"must be one of {'|'.join(policy_names())}, "
                                         f"got {policy!r}")


def make_controller(slo: SLOConfig, clock: Clock = time.monotonic,
                    fixed_tau: float = 1.0) -> Controller:
    """The controller named by `slo.policy` (one of `policy_names()`)."""
    factory = _POLICIES.get(slo.policy)
    if factory is None:
        raise unknown_policy(slo.policy)
    return factory(slo, clock, fixed_tau)
