"""The host gap between steps: per policy and per running request in the profile, applied by
the simulated engine to the policy it names only, and fitted by benchmarks/fit_profile.py
from the /metrics scrapes a headline run saved."""

import json

import numpy as np
import pytest

from brownout.config import SchedulerConfig, SLOConfig
from brownout.sim.profile import PhaseModel, StepCostProfile, load_profile
from brownout.sim.run import SimSetup, sim_requests, simulate_requests

WORKLOAD = "step:rate=30,factor=3,at=5,until=10,duration=15"
PROMPTS = "synthetic:prompt_len=200,output_len=40"
STEP_COUNTER = "brownout_step_latency_seconds_{kind},phase={phase}"




def _profile(**gap):
    coef = dict(one=4.0, batch=0.02, kctx=0.05, experts=0.1, routed=0.4)
    return StepCostProfile("test GPU", "2026-01-01", {
        "decode": PhaseModel(coef, [0.0]), "prefill": PhaseModel(dict(coef, ktokens=9.0), [0.0])},
        host_gap_s=0.001, request_in_s=0.003, request_out_s=0.003, num_blocks=4096, **gap)


def _run(profile, policy):
    setup = SimSetup(profile, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
                     SLOConfig(policy=policy, ttft_s=0.1, tpot_s=0.012, decode_step_s=0.01,
                               prefill_step_s=0.02, window_s=2, check_interval_s=1))
    recs, _, engine = simulate_requests(sim_requests(WORKLOAD, PROMPTS), setup)
    return json.dumps(recs), engine


def test_a_profile_without_the_term_keeps_one_gap_for_every_policy_and_load():
    p = _profile()
    assert {p.host_gap(policy, running) for policy in ("off", "ladder", None)
            for running in (0, 100)} == {0.001}
    # a profile file of before the term reads back the same and writes no new keys
    d = p.to_json()
    assert "host_gap_by_policy" not in d and "host_gap_s_per_running" not in d
    assert StepCostProfile.from_json(d).host_gap("ladder", 50) == 0.001
    assert load_profile("h200").host_gap("ladder", 100) == load_profile("h200").host_gap_s


def test_the_gap_grows_with_the_running_requests_and_a_named_policy_takes_its_own(tmp_path):
    p = _profile(host_gap_s_per_running=1e-5, host_gap_by_policy={"ladder": [0.002, 2e-5]})
    assert p.host_gap("off", 100) == pytest.approx(0.001 + 1e-3)
    assert p.host_gap("ladder", 100) == pytest.approx(0.002 + 2e-3)
    p.save(tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").to_json() == p.to_json()


def test_the_engine_applies_a_policy_gap_to_that_policy_only():
    plain = _profile()
    slow_predictive = _profile(host_gap_by_policy={"predictive": [0.02, 0.0]})
    # off is not named: its run is the same, step for step
    assert _run(plain, "off")[0] == _run(slow_predictive, "off")[0]
    # predictive is: 20 ms between steps leaves time for fewer steps in the same window
    base, fast = _run(plain, "predictive")
    slow, slowed = _run(slow_predictive, "predictive")
    assert base != slow
    assert sum(slowed.step_count.values()) < sum(fast.step_count.values())


def _scrapes(rng, fixed_s, per_running_s, n=60):
    """One run's /metrics scrapes, a second apart, whose host time per step is known: an
    interval's running load is the mean of its two scrapes'."""
    running = rng.integers(1, 120, n).astype(float)
    out, count, total = [], 0.0, 0.0
    for i in range(n):
        if i:
            steps = float(rng.integers(40, 80))
            gap = fixed_s + per_running_s * (running[i - 1] + running[i]) / 2
            # `steps` steps and their gaps fill the second since the last scrape
            count += steps
            total += 1.0 - steps * gap
        out.append({"t": float(i), "running": running[i], "brownout": {
            STEP_COUNTER.format(kind="count", phase="decode"): count,
            STEP_COUNTER.format(kind="sum", phase="decode"): total,
            STEP_COUNTER.format(kind="count", phase="prefill"): 0.0,
            STEP_COUNTER.format(kind="sum", phase="prefill"): 0.0}})
    return out


def test_the_fit_recovers_a_known_gap_per_policy_from_scrapes(fit_script):
    fit = fit_script
    rng = np.random.default_rng(0)
    off = fit.fit_host_gap(fit.gap_intervals(_scrapes(rng, 0.0006, 5e-6), 0.0, 1e9))
    ladder = fit.fit_host_gap(fit.gap_intervals(_scrapes(rng, 0.0009, 7e-6), 0.0, 1e9))
    assert off == pytest.approx((0.0006, 5e-6), rel=1e-6)
    assert ladder == pytest.approx((0.0009, 7e-6), rel=1e-6)


def test_intervals_outside_the_window_or_starting_empty_are_left_out(fit_script):
    fit = fit_script
    scrapes = _scrapes(np.random.default_rng(1), 0.001, 0.0, n=10)
    scrapes[4]["running"] = 0.0  # an interval that starts or ends empty may hold idle time
    got = fit.gap_intervals(scrapes, 2.0, 8.0)
    # the window holds the intervals 2-3 ... 7-8; the two beside scrape 4 are left out
    assert len(got) == 6 - 2
    assert all(r >= 1 for r, _, _ in got)
