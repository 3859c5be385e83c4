"""One normalised description of an MoE decoder, read from any supported family's config.

Every family maps its Hugging Face config onto `MoESpec`; the model code reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_ROPE_THETA = 10000.0  # transformers' default for the Qwen configs, when a config omits it


@dataclass(frozen=True, slots=True)
class MoESpec:
    architecture: str
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int  # E routed experts
    top_k: int
    moe_intermediate_size: int  # I, width of one routed expert
    renormalize: bool  # renormalise the top-k weights to sum to one
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    dense_intermediate_size: int = 0  # width of dense MLP layers, if any
    dense_layers: tuple[int, ...] = field(default_factory=tuple)  # layers with a dense MLP

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.dense_layers]


def rope_theta_of(hf_config, default: float = DEFAULT_ROPE_THETA) -> float:
    """transformers 5 keeps rope_theta inside rope_parameters; older versions at the top."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", None) or default)


def check_rope_scaling(hf_config) -> None:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    kind = (params or {}).get("rope_type", (params or {}).get("type", "default"))
    if kind not in ("default", None):
        raise NotImplementedError(f"rope scaling type {kind!r} is not supported (only 'default')")


def head_dim_of(hf_config) -> int:
    return int(getattr(hf_config, "head_dim", None)
               or hf_config.hidden_size // hf_config.num_attention_heads)


def dense_layers_of(cfg) -> tuple[int, ...]:
    """Layers with a dense MLP in the Qwen MoE families: `mlp_only_layers`, and all but every
    `decoder_sparse_step`-th layer."""
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    only_mlp = set(getattr(cfg, "mlp_only_layers", []) or [])
    return tuple(i for i in range(cfg.num_hidden_layers)
                 if i in only_mlp or cfg.num_experts == 0 or (i + 1) % step != 0)
