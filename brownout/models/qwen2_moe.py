"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): QKV bias, shared expert with a sigmoid gate, no top-k
renormalisation by default. Reference: transformers' modeling_qwen2_moe."""

from __future__ import annotations

from brownout.models.checkpoint import (ATTENTION, EMBEDDINGS, GATE_UP_DOWN, HEAD, LAYER, PARAM,
                                        CheckpointLayout, Rule, Scope, has_shared_expert,
                                        has_shared_expert_gate, packed_experts, routed_experts,
                                        swiglu)
from brownout.models.spec import (MoESpec, check_rope_scaling, dense_layers_of, head_dim_of,
                                  rope_theta_of)

ARCHITECTURE = "Qwen2MoeForCausalLM"
MOE_PREFIX = "mlp"  # model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight

CHECKPOINT = CheckpointLayout(
    rules=(*EMBEDDINGS, *ATTENTION,
           *routed_experts(MOE_PREFIX, GATE_UP_DOWN),
           *swiglu(LAYER + "mlp.shared_expert", PARAM + "mlp.shared_expert", Scope.MOE,
                   has_shared_expert),
           Rule(LAYER + "mlp.shared_expert_gate.weight", PARAM + "mlp.shared_expert_gate.weight",
                scope=Scope.MOE, when=has_shared_expert_gate),
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
        qkv_bias=bool(getattr(cfg, "qkv_bias", True)), qk_norm=False,
        shared_expert_intermediate_size=int(cfg.shared_expert_intermediate_size or 0),
        shared_expert_gate=True, dense_intermediate_size=cfg.intermediate_size,
        dense_layers=dense)
