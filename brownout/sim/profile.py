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
times a serving factor (the engine's host work around a graphed step, fitted to the step
latencies the server reported under load), and a noise factor drawn from the fit's relative
residuals. Experts touched follow uniform top-k routing (the dummy weights' router): a
token picks k of n experts, so T tokens touch n(1 - (1 - k/n)^T) experts at tau 1 and
n/way groups' united experts, each hit when any member is, at tau 0; in between the two
mix linearly in tau.
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


@dataclass(frozen=True, slots=True)
class StepShape:
    """What the latency of one step depends on, besides tau."""

    num_tokens: int
    batch_size: int
    context_tokens: int  # sum over sequences of (start position + tokens)
    has_prefill: bool

    @classmethod
    def of(cls, sched: SchedulerOutput) -> StepShape:
        ctx = sum(s.start_pos + len(s.token_ids) for s in sched.seqs)
        return cls(sched.num_prefill_tokens + sched.num_decode_tokens, len(sched.seqs), ctx,
                   bool(sched.has_prefill))

    @property
    def phase(self) -> str:
        return "prefill" if self.has_prefill else "decode"


@dataclass(frozen=True, slots=True)
class RoutingShape:
    """The MoE routing the experts-touched estimate needs."""

    num_experts: int = 60
    top_k: int = 4
    way: int = 4  # experts per united group
    num_layers: int = 24

    def experts_touched(self, num_tokens: int, tau: float, top_k: Optional[int] = None) -> float:
        """Expected distinct expert slots one MoE layer touches for `num_tokens` tokens, each
        routed to `top_k` experts (default: the model's k; fewer when the step sheds)."""
        n = self.num_experts
        k = self.top_k if top_k is None else max(1, min(int(top_k), self.top_k))
        full = n * (1.0 - (1.0 - k / n) ** num_tokens)
        groups = n // self.way
        # a group is hit when any of its `way` members is among a token's k picks
        miss = math.comb(n - self.way, k) / math.comb(n, k)
        united = groups * (1.0 - miss ** num_tokens)
        tau = min(1.0, max(0.0, tau))
        return tau * full + (1.0 - tau) * united


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
            "experts": mixed_experts(routing, tokens, tau, top_k, exempt_tokens),
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
                  exempt_tokens: int = 0) -> float:
    """Distinct expert slots of a step whose `exempt_tokens` keep tau 1 and the model's k
    while the rest run at (tau, k'): the union of the two sets, taken as independent draws
    over the routed experts (no profile term was measured for it)."""
    exempt = max(0, min(int(exempt_tokens), tokens))
    if exempt == 0 or (tau >= 1.0 and top_k is None):
        return routing.experts_touched(tokens, tau, top_k)
    a = routing.experts_touched(exempt, 1.0)
    b = routing.experts_touched(tokens - exempt, tau, top_k) if tokens > exempt else 0.0
    return a + b - a * b / routing.num_experts


@dataclass
class PhaseModel:
    coef: dict[str, float]  # ms per unit of each feature
    residuals: list[float]  # relative residuals of the fit: measured / fitted - 1
    serving_factor: float = 1.0  # served step / graphed step of the same shape

    def mean_ms(self, features: dict[str, float]) -> float:
        raw = sum(c * features[f] for f, c in self.coef.items())
        return max(raw, 0.0) * self.serving_factor

    def to_json(self) -> dict[str, Any]:
        return {"coef_ms": self.coef, "serving_factor": self.serving_factor,
                "residuals": [round(r, 5) for r in self.residuals]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PhaseModel:
        return cls(dict(d["coef_ms"]), list(d.get("residuals", [])), d.get("serving_factor", 1.0))


@dataclass
class StepCostProfile:
    machine: str
    date: str
    phases: dict[str, PhaseModel]
    routing: RoutingShape = field(default_factory=RoutingShape)
    host_gap_s: float = 0.0  # host time between one step's end and the next one's start
    request_in_s: float = 0.0  # client send to engine arrival (HTTP, tokenising, hop)
    request_out_s: float = 0.0  # engine token to client (detokenising, streaming)
    num_blocks: int = 32768  # KV blocks of the cache
    block_size: int = 16
    graph_buckets: dict[str, list[int]] = field(default_factory=dict)  # captured CUDA graphs
    sources: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

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
        e = round(mixed_experts(self.routing, shape.num_tokens, tau, top_k, exempt_tokens))
        return [e] * self.routing.num_layers

    def to_json(self) -> dict[str, Any]:
        r = self.routing
        return {"machine": self.machine, "date": self.date, "sources": self.sources,
                "routing": {"num_experts": r.num_experts, "top_k": r.top_k, "way": r.way,
                            "num_layers": r.num_layers},
                "host_gap_s": self.host_gap_s, "request_in_s": self.request_in_s,
                "request_out_s": self.request_out_s, "num_blocks": self.num_blocks,
                "block_size": self.block_size, "graph_buckets": self.graph_buckets, "notes": self.notes,
                "phases": {p: m.to_json() for p, m in self.phases.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepCostProfile:
        return cls(machine=d["machine"], date=d["date"],
                   phases={p: PhaseModel.from_json(m) for p, m in d["phases"].items()},
                   routing=RoutingShape(**d.get("routing", {})),
                   host_gap_s=d.get("host_gap_s", 0.0), request_in_s=d.get("request_in_s", 0.0),
                   request_out_s=d.get("request_out_s", 0.0),
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


def fit_phase(rows: Sequence[dict[str, float]], latencies_ms: Sequence[float],
              features: Sequence[str], ridge: float = 1e-6) -> PhaseModel:
    """Least-squares fit of latency over the named features (ridge-stabilised), with the
    relative residuals kept as the noise distribution."""
    X = np.array([[r[f] for f in features] for r in rows], dtype=float)
    y = np.asarray(latencies_ms, dtype=float)
    scale = np.maximum(np.abs(X).max(axis=0), 1e-12)  # column scaling: one ridge fits all
    Xs = X / scale
    coef = np.linalg.solve(Xs.T @ Xs + ridge * np.eye(len(features)), Xs.T @ y) / scale
    fitted = X @ coef
    residuals = (y / np.maximum(fitted, 1e-9) - 1.0).tolist()
    return PhaseModel({f: float(c) for f, c in zip(features, coef)}, residuals)
