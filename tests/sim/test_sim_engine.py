"""The simulated engine: every request accounted for, deterministic for a seed, the real
admission and controller at work, and the bench's files and report."""

import json

import pytest

from brownout.bench.runs import load_run
from brownout.config import SchedulerConfig, SLOConfig
from brownout.control import policy_names
from brownout.sim.profile import PhaseModel, StepCostProfile
from brownout.sim.run import SimSetup, sim_requests, simulate, simulate_requests

WORKLOAD = "step:rate=30,factor=3,at=5,until=10,duration=15"


def _profile(residuals=(-0.05, 0.0, 0.08)):
    coef = dict(one=4.0, batch=0.02, kctx=0.05, experts=0.1, routed=0.4)
    return StepCostProfile("test GPU", "2026-01-01", {
        "decode": PhaseModel(coef, list(residuals)),
        "prefill": PhaseModel(dict(coef, ktokens=9.0), list(residuals))},
        host_gap_s=0.001, request_in_s=0.003, request_out_s=0.003, num_blocks=4096)


def _setup(policy="predictive", seed=0, factor=1.0, timeout=None, profile=None):
    return SimSetup(profile or _profile(),
                    SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512,
                                    admission_ttft_factor=factor, queue_timeout_s=timeout),
                    SLOConfig(policy=policy, ttft_s=0.1, tpot_s=0.012, decode_step_s=0.01,
                              prefill_step_s=0.02, window_s=2, check_interval_s=1), seed=seed)


def _run(setup, workload=WORKLOAD):
    return simulate_requests(sim_requests(workload, "synthetic:prompt_len=200,output_len=40"), setup)


def test_same_seed_same_run_and_another_seed_another():
    a, ma, _ = _run(_setup(seed=3))
    b, mb, _ = _run(_setup(seed=3))
    c, _, _ = _run(_setup(seed=4))
    assert json.dumps(a) == json.dumps(b) and json.dumps(ma) == json.dumps(mb)
    assert json.dumps(a) != json.dumps(c)


@pytest.mark.parametrize("policy", policy_names())
def test_every_request_finishes_or_is_refused(policy):
    recs, scrapes, engine = _run(_setup(policy))
    assert all(r["done"] is not None for r in recs)
    for r in recs:
        if r["status"] == 200:
            assert r["output_tokens"] == r["max_tokens"] == len(r["token_times"])
            assert r["sent"] <= r["first_token"] <= r["done"]
            assert r["token_times"] == sorted(r["token_times"])
        else:
            assert r["rejected"] and r["status"] == 429
    assert not engine.scheduler.requests  # nothing left queued or running
    assert engine.blocks.usage == 0
    assert [s["t"] for s in scrapes] == sorted(s["t"] for s in scrapes)


def test_admission_refuses_under_a_burst_only_with_its_factor():
    refused = sum(r["rejected"] for r in _run(_setup("off", factor=1.0))[0])
    admitted_all = sum(r["rejected"] for r in _run(_setup("off", factor=None))[0])
    assert refused > 0 and admitted_all == 0


def test_queue_timeout_answers_429():
    recs, _, _ = _run(_setup("off", factor=None, timeout=0.05))
    timed_out = [r for r in recs if r["error"] == "queue timeout"]
    assert timed_out and all(r["status"] == 429 for r in timed_out)


def test_brownout_dims_under_the_burst_and_off_never_does():
    reports = {}
    for policy in ("off", "predictive"):
        recs, scrapes, _ = _run(_setup(policy, factor=None))
        reports[policy] = (recs, [s["tau_decode"] for s in scrapes])
    assert min(reports["predictive"][1]) < 1.0
    assert set(reports["off"][1]) == {1.0}


def test_simulate_writes_the_bench_files_and_report(tmp_path):
    report = simulate(WORKLOAD, tmp_path, _setup(), prompts="synthetic:prompt_len=200,output_len=40")
    for name in ("meta.json", "requests.jsonl", "metrics.jsonl", "report.json", "report.md",
                 "latency.png", "tau.png"):
        assert (tmp_path / name).is_file(), name
    run = load_run(tmp_path)
    assert run.meta["simulated"] is True and run.meta["profile"]["machine"] == "test GPU"
    assert report["num_requests"] == len(run.requests) > 0
    assert report["tau"]["mean"] is not None


def test_a_prompt_over_the_context_is_answered_400():
    setup = _setup("off")
    setup.max_model_len = 100
    recs, _, _ = _run(setup, "constant:rate=2,duration=2")
    assert {r["status"] for r in recs} == {400}
