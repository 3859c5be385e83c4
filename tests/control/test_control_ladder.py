"""The ladder policy's rungs 3 and 4 (the step token budget, the running-batch cap) as
decisions of its latency model, and the dimming exemption of a step (rung 5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from brownout.config import SLOConfig
from brownout.control import PlannedStep, make_controller
from brownout.control.windows import DECODE, PREFILL
from brownout.types import Rungs, StepStats
from simulated_engine import FakeClock

SIZES = (16, 32, 64, 128, 256, 512, 768, 1024)
# latency = 2 ms + 20 us per token + 100 us per sequence (no expert or routing term)
THETA = (2e-3, 2e-5, 1e-4, 0.0, 0.0)


@dataclass
class Queue:
    num_running: int = 0
    num_prefilling: int = 0
    running_prefill_tokens: int = 0
    waiting_tokens: int = 0
    num_waiting: int = 0
    max_num_seqs: int = 128


def _ladder(theta=THETA, **slo):
    clock = FakeClock(10.0)
    ctrl = make_controller(SLOConfig(policy="ladder", **{"tpot_s": 0.02, "ttft_s": 1.0, **slo}), clock)
    ctrl.set_step_sizes(1024, SIZES)
    for tokens in (1, 64, 1024):  # the experts model only needs to be fitted
        ctrl.experts.update(1.0, tokens, 10.0)
    ctrl.latency.theta = np.array(theta)
    ctrl.latency.num_samples = ctrl.tuning.min_samples
    assert ctrl.ready
    return ctrl, clock


def _tpot_pressure(ctrl, clock, tpot_s=0.03):
    for _ in range(10):
        ctrl.observe_request(None, tpot_s, clock())
    clock.t += 0.1  # the controller reads the TPOT window at most every 50 ms


def test_budget_shrinks_under_tpot_pressure():
    ctrl, clock = _ladder()
    queue = Queue(num_running=41, num_prefilling=1, running_prefill_tokens=2000)
    assert ctrl.choose_token_budget(queue) == 1024  # TPOT fine: the configured budget
    _tpot_pressure(ctrl, clock)
    # 40 decodes: a step of b tokens takes 2 + 0.02 b + 4.1 ms; 512 is the largest under
    # the 19 ms target (20 ms TPOT less the 5% margin), and 2000 prompt tokens drain in time
    assert ctrl.choose_token_budget(queue) == 512
    assert ctrl.token_budget == 512
    assert ctrl.choose_rungs(PlannedStep(512, 40, 41)).token_budget == 512


def test_budget_grows_back_under_ttft_pressure():
    ctrl, clock = _ladder()
    _tpot_pressure(ctrl, clock)
    # a queue that would not drain within the TTFT SLO at 512-token steps: the full budget
    queue = Queue(num_running=41, num_prefilling=1, running_prefill_tokens=1000,
                  waiting_tokens=100_000, num_waiting=50)
    assert ctrl.choose_token_budget(queue) == 1024
    queue = Queue(num_running=41, num_prefilling=1, running_prefill_tokens=2000)
    assert ctrl.choose_token_budget(queue) == 512
    ctrl._pressure[PREFILL] = 0.1  # the user-facing TTFT is over its SLO
    assert ctrl.choose_token_budget(queue) == 1024


def test_budget_stays_when_no_chunk_size_meets_tpot_undimmed():
    # 150 us per sequence: 120 decodes alone take 20 ms, over the target at any chunk size
    ctrl, clock = _ladder(theta=(2e-3, 2e-5, 1.5e-4, 0.0, 0.0))
    _tpot_pressure(ctrl, clock)
    queue = Queue(num_running=121, num_prefilling=1, running_prefill_tokens=500)
    assert ctrl.choose_token_budget(queue) == 1024


def test_other_policies_keep_the_configured_budget_and_batch():
    ctrl = make_controller(SLOConfig(policy="predictive"), FakeClock())
    assert ctrl.choose_token_budget(Queue(num_running=4)) is None
    assert ctrl.running_cap(Queue(num_running=4)) is None


def _steps(ctrl, clock, n, *, prompt, decodes, prefilling=1, latency=0.01, gap=0.002):
    """Feed `n` mixed steps of `prompt` prompt tokens beside `decodes` decodes, `gap` apart."""
    for _ in range(n):
        ctrl.observe_step(StepStats(start_time=clock(), latency_s=latency, num_prefill_tokens=prompt,
                                    num_decode_tokens=decodes, batch_size=decodes + prefilling,
                                    has_prefill=prompt > 0, tau=1.0, num_running=decodes))
        clock.t += latency + gap


def test_running_cap_is_the_batch_whose_tpot_meets_the_target_at_the_fastest_rung():
    theta = (2e-3, 2e-5, 5e-4, 0.0, 0.0)  # 0.5 ms per sequence
    ctrl, _ = _ladder(theta=theta)
    cap = ctrl.running_cap(Queue(max_num_seqs=128))

    def tpot(b):  # decode-only traffic, no host gap seen yet: the decode step of b sequences
        return theta[0] + theta[1] * b + theta[2] * b
    assert tpot(cap) <= 0.019 < tpot(cap + 1)
    assert ctrl.cap == cap
    ctrl, _ = _ladder()  # cheap sequences: the cap is max_num_seqs
    assert ctrl.running_cap(Queue(max_num_seqs=64)) == 64


def test_no_running_cap_when_not_even_one_sequence_meets_tpot():
    # 20 ms a step whatever its batch: a cap cannot buy TPOT, it would only refuse requests
    ctrl, _ = _ladder(theta=(2e-2, 2e-5, 1e-4, 0.0, 0.0))
    assert ctrl.running_cap(Queue(max_num_seqs=128)) is None


def test_running_cap_prices_the_prompt_work_per_decode_and_the_host_gap():
    # decode fit: 3.75 ms + 0.1 ms per decode; prefill fit: 10 us a prompt token, 0.5 ms a
    # prefilling sequence. Traffic brings 4 prompt tokens and 0.01 prefilling sequences per
    # decode token, with 2 ms of host time between steps: TPOT(B) = 3.75 ms + 2 ms +
    # B * (0.1 + 0.04 + 0.005) ms, which meets 19 ms up to B = 91 (decodes alone: B = 152)
    ctrl, clock = _ladder(theta=(3.75e-3, 5e-5, 5e-5, 0.0, 0.0))
    prefill = ctrl.phase_latency[PREFILL]
    prefill.theta = np.array([5e-3, 1e-5, 5e-4, 0.0, 0.0])
    prefill.num_samples = ctrl.tuning.min_samples
    ctrl._phase_dimmed[PREFILL] = (1.0, 1.0)  # every step it was fed was dimmed
    assert ctrl.running_cap(Queue(max_num_seqs=256)) == 152
    # 100 decodes and 400 prompt tokens a step, one prefilling sequence every 100 decodes
    _steps(ctrl, clock, 50, prompt=400, decodes=100, prefilling=0)
    _steps(ctrl, clock, 1, prompt=0, decodes=100, prefilling=0)
    q_tok, _ = ctrl.prompt_mix()
    assert q_tok == pytest.approx(4.0, rel=0.05)
    assert ctrl.host_gap_s() == pytest.approx(0.002)
    ctrl._mix[1] = 0.01 * ctrl._mix[2]  # the prefilling sequences per decode, as stated
    clock.t += 1.0  # past the cap's refresh interval
    cap = ctrl.running_cap(Queue(max_num_seqs=256))
    q_tok, _ = ctrl.prompt_mix()

    def tpot(b):
        return 3.75e-3 + 2e-3 + b * (1e-4 + q_tok * 1e-5 + 0.01 * 5e-4)
    assert tpot(cap) <= 0.019 < tpot(cap + 1)
    assert 85 <= cap <= 95


def test_tpot_pressure_lowers_the_running_cap_but_never_lifts_it():
    ctrl, clock = _ladder(theta=(2e-3, 2e-5, 5e-4, 0.0, 0.0))
    before = ctrl.running_cap(Queue(max_num_seqs=128))
    ctrl._pressure[DECODE] = 0.2
    clock.t += 1.0
    pressed = ctrl.running_cap(Queue(max_num_seqs=128))
    assert pressed < before
    ctrl._pressure[DECODE] = 0.9  # past what one sequence meets: the cap stays, unpressured
    clock.t += 1.0
    assert ctrl.running_cap(Queue(max_num_seqs=128)) == before


def test_pauses_for_work_are_not_host_time():
    ctrl, clock = _ladder()
    for _ in range(5):  # each step ends its requests: the engine then idles for work
        ctrl.observe_step(StepStats(start_time=clock(), latency_s=0.01, num_prefill_tokens=0,
                                    num_decode_tokens=8, batch_size=8, has_prefill=False, tau=1.0))
        clock.t += 0.5
    assert ctrl.host_gap_s() == 0.0
    _steps(ctrl, clock, 5, prompt=0, decodes=8, gap=0.001)
    assert ctrl.host_gap_s() == pytest.approx(0.001)


def test_an_exempt_step_is_counted_and_runs_undimmed_without_per_token_exemption():
    ctrl = make_controller(SLOConfig(policy="fixed"), FakeClock(), fixed_tau=0.4)
    assert ctrl.choose_rungs(PlannedStep(16, 0, 1)) == Rungs(tau=0.4)
    assert ctrl.choose_rungs(PlannedStep(16, 0, 1, exempt=True)) == Rungs(tau=1.0)
    assert ctrl.num_exempt_steps == 1
    assert ctrl.tau_prefill == pytest.approx(0.4)  # the policy's own choice is kept
    ctrl.exempt_per_token = True  # the engine keeps exempt tokens undimmed inside the step
    assert ctrl.choose_rungs(PlannedStep(16, 0, 1, exempt=True)) == Rungs(tau=0.4)
    assert ctrl.num_exempt_steps == 2
    off = make_controller(SLOConfig(policy="off"), FakeClock())
    off.choose_rungs(PlannedStep(16, 0, 1, exempt=True))
    assert off.num_exempt_steps == 0  # undimmed anyway: nothing was exempted


def test_running_cap_credits_shedding_only_after_shed_steps_taught_it():
    from brownout.control.prices import PriceTable
    theta = (2e-3, 2e-5, 5e-4, 0.0, 0.0)
    ctrl, _ = _ladder(theta=theta)
    before = ctrl.running_cap(Queue(max_num_seqs=128))
    ctrl.enable_ladder(PriceTable.from_dict({"model_top_k": 4, "prices": [
        {"top_k": 4, "tau": 1.0, "ppl_increase": 0.0}, {"top_k": 1, "tau": 1.0, "ppl_increase": 0.1}]}))
    assert ctrl.credited_shed_ratio() == 1.0  # the prior's guess is not counted on
    assert ctrl.running_cap(Queue(max_num_seqs=128)) == before
