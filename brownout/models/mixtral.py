"""Mixtral (8 experts, top-2, renormalised, no shared expert). Its checkpoints name the
MoE block block_sparse_moe and the expert projections w1 (gate), w3 (up), w2 (down).
Reference: transformers' modeling_mixtral."""

from __future__ import annotations

from brownout.models.checkpoint import (ATTENTION, EMBEDDINGS, HEAD, CheckpointLayout, Part,
                                        packed_experts, routed_experts)
from brownout.models.spec import MoESpec, check_rope_scaling, head_dim_of, rope_theta_of

ARCHITECTURE = "MixtralForCausalLM"
DEFAULT_ROPE_THETA = 1e6  # transformers' MixtralConfig default, for configs that omit it
MOE_PREFIX = "block_sparse_moe"
EXPERT_PROJECTIONS = {"w1": Part.EXPERT_GATE, "w3": Part.EXPERT_UP, "w2": Part.EXPERT_DOWN}

CHECKPOINT = CheckpointLayout(
    rules=(*EMBEDDINGS, *ATTENTION, *routed_experts(MOE_PREFIX, EXPERT_PROJECTIONS), *HEAD),
    packed=packed_experts(MOE_PREFIX),
    # transformers 5 names the MoE block `mlp` in memory, so a state dict (or a checkpoint
    # saved from one without conversion) spells it that way
    aliases=((".mlp.", f".{MOE_PREFIX}."),))


def spec_from_config(cfg) -> MoESpec:
    check_rope_scaling(cfg)
    return MoESpec(
        architecture=ARCHITECTURE, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim_of(cfg),
        num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.intermediate_size, renormalize=True,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=rope_theta_of(cfg, DEFAULT_ROPE_THETA),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))
