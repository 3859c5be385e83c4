"""Expert shedding in the controllers: prices, the shedding model, the rung choice, the
accuracy accounting, and a prefill-heavy simulated load that tau alone cannot serve."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from brownout.config import SLOConfig
from brownout.control import PlannedStep, make_controller
from brownout.control.prices import PriceTable
from brownout.control.shedding import ShedModel, choose_shed
from brownout.control.tuning import DEFAULT_TUNING
from brownout.types import Rungs, StepStats
from simulated_engine import FakeClock, simulate

# demo-model-like prices: k' = 3 / 2 / 1 of top-4, tau 1 and 0
PRICES = {"model_top_k": 4, "prices": [
    {"top_k": 4, "tau": 1.0, "ppl_increase": 0.0}, {"top_k": 4, "tau": 0.0, "ppl_increase": 0.5},
    {"top_k": 3, "tau": 1.0, "ppl_increase": 0.01}, {"top_k": 3, "tau": 0.0, "ppl_increase": 0.5},
    {"top_k": 2, "tau": 1.0, "ppl_increase": 0.035}, {"top_k": 2, "tau": 0.0, "ppl_increase": 0.55},
    {"top_k": 1, "tau": 1.0, "ppl_increase": 0.15}, {"top_k": 1, "tau": 0.0, "ppl_increase": 0.7}]}

# a compute-bound prefill: 4e-5 s per token, 80% of it in expert GEMMs, which shed with k'/k;
# expert reads are a small term, so tau alone cannot make a 512-token step much faster
SLO = dict(decode_step_s=0.1, tpot_s=0.3, prefill_step_s=0.02, ttft_s=5.0)
STEP_SLO = {True: 0.02, False: 0.1}


def latency(experts, tokens, has_prefill):
    return 0.002 + 4e-5 * tokens + 5e-5 * experts


def shed_latency(experts, tokens, has_prefill, k_share):
    return 0.002 + 4e-5 * tokens * (0.2 + 0.8 * k_share) + 5e-5 * experts


def test_price_table_interpolates_in_tau_and_refuses_unmeasured_k():
    table = PriceTable.from_dict(PRICES)
    assert table.shed_levels == [3, 2, 1]
    assert table.price(1.0) == 0.0 and table.price(0.5) == pytest.approx(0.25)
    assert table.price(0.5, 2) == pytest.approx(0.2925)
    assert table.price(1.0, 9) == 0.0  # k' >= k is the model's k
    partial = PriceTable.from_dict({"model_top_k": 8, "prices": [{"top_k": 4, "tau": 1.0, "ppl_increase": 0.1}]})
    assert partial.price(1.0, 2) is None and partial.price(0.3, 4) == pytest.approx(0.1)
    assert partial.price(1.0) == 0.0


def test_shed_model_learns_the_share_of_latency_that_sheds():
    m = ShedModel(DEFAULT_TUNING, 4)
    assert m.ratio(4) == 1.0 and m.ratio(2) == pytest.approx(1 - DEFAULT_TUNING.shed_prior_share / 2)
    for _ in range(60):  # true share 0.6: a step at k' = 1 takes 1 - 0.6 * 0.75 of the full time
        m.update(1, 0.55, 1.0)
    assert m.share == pytest.approx(0.6, abs=0.01)
    assert m.ratio(2) == pytest.approx(0.7, abs=0.01)  # one share teaches every k'


def test_choose_shed_takes_the_cheapest_rung_that_meets_the_target():
    grid = np.array([1.0, 0.5, 0.0])
    model = ShedModel(DEFAULT_TUNING, 4)
    model.share = 0.8
    p90 = np.array([1.0, 0.97, 0.95])  # tau alone: at best 0.95

    def feasible(target):
        return lambda p: p <= target

    table = PriceTable.from_dict(PRICES)
    # k' 3 at tau 1: 0.8 of the time; k' 2: 0.6; k' 1: 0.4
    assert choose_shed(grid, p90, (0.0, 0.95), feasible(0.85), table, model, 0.9) == (1.0, 3)
    assert choose_shed(grid, p90, (0.0, 0.95), feasible(0.62), table, model, 0.9) == (1.0, 2)
    # nothing meets 0.3: the largest speed-ups (k' 1), the best gain per accuracy among them
    assert choose_shed(grid, p90, (0.0, 0.95), feasible(0.3), table, model, 0.9)[1] == 1


def test_accuracy_spent_is_time_and_token_weighted():
    ctrl = make_controller(SLOConfig(policy="aimd", **SLO), FakeClock())
    assert ctrl.accuracy_spent() is None
    ctrl.enable_ladder(PriceTable.from_dict(PRICES))
    for lat, tokens, tau, k in ((0.3, 100, 1.0, None), (0.1, 300, 1.0, 2)):
        ctrl.observe_step(StepStats(start_time=0.0, latency_s=lat, num_prefill_tokens=tokens,
                                    num_decode_tokens=0, batch_size=1, has_prefill=True, tau=tau,
                                    top_k=k))
    spent = ctrl.accuracy_spent()
    assert spent["time_weighted"] == pytest.approx(0.1 * 0.035 / 0.4)
    assert spent["token_weighted"] == pytest.approx(300 * 0.035 / 400)


def test_without_prices_no_step_is_shed():
    ctrl = make_controller(SLOConfig(policy="predictive", **SLO), FakeClock())
    assert ctrl.choose_rungs(PlannedStep(512, 0, 1)) == Rungs(tau=1.0)


def prefill_heavy(seed=0, rate=6.0, duration=20.0):
    """Long prompts (~2000 tokens), short outputs (~30), Poisson arrivals."""
    rng = np.random.default_rng(seed)
    out, t = [], rng.exponential(1 / rate)
    while t < duration:
        out.append((t, int(rng.integers(1600, 2400)), int(rng.integers(20, 40))))
        t += rng.exponential(1 / rate)
    return out


def run(prices):
    clock = FakeClock()
    ctrl = make_controller(SLOConfig(policy="predictive", **SLO), clock)
    if prices is not None:
        ctrl.enable_ladder(PriceTable.from_dict(prices))
    res = simulate(ctrl, clock, prefill_heavy(), until=25.0, token_budget=512,
                   latency_fn=latency, shed_latency_fn=shed_latency)
    return ctrl, res


def test_prefill_heavy_load_sheds_experts_where_tau_alone_cannot_meet_the_target():
    tau_only_ctrl, tau_only = run(None)
    ladder_ctrl, ladder = run(PRICES)
    assert all(k is None for k in tau_only.top_ks)
    shed = [k for k, (_, _, pre, _) in zip(ladder.top_ks, ladder.steps) if pre and k is not None]
    prefill_steps = sum(1 for s in ladder.steps if s[2])
    assert len(shed) > prefill_steps // 2  # most prefill steps shed
    assert 2 in shed  # the cheapest k' that meets the target, once the model has learnt it
    before, after = tau_only.violation_windows(STEP_SLO), ladder.violation_windows(STEP_SLO)
    assert after < before / 2, (before, after)
    spent = ladder_ctrl.accuracy_spent()
    assert 0.0 < spent["time_weighted"] < 0.2
    assert ladder_ctrl.top_k_prefill in (None, 1, 2, 3)


def test_prefill_speedup_counts_the_smallest_priced_k():
    ladder_ctrl, _ = run(PRICES)
    tau_only_ctrl, _ = run(None)
    assert ladder_ctrl.prefill_speedup() > tau_only_ctrl.prefill_speedup() >= 1.0


def _prefill_trained(prices, tuning=DEFAULT_TUNING):
    """A predictive controller fitted on unshed 512-token prefill steps (`latency`), tau
    from 1 to 0; it has never seen a shed step."""
    from brownout.control.predictive import PredictiveController
    clock = FakeClock()
    ctrl = PredictiveController(SLOConfig(policy="predictive", **SLO), clock, tuning)
    if prices is not None:
        ctrl.enable_ladder(PriceTable.from_dict(prices))
    rng = np.random.default_rng(0)
    for i in range(200):
        clock.t = i * 0.05
        tau = float(rng.choice(np.linspace(0, 1, 11)))
        experts = 60.0 * (0.25 + 0.75 * tau)
        ctrl.observe_step(StepStats(0.0, latency(experts, 512, True), 512, 0, 4, True, tau,
                                    experts_touched=[experts]))
    ctrl.choose_tau(PlannedStep(512, 0, 4))
    return ctrl


def test_prefill_speedup_credits_shedding_only_once_shed_steps_taught_it():
    """Admission lets the queue grow as far as `prefill_speedup` drains it: a speed-up of
    shedding that no shed step has shown (the prior's guess) is not part of it, so the
    controller with prices claims what the tau-only one does; with `shed_credit_samples` 0
    the prior counts. (Once shed steps were seen it counts as learnt:
    test_prefill_speedup_counts_the_smallest_priced_k.)"""
    tau_only = _prefill_trained(None).prefill_speedup()
    assert tau_only > 1.0
    assert _prefill_trained(PRICES).prefill_speedup() == pytest.approx(tau_only)
    prior = dataclasses.replace(DEFAULT_TUNING, shed_credit_samples=0)
    assert _prefill_trained(PRICES, prior).prefill_speedup() > tau_only * 1.2
