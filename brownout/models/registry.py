"""Architecture registry and named presets of real model configs (for dummy weights).

The registry is keyed by `architectures[0]` of a checkpoint's config.json. Presets hold the
published config values of real models so GPU benchmarks can build their exact shapes
with random weights (load_format="dummy") without any download.
"""

from __future__ import annotations

from types import ModuleType

from brownout.models import mixtral, qwen2_moe, qwen3_moe
from brownout.models.checkpoint import CheckpointLayout
from brownout.models.spec import MoESpec

FAMILIES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (qwen2_moe, mixtral, qwen3_moe)}

PRESETS: dict[str, dict] = {
    "qwen1.5-moe-a2.7b": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936,
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=8192, rope_theta=1000000.0,
        rms_norm_eps=1e-6, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1,
        tie_word_embeddings=False),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    # not a published model: a Qwen2-MoE whose experts (6 MB each in float32) do not fit a
    # CPU's caches, so expert reads bound a decode step on a CPU as they do on a GPU
    "cpu-moe": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=8192,
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024, norm_topk_prob=False, decoder_sparse_step=1,
        tie_word_embeddings=False),
}


def family_of(hf_config) -> ModuleType:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ValueError(f"unsupported architecture {archs or '(none given)'}; "
                     f"supported: {', '.join(sorted(FAMILIES))}")


def spec_of(hf_config) -> MoESpec:
    return family_of(hf_config).spec_from_config(hf_config)


def layout_of(spec: MoESpec) -> CheckpointLayout:
    """The checkpoint names of the family of `spec`."""
    return FAMILIES[spec.architecture].CHECKPOINT


def preset_config(name: str):
    """A transformers config object for a named preset."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    values = dict(PRESETS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)
