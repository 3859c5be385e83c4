"""The ladder on the simulated engine: its gauges reach the scrapes, priced rungs are
accounted, priorities reach the engine, and an exempt class runs undimmed."""

import dataclasses

from brownout.config import SchedulerConfig, SLOConfig
from brownout.control.prices import PriceTable
from brownout.sim.profile import PhaseModel, StepCostProfile
from brownout.sim.run import SimSetup, sim_requests, simulate_requests

WORKLOAD = "step:rate=30,factor=3,at=5,until=10,duration=15"
PRICES = {"model_top_k": 4, "prices": [
    {"top_k": 4, "tau": 1.0, "ppl_increase": 0.0}, {"top_k": 4, "tau": 0.0, "ppl_increase": 0.5},
    {"top_k": 2, "tau": 1.0, "ppl_increase": 0.05}, {"top_k": 2, "tau": 0.0, "ppl_increase": 0.6}]}


def _setup(policy="ladder", exempt=None, sched_policy="fcfs"):
    coef = dict(one=4.0, batch=0.02, kctx=0.05, experts=0.1, routed=0.4)
    profile = StepCostProfile("test GPU", "2026-01-01", {
        "decode": PhaseModel(coef, [-0.05, 0.0, 0.08]),
        "prefill": PhaseModel(dict(coef, ktokens=9.0), [-0.05, 0.0, 0.08])},
        host_gap_s=0.001, request_in_s=0.003, request_out_s=0.003, num_blocks=4096,
        graph_buckets={"prefill_tokens": [16, 32, 64, 128, 256, 512]})
    return SimSetup(profile, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512,
                                             admission_ttft_factor=1.0, policy=sched_policy),
                    SLOConfig(policy=policy, ttft_s=0.1, tpot_s=0.012, decode_step_s=0.01,
                              prefill_step_s=0.02, window_s=2, check_interval_s=1,
                              dim_exempt_priority=exempt),
                    prices=PriceTable.from_dict(PRICES))


def _requests(priority=0):
    reqs = sim_requests(WORKLOAD, "synthetic:prompt_len=200,output_len=40")
    return [dataclasses.replace(r, priority=priority) for r in reqs]


def test_ladder_gauges_and_accuracy_reach_the_scrapes():
    recs, scrapes, engine = simulate_requests(_requests(), _setup())
    b = scrapes[-1]["brownout"]
    assert 16 <= b["brownout_step_token_budget"] <= 512
    assert 1 <= b["brownout_running_cap"] <= 64
    assert b["brownout_accuracy_spent,weighting=time"] > 0  # it dimmed under the burst
    assert {s["brownout"]["brownout_top_k,phase=prefill"] for s in scrapes} <= {2.0, 4.0}
    assert all(r["done"] is not None for r in recs)


def test_an_exempt_class_runs_undimmed_and_spends_no_accuracy():
    _, scrapes, engine = simulate_requests(_requests(priority=0), _setup(exempt=0))
    assert engine.controller.accuracy_spent()["time_weighted"] == 0.0
    assert scrapes[-1]["brownout"]["brownout_exempt_steps_total"] > 0
    _, _, engine = simulate_requests(_requests(priority=1), _setup(exempt=0))  # not exempt
    assert engine.controller.num_exempt_steps == 0
    assert engine.controller.accuracy_spent()["time_weighted"] > 0


def test_priorities_reach_the_scheduler():
    reqs = [dataclasses.replace(r, priority=r.index % 3) for r in _requests()]
    recs, _, engine = simulate_requests(reqs, _setup(sched_policy="priority"))
    refused = [sum(r["rejected"] for r in recs if r["index"] % 3 == p) for p in range(3)]
    assert refused[0] <= refused[2]  # the least important class is refused at least as often
