"""Step-cost profiles: a step's latency as a function of its shape and tau, with its noise.

A profile is a JSON file fitted to GPU measurements (`benchmarks/fit_profile.py`). For each
phase (`decode`: steps of decode tokens only; `prefill`: steps with prefill work) it holds a
linear model over named features,

    latency_ms = sum(coef[f] * feature[f])     features from `step_features`:
      one        1
      ktokens    tokens in the step / 1000
      batch      sequences in the step
      kctx       context the step's attention reads: sum over its sequences of
                 (start position + tokens) / 1000
      experts    distinct expert slots touched per MoE layer (`experts_touched`)
      routed     1 when the step runs brownout routing (tau < 1, or k' < k, which the same
                 routing path applies): its fixed cost
      kexpert    tokens in the step / 1000 x k'/k: the expert GEMMs' arithmetic, which
                 expert shedding (k' < k routed experts per token) cuts; a profile fitted
                 without shed steps has no coefficient for it (it equals ktokens there)

with the step padded as its CUDA graph pads it (a decode step to the next captured batch
size, a step with prefill work to the next captured token count; context is not padded),
times a serving factor plus a serving time (the engine's work around a graphed step, fitted
to the step latencies the server reported under load: the time is host work that neither the
step's shape nor its tau changes, so dimming saves a served step less than a graphed one),
and a noise factor drawn from the fit's relative residuals. Experts touched follow uniform top-k routing (the dummy weights' router): a
token picks k of n experts, so T tokens touch n(1 - (1 - k/n)^T) experts at tau 1 and
n/way groups' united experts, each hit when any member is, at tau 0. In between, the share
of that gap a step keeps at tau is the routing's `kept curve`, fitted to the experts the GPU
grid's steps touched (`benchmarks/fit_profile.py`) over tau and the step's prompt share:
brownout routing keeps the hottest experts that cover tau of the step's assignments, and a
prompt chunk's assignments crowd onto few experts, so a prompt-heavy step sheds most of its
experts by tau 0.8 while a decode step sheds them about linearly in tau. A profile without a
curve mixes the two counts linearly in tau.

A phase may name `bound` features (the expert work: `experts`, the weight reads of the
distinct experts, and `kexpert`, the expert GEMMs' arithmetic): their terms combine by max,
not by sum, because the expert layers of a step are bound by whichever of bytes and flops is
larger. A step bound by flops gains nothing from touching fewer experts, so dimming a large
prompt chunk saves only until its weight reads fall under its arithmetic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from brownout.types import SchedulerOutput

FEATURES = ("one", "ktokens", "batch", "kctx", "experts", "routed", "kexpert")
PHASES = ("prefill", "decode")
# a step's latency never falls below this share of its mean, whatever noise is drawn
MIN_NOISE_FACTOR = 0.2
# tokens and context are counted in thousands, so every coefficient is of order one ms
KILO = 1000.0
# the profiles shipped with the package, by name
PROFILE_PACKAGE = "brownout.sim"
PROFILE_DIR = "profiles"
# the max-of-terms fit reassigns each step's bound term at most this often: the assignment
# settles in a few rounds, and a cycle between two assignments must not run forever
BOUND_FIT_ROUNDS = 50


@dataclass(frozen=True, slots=True)
class StepShape:
    """What the latency of one step depends on, besides tau."""

    num_tokens: int
    batch_size: int
    context_tokens: int  # sum over sequences of (start position + tokens)
    has_prefill: bool
    # prompt tokens and prompt chunks (sequences in prefill) of the step; None: one prompt
    # chunk beside batch - 1 decodes
    prompt_tokens: Optional[int] = None
    prompt_seqs: Optional[int] = None

    @classmethod
    def of(cls, sched: SchedulerOutput) -> StepShape:
        ctx = sum(s.start_pos + len(s.token_ids) for s in sched.seqs)
        return cls(sched.num_prefill_tokens + sched.num_decode_tokens, len(sched.seqs), ctx,
                   bool(sched.has_prefill), sched.num_prefill_tokens,
                   len(sched.seqs) - sched.num_decode_tokens)

    @property
    def num_prompt_seqs(self) -> int:
        if not self.has_prefill:
            return 0
        return 1 if self.prompt_seqs is None else max(1, self.prompt_seqs)

    @property
    def phase(self) -> str:
        return "prefill" if self.has_prefill else "decode"

    @property
    def prompt_share(self) -> float:
        """The share of the step's tokens that are prompt tokens (0 for a decode step)."""
        if not self.has_prefill or self.num_tokens <= 0:
            return 0.0
        prompt = self.num_tokens - (self.batch_size - 1) if self.prompt_tokens is None else self.prompt_tokens
        return min(1.0, max(0.0, prompt / self.num_tokens))


