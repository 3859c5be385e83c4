"""Replicas behind a router: every request served by one replica, the load spread, the
bench's files unchanged, deterministic for a seed."""

import dataclasses
import json

import pytest

from brownout.sim.fleet import Fleet
from brownout.sim.run import sim_requests, simulate, simulate_requests
from test_sim_engine import _setup

WORKLOAD = "poisson:rate=60,duration=8"
PROMPTS = "synthetic:prompt_len=200,output_len=40"


def _fleet_setup(router, replicas=3, seed=0):
    return dataclasses.replace(_setup("predictive", seed=seed), replicas=replicas, router=router)


@pytest.mark.parametrize("router", ["round_robin", "least_loaded"])
def test_each_request_is_served_by_one_replica_and_the_load_spreads(router):
    recs, scrapes, fleet = simulate_requests(sim_requests(WORKLOAD, PROMPTS), _fleet_setup(router))
    assert isinstance(fleet, Fleet)
    owners = [set(e.records) for e in fleet.replicas]
    assert sum(len(o) for o in owners) == len(recs) == len(set().union(*owners))
    sizes = [len(o) for o in owners]
    assert min(sizes) > 0.2 * max(sizes)
    assert all(r["done"] is not None for r in recs)
    assert all(s["replicas"] == 3 for s in scrapes)


def test_a_fleet_run_is_deterministic_for_a_seed():
    a = simulate_requests(sim_requests(WORKLOAD, PROMPTS), _fleet_setup("least_loaded", seed=2))[0]
    b = simulate_requests(sim_requests(WORKLOAD, PROMPTS), _fleet_setup("least_loaded", seed=2))[0]
    assert json.dumps(a) == json.dumps(b)


def test_more_replicas_serve_a_load_one_cannot(tmp_path):
    one = simulate(WORKLOAD, tmp_path / "one", _fleet_setup("least_loaded", replicas=1),
                   prompts=PROMPTS, plots=False)
    three = simulate(WORKLOAD, tmp_path / "three", _fleet_setup("least_loaded", replicas=3),
                     prompts=PROMPTS, plots=False)
    assert three["goodput_req_s"] > one["goodput_req_s"]
    assert json.loads((tmp_path / "three" / "meta.json").read_text())["replicas"] == 3
