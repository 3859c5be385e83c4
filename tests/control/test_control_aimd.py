"""The off / fixed / aimd policies on hand-made latency traces and a fake clock."""

import pytest

from brownout.config import SLOConfig
from brownout.control import AIMDController, PlannedStep, make_controller
from brownout.types import StepStats, ValidationError

DECODE_STEP = PlannedStep(num_prefill_tokens=0, num_decode_tokens=8, batch_size=8)
PREFILL_STEP = PlannedStep(num_prefill_tokens=128, num_decode_tokens=4, batch_size=5)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def stats(latency, has_prefill=False, tau=1.0):
    return StepStats(start_time=0.0, latency_s=latency, num_prefill_tokens=128 if has_prefill else 0,
                     num_decode_tokens=8, batch_size=8, has_prefill=has_prefill, tau=tau)


def feed(ctrl, clock, t0, t1, latency, has_prefill=False, dt=0.1):
    """Steps of `latency` ending every dt in (t0, t1]; returns the last tau chosen."""
    tau = None
    n = round((t1 - t0) / dt)
    for i in range(1, n + 1):
        clock.t = t1 if i == n else t0 + i * dt  # land exactly on t1 (check times)
        tau = ctrl.choose_tau(PREFILL_STEP if has_prefill else DECODE_STEP)
        ctrl.observe_step(stats(latency, has_prefill, tau))
    return tau


def aimd(**kw):
    clock = Clock()
    return make_controller(SLOConfig(policy="aimd", **kw), clock), clock


def test_off_and_fixed():
    clock = Clock()
    off = make_controller(SLOConfig(policy="off", min_tau=0.5), clock)
    assert feed(off, clock, 0, 20, 10.0) == 1.0 and off.tau_decode == 1.0
    fixed = make_controller(SLOConfig(policy="fixed"), clock, fixed_tau=0.3)
    assert fixed.choose_tau(DECODE_STEP) == 0.3 and fixed.choose_tau(PREFILL_STEP) == 0.3
    assert fixed.tau_prefill == 0.3
    floored = make_controller(SLOConfig(policy="fixed", min_tau=0.5), clock, fixed_tau=0.3)
    assert floored.choose_tau(DECODE_STEP) == 0.5
    with pytest.raises(ValidationError):
        make_controller(SLOConfig(policy="fixed"), clock, fixed_tau=1.5)


def test_shrinks_by_factor_only_at_checks():
    ctrl, clock = aimd()
    assert isinstance(ctrl, AIMDController)
    assert feed(ctrl, clock, 0.0, 4.9, 0.2) == 1.0  # decode SLO 0.15 violated, no check yet
    assert feed(ctrl, clock, 4.9, 5.0, 0.2) == pytest.approx(0.8)  # first check at t=5
    assert feed(ctrl, clock, 5.0, 9.9, 0.2) == pytest.approx(0.8)  # held until the next one
    assert feed(ctrl, clock, 9.9, 10.0, 0.2) == pytest.approx(0.64)
    assert ctrl.violations["decode_check"] == 2
    assert ctrl.violations["decode_step"] == 100


def test_recovers_below_warning_line_and_holds_between():
    ctrl, clock = aimd()
    feed(ctrl, clock, 0.0, 10.0, 0.2)
    assert ctrl.tau_decode == pytest.approx(0.64)
    feed(ctrl, clock, 10.0, 15.0, 0.1)  # below 0.8 * 0.15 = 0.12
    assert ctrl.tau_decode == pytest.approx(0.74)
    feed(ctrl, clock, 15.0, 20.0, 0.13)  # between the warning line and the SLO
    assert ctrl.tau_decode == pytest.approx(0.74)
    feed(ctrl, clock, 20.0, 40.0, 0.05)
    assert ctrl.tau_decode == 1.0  # capped at 1


def test_only_the_last_window_counts():
    ctrl, clock = aimd()
    feed(ctrl, clock, 0.0, 2.9, 1.0)  # violations outside the 2 s window before t=5
    feed(ctrl, clock, 2.9, 5.0, 0.05)
    assert ctrl.tau_decode == 1.0


def test_percentile_not_mean():
    ctrl, clock = aimd()
    # 3 steps in 20 over the SLO: the P90 is over, the mean (0.08) below the warning line
    t = 3.0
    for i in range(20):
        t += 0.1
        clock.t = t
        ctrl.choose_tau(DECODE_STEP)
        ctrl.observe_step(stats(0.5 if i in (0, 7, 14) else 0.01))
    clock.t = 5.0
    ctrl.choose_tau(DECODE_STEP)
    assert ctrl.tau_decode == pytest.approx(0.8)


def test_phases_are_independent():
    ctrl, clock = aimd()
    for k in range(1, 51):  # alternate prefill and decode steps up to t = 10
        clock.t = k / 5 - 0.1
        ctrl.observe_step(stats(0.4, has_prefill=True, tau=ctrl.choose_tau(PREFILL_STEP)))
        clock.t = k / 5  # prefill SLO 0.25 violated, decode fine
        ctrl.observe_step(stats(0.05, tau=ctrl.choose_tau(DECODE_STEP)))
    assert ctrl.tau_prefill == pytest.approx(0.8 ** 2)
    assert ctrl.tau_decode == 1.0
    assert ctrl.violations["prefill_check"] == 2 and ctrl.violations["decode_check"] == 0


def test_no_data_holds_and_floor_applies():
    ctrl, clock = aimd(min_tau=0.7)
    feed(ctrl, clock, 0.0, 15.0, 1.0)
    assert ctrl.tau_decode == 0.7  # 0.8 * 0.8 = 0.64 floored
    clock.t = 100.0  # long idle: checks see empty windows and hold
    assert ctrl.choose_tau(DECODE_STEP) == 0.7


def test_request_violation_counters():
    ctrl, _ = aimd(ttft_s=1.0, tpot_s=0.1)
    ctrl.observe_request(2.0, 0.05, 0.0)
    ctrl.observe_request(0.5, 0.2, 0.0)
    ctrl.observe_request(None, None, 0.0)
    assert ctrl.violations["ttft"] == 1 and ctrl.violations["tpot"] == 1


def test_planned_step_phase():
    assert PlannedStep(0, 4, 4).has_prefill is False
    assert PlannedStep(10, 4, 5).has_prefill is True
    assert PlannedStep(10, 4, 5, has_prefill=False).phase == "decode"
    assert PlannedStep(10, 4, 5).num_tokens == 14
