"""Checkpoint names: which tensor of a Hugging Face checkpoint fills which part of which
parameter of `MoEForCausalLM`.

Each family declares a `CheckpointLayout`, a table of `Rule`s. A rule names a checkpoint
tensor by a template ({i}: decoder layer, {e}: routed expert), the model parameter it
fills and the `Part` of that parameter (a row block of the fused qkv_proj, a half of a
gate_up_proj, one expert's slot of the packed w13 / w2, or the whole parameter).
`CheckpointLayout.pieces` expands the table for one model into every piece that model
needs, so a loader can count them and name the first one a checkpoint lacks; the loader
holds one weight-loading function per `Part` (brownout.runner.weights).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

from brownout.models.spec import MoESpec


class Part(Enum):
    """The part of its parameter that one checkpoint tensor fills."""

    WHOLE = "whole"
    Q = "q_proj"  # rows of the fused qkv_proj [q + 2 kv, D], then k, then v
    K = "k_proj"
    V = "v_proj"
    GATE = "gate_proj"  # first half of a dense gate_up_proj [2I, D]
    UP = "up_proj"  # second half
    EXPERT_GATE = "expert gate_proj"  # routed expert e: gate rows of w13[e] [2I, D]
    EXPERT_UP = "expert up_proj"  # up rows of w13[e]
    EXPERT_DOWN = "expert down_proj"  # w2[e] [D, I]
    EXPERTS_GATE_UP = "packed gate_up_proj"  # every routed expert of a layer: w13 [E, 2I, D]
    EXPERTS_DOWN = "packed down_proj"  # w2 [E, D, I]


# the per-expert parts that one packed tensor of every expert provides
PACKED_COVERS: dict[Part, tuple[Part, ...]] = {
    Part.EXPERTS_GATE_UP: (Part.EXPERT_GATE, Part.EXPERT_UP),
    Part.EXPERTS_DOWN: (Part.EXPERT_DOWN,),
}


class Scope(Enum):
    """Where a rule repeats."""

    MODEL = "once"
    LAYER = "every decoder layer"
    MOE = "every MoE layer"
    DENSE = "every dense-MLP layer"
    EXPERT = "every routed expert of every MoE layer"


Predicate = Callable[[MoESpec], bool]
PieceKey = tuple[str, Part, Optional[int]]  # (parameter, part, routed expert)


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor this model reads, and where it goes."""

    name: str  # checkpoint tensor name
    param: str  # parameter of MoEForCausalLM
    part: Part
    expert: Optional[int] = None  # routed expert id of an EXPERT_* part

    @property
    def key(self) -> PieceKey:
        return self.param, self.part, self.expert


@dataclass(frozen=True)
class Rule:
    checkpoint: str  # template of the checkpoint tensor name
    param: str  # template of the parameter name
    part: Part = Part.WHOLE
    scope: Scope = Scope.MODEL
    when: Optional[Predicate] = None  # the model has this tensor only when true (None: always)

    def applies(self, spec: MoESpec) -> bool:
        return self.when is None or self.when(spec)

    def piece(self, layer: Optional[int] = None, expert: Optional[int] = None) -> Piece:
        return Piece(self.checkpoint.format(i=layer, e=expert), self.param.format(i=layer, e=expert),
                     self.part, expert)


# Tensors that some checkpoints carry and the model rebuilds itself: the rotary frequency
# table (computed from rope_theta), so reading or rejecting them would only get in the way.
HARMLESS_EXTRAS = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)
TIED_HEAD = "lm_head.weight"  # with tied embeddings, a copy of the token embedding


@dataclass(frozen=True)
class CheckpointLayout:
    rules: tuple[Rule, ...]
    # every expert of a layer in one tensor (transformers' in-memory layout): accepted in
    # place of the per-expert tensors of `rules`, never required
    packed: tuple[Rule, ...] = ()
    # (other spelling, canonical spelling) substrings of checkpoint names
    aliases: tuple[tuple[str, str], ...] = ()

    def pieces(self, spec: MoESpec) -> list[Piece]:
        """Every piece the model of `spec` needs: model-wide rules in table order, each run
        of per-layer rules layer by layer (within a layer, routed experts last)."""
        out: list[Piece] = []
        for once, run in itertools.groupby(self.rules, key=lambda r: r.scope is Scope.MODEL):
            rules = [r for r in run if r.applies(spec)]
            if once:
                out += [r.piece() for r in rules]
            else:
                for i in range(spec.num_layers):
                    out += _layer_pieces(rules, spec, i)
        return out

    def packed_pieces(self, spec: MoESpec) -> list[Piece]:
        return [r.piece(i) for i in spec.moe_layers for r in self.packed if r.applies(spec)]

    def canonical(self, name: str) -> str:
        for other, canonical in self.aliases:
            name = name.replace(other, canonical)
        return name

    @staticmethod
    def harmless(name: str, spec: MoESpec) -> bool:
        """A checkpoint tensor the model has no place for and may skip."""
        if spec.tie_word_embeddings and name == TIED_HEAD:
            return True
        return any(p.search(name) for p in HARMLESS_EXTRAS)


