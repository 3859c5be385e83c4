"""A small discrete-event model of a continuous-batching MoE engine, to drive controllers.

Requests arrive, get chunk-prefilled under a token budget, then decode one token per
step. Each step's distinct experts touched come from simulating brownout routing
(SPEC 1.3) on sampled top-k assignments over a skewed expert popularity; its latency is
`latency_fn(experts, tokens, has_prefill)` times a little log-normal noise. The step's
rungs come from `controller.choose_rungs`; a step shed to k' < k samples k' experts per
token, and `shed_latency_fn(experts, tokens, has_prefill, k' / k)`, when given, prices the
shed compute. The clock is a FakeClock the controller shares, so the controller sees
simulated time only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from brownout.control import PlannedStep
from brownout.types import StepStats


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class ExpertsOracle:
    """Distinct expert slots touched by one MoE layer under brownout routing."""

    def __init__(self, num_experts: int = 60, top_k: int = 4, way: int = 4, seed: int = 0):
        self.E, self.k, self.way = num_experts, top_k, way
        self.rng = np.random.default_rng(seed)
        pop = 1.0 / np.arange(1, num_experts + 1)
        self.logp = np.log(pop[self.rng.permutation(num_experts)] / pop.sum())

    def touched(self, tau: float, tokens: int, top_k: Optional[int] = None) -> int:
        if tokens <= 0:
            return 0
        k = self.k if top_k is None else min(top_k, self.k)
        g = self.rng.gumbel(size=(tokens, self.E)) + self.logp  # top-k without replacement
        chosen = np.argpartition(-g, k - 1, axis=1)[:, :k]  # the k' most likely of the top-k
        counts = np.bincount(chosen.ravel(), minlength=self.E)
        order = np.lexsort((np.arange(self.E), -counts))
        need = tau * tokens * k
        n_keep = int(np.searchsorted(np.cumsum(counts[order]), need - 1e-9) + 1) if need > 0 else 0
        keep = np.zeros(self.E, bool)
        keep[order[:n_keep]] = True
        used = counts > 0
        redirected = np.flatnonzero(used & ~keep)
        per_group = np.bincount(redirected // self.way, minlength=-(-self.E // self.way))
        # lone redirected members stay themselves; groups of >= 2 become one united slot
        return int((used & keep).sum() + (per_group == 1).sum() + (per_group >= 2).sum())


def paper_like_latency(experts: int, tokens: int, has_prefill: bool) -> float:
    return 0.01 + 0.002 * experts


@dataclass(eq=False)  # identity hash: requests key dicts
class SimRequest:
    arrival: float
    prompt_len: int
    output_len: int
    prefilled: int = 0
    generated: int = 0
    first_token: Optional[float] = None
    finish: Optional[float] = None


@dataclass
class SimResult:
    steps: list[tuple[float, float, bool, float]] = field(default_factory=list)  # end, lat, prefill, tau
    requests: list[SimRequest] = field(default_factory=list)
    top_ks: list[Optional[int]] = field(default_factory=list)  # k' of each step (None: k)

    def taus(self, has_prefill: bool = False) -> np.ndarray:
        return np.array([s[3] for s in self.steps if s[2] == has_prefill])

    def mean_tau(self, t0: float = 0.0, t1: float = np.inf) -> float:
        """Time-weighted mean tau over steps ending in [t0, t1)."""
        sel = [(lat, tau) for end, lat, _, tau in self.steps if t0 <= end < t1]
        if not sel:
            return 1.0
        lat, tau = np.array(sel).T
        return float((lat * tau).sum() / lat.sum())

    def violation_windows(self, slo: dict[bool, float], t0: float = 0.0,
                          t1: float = np.inf, q: float = 90.0) -> int:
        """1-second windows where the P90 step latency of a phase exceeds its SLO."""
        bins: dict[tuple[int, bool], list[float]] = {}
        for end, lat, pre, _ in self.steps:
            if t0 <= end < t1:
                bins.setdefault((int(end), pre), []).append(lat)
        bad = {w for (w, pre), v in bins.items() if np.percentile(v, q) > slo[pre]}
        return len(bad)


def simulate(controller, clock: FakeClock, arrivals: list[tuple[float, int, int]], *,
             until: float, max_num_seqs: int = 64, token_budget: int = 512,
             latency_fn: Callable[[int, int, bool], float] = paper_like_latency,
             noise: float = 0.03, seed: int = 0,
             shed_latency_fn: Optional[Callable[[int, int, bool, float], float]] = None) -> SimResult:
    rng = np.random.default_rng(seed)
    oracle = ExpertsOracle(seed=seed)
    pending = deque(SimRequest(a, p, o) for a, p, o in sorted(arrivals))
    waiting: deque[SimRequest] = deque()
    running: list[SimRequest] = []
    result = SimResult()
    t = clock.t
    while t < until:
        while pending and pending[0].arrival <= t:
            waiting.append(pending.popleft())
        if not running and not waiting:
            if not pending:
                break
            t = pending[0].arrival
            continue
        chunks = _schedule(running, waiting, max_num_seqs, token_budget)
        decode = sum(1 for r in running if r.prefilled >= r.prompt_len and r not in chunks)
        prefill = sum(chunks.values())
        planned = PlannedStep(prefill, decode, len(running), len(waiting),
                              sum(r.prompt_len for r in waiting))
        clock.t = t
        rungs = controller.choose_rungs(planned)
        tau = rungs.tau
        experts = oracle.touched(tau, prefill + decode, rungs.top_k)
        if rungs.top_k is not None and shed_latency_fn is not None:
            base = shed_latency_fn(experts, prefill + decode, prefill > 0, rungs.top_k / oracle.k)
        else:
            base = latency_fn(experts, prefill + decode, prefill > 0)
        lat = base * float(np.exp(rng.normal(0.0, noise)))
        t += lat
        clock.t = t
        _advance(running, chunks, t, controller, result)
        controller.observe_step(StepStats(
            start_time=t - lat, latency_s=lat, num_prefill_tokens=prefill,
            num_decode_tokens=decode, batch_size=planned.batch_size, has_prefill=prefill > 0,
            tau=tau, experts_touched=[experts], num_waiting=len(waiting),
            num_running=len(running), top_k=rungs.top_k))
        result.steps.append((t, lat, prefill > 0, tau))
        result.top_ks.append(rungs.top_k)
    return result


def _schedule(running, waiting, max_num_seqs, budget) -> dict:
    """Prefill chunks for this step (decodes take one token each from the budget first)."""
    budget -= sum(1 for r in running if r.prefilled >= r.prompt_len)
    chunks = {}
    for r in running:
        if r.prefilled < r.prompt_len and budget > 0:
            chunks[id(r)] = n = min(r.prompt_len - r.prefilled, budget)
            budget -= n
    while waiting and len(running) < max_num_seqs and budget > 0:
        r = waiting.popleft()
        running.append(r)
        chunks[id(r)] = n = min(r.prompt_len, budget)
        budget -= n
    return {r: chunks[id(r)] for r in running if id(r) in chunks}


def _advance(running, chunks, t, controller, result) -> None:
    for r in list(running):
        if r in chunks:
            r.prefilled += chunks[r]
            if r.prefilled < r.prompt_len:
                continue
            r.first_token, r.generated = t, 1
        else:
            r.generated += 1
        if r.generated >= r.output_len:
            r.finish = t
            running.remove(r)
            result.requests.append(r)
            tpot = (t - r.first_token) / (r.output_len - 1) if r.output_len > 1 else None
            controller.observe_request(r.first_token - r.arrival, tpot, t)
