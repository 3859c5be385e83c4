"""Several simulated engines behind a router, on one virtual clock.

Each replica is a whole `SimEngine` (its own scheduler, admission and controller) sharing
the clock and event queue; a request reaches the router `request_in_s` after it was sent
and goes to one replica at once:
  round_robin   replicas in turn
  least_loaded  the replica with the fewest requests running and waiting (ties: lowest index)
A replica that refuses a request answers 429 itself; the router does not try another (a
client retries if it wants). The fleet's scrape sums the replicas' queues and averages
their tau, so the bench report reads a fleet run like a single server's.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from brownout.sim.clock import EventQueue, VirtualClock
from brownout.sim.engine import SimEngine, SimRequest, SimSetup

ROUTERS = ("round_robin", "least_loaded")


class Fleet:
    def __init__(self, setup: SimSetup, replicas: int, router: str = "least_loaded"):
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {'|'.join(ROUTERS)}, got {router!r}")
        if replicas < 1:
            raise ValueError(f"a fleet needs at least one replica, got {replicas}")
        self.clock = VirtualClock()
        self.events = EventQueue(self.clock)
        # each replica draws its own noise, from seeds derived from the fleet's
        seeds = np.random.SeedSequence(setup.seed).generate_state(replicas)
        self.replicas = [SimEngine(setup.profile, setup.scheduler, setup.slo, int(seed),
                                   setup.max_model_len, setup.fixed_tau, self.clock, self.events,
                                   setup.prices, setup.exempt_per_token)
                         for seed in seeds]
        self.router = router
        self._turn = itertools.cycle(range(replicas))
        self.request_in_s = setup.profile.request_in_s

    def submit(self, req: SimRequest) -> None:
        self.events.at(req.send_time_s + self.request_in_s, self._route, req)

    def _route(self, req: SimRequest) -> None:
        if self.router == "round_robin":
            engine = self.replicas[next(self._turn)]
        else:
            engine = min(self.replicas, key=lambda e: e.scheduler.view.num_running
                         + e.scheduler.view.num_waiting)
        engine.accept(req)

    def pending(self) -> bool:
        return any(r.rec["done"] is None for e in self.replicas for r in e.records.values())

    def scrape(self) -> dict[str, Any]:
        rows = [e.scrape() for e in self.replicas]
        out = {"t": self.clock(), "replicas": len(rows)}
        for key in ("running", "waiting"):
            out[key] = sum(r[key] for r in rows)
        for key in ("kv_cache_usage", "tau_prefill", "tau_decode"):
            out[key] = sum(r[key] for r in rows) / len(rows)
        return out

    @property
    def step_count(self) -> dict[str, int]:
        return {p: sum(e.step_count[p] for e in self.replicas) for p in ("prefill", "decode")}

    def request_records(self) -> list[dict[str, Any]]:
        recs = [r for e in self.replicas for r in e.request_records()]
        return sorted(recs, key=lambda r: r["index"])