@dataclass(frozen=True, slots=True)
class RoutingShape:
    """The MoE routing the experts-touched estimate needs."""

    num_experts: int = 60
    top_k: int = 4
    way: int = 4  # experts per united group
    num_layers: int = 24
    # the kept curve: the share of the gap between the tau-1 and tau-0 expert counts a step
    # keeps, at each of `curve_taus` (rows: each of `curve_prompt_shares`); empty: tau itself
    curve_taus: tuple[float, ...] = ()
    curve_prompt_shares: tuple[float, ...] = ()
    kept_curve: tuple[tuple[float, ...], ...] = ()
    # a prompt chunk of c tokens routes like min(c, prompt_scale * c^prompt_exponent) tokens
    # of different sequences (one sequence's tokens pick alike experts); 0: like c tokens
    prompt_scale: float = 0.0
    prompt_exponent: float = 1.0

    def effective_tokens(self, num_tokens: float, prompt_share: float = 0.0, prompt_seqs: int = 0) -> float:
        """The tokens of different sequences a step's routing spreads like: its decode
        tokens, plus each prompt chunk's tokens as the fitted prompt routing counts them."""
        if self.prompt_scale <= 0.0 or prompt_seqs <= 0 or prompt_share <= 0.0:
            return float(num_tokens)
        prompt = num_tokens * prompt_share
        chunk = prompt / prompt_seqs
        return num_tokens - prompt + prompt_seqs * min(chunk, self.prompt_scale * chunk ** self.prompt_exponent)

    def kept(self, tau: float, prompt_share: float = 0.0) -> float:
        """The share of the gap between the tau-1 and the tau-0 expert counts a step keeps
        at `tau`: the fitted curve, interpolated linearly in tau and in the prompt share."""
        tau = min(1.0, max(0.0, tau))
        if not self.kept_curve:
            return tau
        per_share = [float(np.interp(tau, self.curve_taus, row)) for row in self.kept_curve]
        return float(np.interp(prompt_share, self.curve_prompt_shares, per_share))

    def to_json(self) -> dict[str, Any]:
        d = {"num_experts": self.num_experts, "top_k": self.top_k, "way": self.way,
             "num_layers": self.num_layers}
        if self.prompt_scale > 0.0:
            d |= {"prompt_scale": self.prompt_scale, "prompt_exponent": self.prompt_exponent}
        if self.kept_curve:
            d |= {"curve_taus": list(self.curve_taus), "curve_prompt_shares": list(self.curve_prompt_shares),
                  "kept_curve": [list(r) for r in self.kept_curve]}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoutingShape:
        d = dict(d)
        for key in ("curve_taus", "curve_prompt_shares"):
            d[key] = tuple(d.get(key, ()))
        d["kept_curve"] = tuple(tuple(r) for r in d.get("kept_curve", ()))
        return cls(**d)

    def experts_touched(self, num_tokens: int, tau: float, top_k: Optional[int] = None,
                        prompt_share: float = 0.0, prompt_seqs: int = 0) -> float:
        """Expected distinct expert slots one MoE layer touches for `num_tokens` tokens, each
        routed to `top_k` experts (default: the model's k; fewer when the step sheds), of
        which `prompt_share` are prompt tokens in `prompt_seqs` chunks."""
        num_tokens = self.effective_tokens(num_tokens, prompt_share, prompt_seqs)
        n = self.num_experts
        k = self.top_k if top_k is None else max(1, min(int(top_k), self.top_k))
        full = n * (1.0 - (1.0 - k / n) ** num_tokens)
        groups = n // self.way
        # a group is hit when any of its `way` members is among a token's k picks
        miss = math.comb(n - self.way, k) / math.comb(n, k)
        united = groups * (1.0 - miss ** num_tokens)
        return united + self.kept(tau, prompt_share) * (full - united)


