"""Qwen3-MoE (Qwen3-30B-A3B): per-head q/k RMSNorm, no QKV bias, renormalised top-k, no
shared expert. Reference: transformers' modeling_qwen3_moe."""

from __future__ import annotations

from brownout.models.checkpoint import (ATTENTION, EMBEDDINGS, GATE_UP_DOWN, HEAD, LAYER, PARAM,
                                        CheckpointLayout, Scope, packed_experts, routed_experts,
                                        swiglu)
from brownout.models.spec import (MoESpec, check_rope_scaling, dense_layers_of, head_dim_of,
                                  rope_theta_of)

ARCHITECTURE = "Qwen3MoeForCausalLM"
MOE_PREFIX = "mlp"  # model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight

CHECKPOINT = CheckpointLayout(
    rules=(*EMBEDDINGS, *ATTENTION,  # ATTENTION holds q_norm / k_norm, which qk_norm turns on
           *routed_experts(MOE_PREFIX, GATE_UP_DOWN),
           *swiglu(LAYER + "mlp", PARAM + "mlp", Scope.DENSE),  # mlp_only_layers
           *HEAD),
    packed=packed_experts(MOE_PREFIX))


def spec_from_config(cfg) -> MoESpec:
    check_rope_scaling(cfg)
    dense = dense_layers_of(cfg)
    return MoESpec(
        architecture=ARCHITECTURE, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim_of(cfg),
        num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, renormalize=bool(cfg.norm_topk_prob),
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=rope_theta_of(cfg),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(cfg, "attention_bias", False)), qk_norm=True,
        dense_intermediate_size=cfg.intermediate_size, dense_layers=dense)