def _layer_pieces(rules: list[Rule], spec: MoESpec, i: int) -> list[Piece]:
    moe = i not in spec.dense_layers
    mlp_scope = Scope.MOE if moe else Scope.DENSE
    out = [r.piece(i) for r in rules if r.scope in (Scope.LAYER, mlp_scope)]
    experts = [r for r in rules if r.scope is Scope.EXPERT]
    if moe and experts:
        out += [r.piece(i, e) for e in range(spec.num_experts) for r in experts]
    return out


def untied(spec: MoESpec) -> bool:
    return not spec.tie_word_embeddings


def has_qkv_bias(spec: MoESpec) -> bool:
    return spec.qkv_bias


def has_qk_norm(spec: MoESpec) -> bool:
    return spec.qk_norm


def has_shared_expert(spec: MoESpec) -> bool:
    return spec.shared_expert_intermediate_size > 0


def has_shared_expert_gate(spec: MoESpec) -> bool:
    return has_shared_expert(spec) and spec.shared_expert_gate


LAYER = "model.layers.{i}."  # checkpoint prefix of decoder layer i
PARAM = "layers.{i}."  # parameter prefix of decoder layer i

EMBEDDINGS = (Rule("model.embed_tokens.weight", "embed_tokens.weight"),)
HEAD = (Rule("model.norm.weight", "norm.weight"),
        # tied: lm_head.weight is embed_tokens.weight, filled with it
        Rule("lm_head.weight", "lm_head.weight", when=untied))

_QKV = (Part.Q, Part.K, Part.V)
ATTENTION = (
    Rule(LAYER + "input_layernorm.weight", PARAM + "input_layernorm.weight", scope=Scope.LAYER),
    *(Rule(f"{LAYER}self_attn.{p.value}.weight", PARAM + "self_attn.qkv_proj.weight", p, Scope.LAYER)
      for p in _QKV),
    *(Rule(f"{LAYER}self_attn.{p.value}.bias", PARAM + "self_attn.qkv_proj.bias", p, Scope.LAYER,
           has_qkv_bias) for p in _QKV),
    Rule(LAYER + "self_attn.o_proj.weight", PARAM + "self_attn.o_proj.weight", scope=Scope.LAYER),
    Rule(LAYER + "self_attn.q_norm.weight", PARAM + "self_attn.q_norm.weight", scope=Scope.LAYER,
         when=has_qk_norm),
    Rule(LAYER + "self_attn.k_norm.weight", PARAM + "self_attn.k_norm.weight", scope=Scope.LAYER,
         when=has_qk_norm),
    Rule(LAYER + "post_attention_layernorm.weight", PARAM + "post_attention_layernorm.weight",
         scope=Scope.LAYER),
)

# the expert projection names of the Qwen checkpoints
GATE_UP_DOWN = {"gate_proj": Part.EXPERT_GATE, "up_proj": Part.EXPERT_UP, "down_proj": Part.EXPERT_DOWN}


def swiglu(checkpoint: str, param: str, scope: Scope, when: Optional[Predicate] = None) -> tuple[Rule, ...]:
    """A dense gated MLP ({gate,up,down}_proj under `checkpoint`) into `SwiGLU` at `param`."""
    fused = f"{param}.gate_up_proj.weight"
    return (Rule(f"{checkpoint}.gate_proj.weight", fused, Part.GATE, scope, when),
            Rule(f"{checkpoint}.up_proj.weight", fused, Part.UP, scope, when),
            Rule(f"{checkpoint}.down_proj.weight", f"{param}.down_proj.weight", Part.WHOLE, scope, when))


def routed_experts(moe: str, projections: dict[str, Part]) -> tuple[Rule, ...]:
    """The router `{moe}.gate` and every expert's projections `{moe}.experts.{e}.<name>`
    (`projections`: checkpoint name -> part) into `SparseMoE`."""
    def packed_into(part: Part) -> str:
        return PARAM + ("mlp.w2" if part is Part.EXPERT_DOWN else "mlp.w13")

    return (Rule(f"{LAYER}{moe}.gate.weight", PARAM + "mlp.gate.weight", scope=Scope.MOE),
            *(Rule(f"{LAYER}{moe}.experts.{{e}}.{name}.weight", packed_into(part), part, Scope.EXPERT)
              for name, part in projections.items()))


def packed_experts(moe: str) -> tuple[Rule, ...]:
    """Every expert of a layer in one gate_up [E, 2I, D] and one down [E, D, I] tensor."""
    return (Rule(f"{LAYER}{moe}.experts.gate_up_proj", PARAM + "mlp.w13", Part.EXPERTS_GATE_UP, Scope.MOE),
            Rule(f"{LAYER}{moe}.experts.down_proj", PARAM + "mlp.w2", Part.EXPERTS_DOWN, Scope.MOE))