def pad_to(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `n` (n itself past the largest: run without a graph)."""
    for b in buckets:
        if b >= n:
            return b
    return n


def step_features(shape: StepShape, tau: float, routing: RoutingShape,
                  buckets: Optional[dict[str, list[int]]] = None,
                  top_k: Optional[int] = None, exempt_tokens: int = 0) -> dict[str, float]:
    """The fitted features of a step. A shed step (`top_k` k' < k) differs in its experts
    touched, computed at k', and in `kexpert`, the expert GEMMs' share k'/k of its tokens
    (a profile without that coefficient credits shedding with fewer expert reads alone).
    `exempt_tokens` of the step keep tau 1 and the model's k (`mixed_experts`)."""
    tokens, batch = shape.num_tokens, shape.batch_size
    if buckets:
        if shape.has_prefill:
            tokens = pad_to(tokens, buckets.get("prefill_tokens", ()))
        else:
            tokens = batch = pad_to(batch, buckets.get("decode_batch", ()))
    return {"one": 1.0, "ktokens": tokens / KILO, "batch": float(batch),
            "kctx": shape.context_tokens / KILO,
            "experts": mixed_experts(routing, tokens, tau, top_k, exempt_tokens, shape.prompt_share,
                                     shape.num_prompt_seqs),
            "routed": float(tau < 1.0 or kept_share(routing, tokens, top_k) < 1.0),
            "kexpert": tokens / KILO * kept_share(routing, tokens, top_k, exempt_tokens)}


def kept_share(routing: RoutingShape, tokens: int, top_k: Optional[int], exempt_tokens: int = 0) -> float:
    """The share of the model's k routed assignments a step keeps: k'/k for its shed tokens,
    1 for its exempt ones."""
    if top_k is None or top_k >= routing.top_k or tokens <= 0:
        return 1.0
    exempt = max(0, min(int(exempt_tokens), tokens))
    kk = max(1, int(top_k)) / routing.top_k
    return (exempt + (tokens - exempt) * kk) / tokens


def mixed_experts(routing: RoutingShape, tokens: int, tau: float, top_k: Optional[int],
                  exempt_tokens: int = 0, prompt_share: float = 0.0, prompt_seqs: int = 0) -> float:
    """Distinct expert slots of a step whose `exempt_tokens` keep tau 1 and the model's k
    while the rest run at (tau, k'): the union of the two sets, taken as independent draws
    over the routed experts (no profile term was measured for it)."""
    exempt = max(0, min(int(exempt_tokens), tokens))
    if exempt == 0 or (tau >= 1.0 and top_k is None):
        return routing.experts_touched(tokens, tau, top_k, prompt_share, prompt_seqs)
    a = routing.experts_touched(exempt, 1.0)
    b = routing.experts_touched(tokens - exempt, tau, top_k, prompt_share, prompt_seqs) if tokens > exempt else 0.0
    return a + b - a * b / routing.num_experts


@dataclass
class PhaseModel:
    coef: dict[str, float]  # ms per unit of each feature
    residuals: list[float]  # relative residuals of the fit: measured / fitted - 1
    serving_factor: float = 1.0  # served step / graphed step of the same shape
    bound: tuple[str, ...] = ()  # features whose terms combine by max (bytes or flops), not sum
    serving_ms: float = 0.0  # host work around a served step, whatever its shape and tau

    def raw_ms(self, features: dict[str, float]) -> float:
        """The graphed step: the summed terms, plus the largest of the bound ones."""
        raw = sum(c * features[f] for f, c in self.coef.items() if f not in self.bound)
        if self.bound:
            raw += max(self.coef[f] * features[f] for f in self.bound)
        return raw

    def mean_ms(self, features: dict[str, float]) -> float:
        return max(self.raw_ms(features), 0.0) * self.serving_factor + self.serving_ms

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"coef_ms": self.coef, "serving_factor": self.serving_factor}
        if self.serving_ms:
            d["serving_ms"] = self.serving_ms
        if self.bound:
            d["bound"] = list(self.bound)
        return d | {"residuals": [round(r, 5) for r in self.residuals]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PhaseModel:
        return cls(dict(d["coef_ms"]), list(d.get("residuals", [])), d.get("serving_factor", 1.0),
                   tuple(d.get("bound", ())), d.get("serving_ms", 0.0))


@dataclass
class StepCostProfile:
    machine: str
    date: str
    phases: dict[str, PhaseModel]
    routing: RoutingShape = field(default_factory=RoutingShape)
    host_gap_s: float = 0.0  # host time between one step's end and the next one's start
    # more host time between steps per request the engine runs (streaming each one its
    # token, the objects its collector frees): the gap grows with the running load
    host_gap_s_per_running: float = 0.0
    # per policy: [seconds, seconds per running request] of the host gap, where that
    # policy's server spends its own host time between steps (the controller's per-step
    # planning); a policy not named takes host_gap_s and host_gap_s_per_running
    host_gap_by_policy: dict[str, list[float]] = field(default_factory=dict)
    request_in_s: float = 0.0  # client send to engine arrival (HTTP, tokenising, hop)
    request_out_s: float = 0.0  # engine token to client (detokenising, streaming)
    # more time each way per request the engine runs: the server's path in and out streams
    # to every running request, so it slows as they grow
    request_s_per_running: float = 0.0
    num_blocks: int = 32768  # KV blocks of the cache
    block_size: int = 16
    graph_buckets: dict[str, list[int]] = field(default_factory=dict)  # captured CUDA graphs
    sources: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def host_gap(self, policy: Optional[str] = None, running: int = 0) -> float:
        """Host time between a step's end and the next one's start, under `policy` with
        `running` requests in the engine."""
        fixed, per = self.host_gap_by_policy.get(policy or "", (self.host_gap_s, self.host_gap_s_per_running))
        return max(0.0, fixed + per * running)

    def request_in(self, running: int) -> float:
        """Client send to engine arrival with `running` requests in the engine."""
        return self.request_in_s + self.request_s_per_running * running

    def request_out(self, running: int) -> float:
        """Engine token to client with `running` requests in the engine."""
        return self.request_out_s + self.request_s_per_running * running

    def step_latency_s(self, shape: StepShape, tau: float,
                       rng: Optional[np.random.Generator] = None,
                       top_k: Optional[int] = None, exempt_tokens: int = 0) -> float:
        """Mean latency of a step, or one draw with the measured noise when `rng` is given."""
        model = self.phases[shape.phase]
        ms = model.mean_ms(step_features(shape, tau, self.routing, self.graph_buckets, top_k,
                                         exempt_tokens))
        if rng is not None and model.residuals:
            ms *= max(MIN_NOISE_FACTOR, 1.0 + model.residuals[rng.integers(len(model.residuals))])
        return ms / KILO

    def experts_touched(self, shape: StepShape, tau: float, top_k: Optional[int] = None,
                        exempt_tokens: int = 0) -> list[int]:
        """Distinct expert slots per MoE layer, as the runner reports them."""
        e = round(mixed_experts(self.routing, shape.num_tokens, tau, top_k, exempt_tokens,
                                shape.prompt_share, shape.num_prompt_seqs))
        return [e] * self.routing.num_layers

    def to_json(self) -> dict[str, Any]:
        gap: dict[str, Any] = {"host_gap_s": self.host_gap_s}
        if self.host_gap_s_per_running:
            gap["host_gap_s_per_running"] = self.host_gap_s_per_running
        if self.host_gap_by_policy:
            gap["host_gap_by_policy"] = {p: list(v) for p, v in self.host_gap_by_policy.items()}
        return {"machine": self.machine, "date": self.date, "sources": self.sources,
                "routing": self.routing.to_json(), **gap, "request_in_s": self.request_in_s,
                "request_out_s": self.request_out_s,
                "request_s_per_running": self.request_s_per_running, "num_blocks": self.num_blocks,
                "block_size": self.block_size, "graph_buckets": self.graph_buckets, "notes": self.notes,
                "phases": {p: m.to_json() for p, m in self.phases.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepCostProfile:
        return cls(machine=d["machine"], date=d["date"],
                   phases={p: PhaseModel.from_json(m) for p, m in d["phases"].items()},
                   routing=RoutingShape.from_json(d.get("routing", {})),
                   host_gap_s=d.get("host_gap_s", 0.0),
                   host_gap_s_per_running=d.get("host_gap_s_per_running", 0.0),
                   host_gap_by_policy={p: [float(x) for x in v]
                                       for p, v in d.get("host_gap_by_policy", {}).items()},
                   request_in_s=d.get("request_in_s", 0.0),
                   request_out_s=d.get("request_out_s", 0.0),
                   request_s_per_running=d.get("request_s_per_running", 0.0),
                   num_blocks=d.get("num_blocks", 32768), block_size=d.get("block_size", 16),
                   graph_buckets=dict(d.get("graph_buckets", {})),
                   sources=list(d.get("sources", [])), notes=dict(d.get("notes", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_profile(name_or_path: str | Path) -> StepCostProfile:
    """A profile by file path, or by the name of one shipped with the package ('h200')."""
    path = Path(name_or_path)
    if path.is_file():
        return StepCostProfile.from_json(json.loads(path.read_text()))
    shipped = resources.files(PROFILE_PACKAGE).joinpath(PROFILE_DIR, f"{name_or_path}.json")
    if not shipped.is_file():
        raise FileNotFoundError(f"no profile file or shipped profile named {name_or_path!r}")
    return StepCostProfile.from_json(json.loads(shipped.read_text()))


def _solve(X: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge-stabilised least squares with column scaling (one ridge fits all columns)."""
    scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
    Xs = X / scale
    return np.linalg.solve(Xs.T @ Xs + ridge * np.eye(X.shape[1]), Xs.T @ y) / scale


def fit_phase(rows: Sequence[dict[str, float]], latencies_ms: Sequence[float],
              features: Sequence[str], ridge: float = 1e-6, bound: Sequence[str] = ()) -> PhaseModel:
    """Least-squares fit of latency over the named features (ridge-stabilised), with the
    relative residuals kept as the noise distribution. `bound` features (a subset of
    `features`) enter as the max of their terms: the fit alternates between assigning each
    step the bound term that is largest under the current coefficients and refitting with
    only that term active, from each term active everywhere and from the summed fit, and
    keeps the assignment of least squared error."""
    y = np.asarray(latencies_ms, dtype=float)
    bound = tuple(f for f in features if f in bound)
    if len(bound) < 2:
        bound = ()
    summed = [f for f in features if f not in bound]
    X = np.array([[r[f] for f in summed] for r in rows], dtype=float).reshape(len(rows), len(summed))
    if not bound:
        coef = dict(zip(summed, _solve(X, y, ridge)))
    else:
        B = np.array([[r[f] for f in bound] for r in rows], dtype=float)

        def fit(active: np.ndarray) -> tuple[dict[str, float], np.ndarray, float]:
            design = np.hstack([X, B * (active[:, None] == np.arange(len(bound)))])
            c = _solve(design, y, ridge)
            cb = c[len(summed):]
            return (dict(zip(summed + list(bound), c)), np.argmax(B * cb, axis=1),
                    float(np.sum((design @ c - y) ** 2)))

        summed_fit = _solve(np.hstack([X, B]), y, ridge)[len(summed):]
        starts = [np.full(len(rows), j) for j in range(len(bound))] + [np.argmax(B * summed_fit, axis=1)]
        best = None
        for active in starts:
            for _ in range(BOUND_FIT_ROUNDS):
                coef, nxt, sse = fit(active)
                if np.array_equal(nxt, active):
                    break
                active = nxt
            if best is None or sse < best[1]:
                best = (coef, sse)
        coef = best[0]
    model = PhaseModel({f: float(coef[f]) for f in features}, [], bound=bound)
    fitted = np.array([model.raw_ms(r) for r in rows])
    model.residuals = (y / np.maximum(fitted, 1e-9) - 1.0).tolist()
    return model
