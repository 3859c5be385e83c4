"""The MoE decoder language model shared by every supported family.

Families differ only in their `MoESpec` (QKV bias, q/k norm, shared expert, top-k
renormalisation) and in checkpoint names (see `runner/loader.py`), so one model class
serves all. Two entry points: `forward` over a flat batch of tokens with a paged KV cache
(serving) and `forward_full` over a [B, L] batch without cache (calibration, evaluation).
`embed` and `run_layer` take a [B, L] batch through the stack one decoder layer at a time,
as `forward_full` does (calibration carries every window's states from layer to layer).
`forward` returns the final hidden states and, per MoE layer, the distinct expert slots
its tokens went to, as device tensors: inside a CUDA graph they are outputs like the
hidden states, read by the host only after the step.

Under tensor parallelism (`parallel`, see brownout.parallel.info) attention and the
MLP / MoE block return partial sums that each decoder layer all-reduces; embeddings, norms
and lm_head are replicated, so every rank holds the same hidden states between sublayers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from brownout.parallel.info import SINGLE, ParallelInfo
from brownout.models.context import ForwardContext, ForwardOutput, SlotOutputs
from brownout.models.layers.attention import Attention
from brownout.models.layers.common import RMSNorm, Rotary, SwiGLU
from brownout.models.layers.moe import SparseMoE
from brownout.models.spec import MoESpec


class DecoderLayer(nn.Module):
    def __init__(self, spec: MoESpec, rotary: Rotary, idx: int, extra_slots: int,
                 parallel: ParallelInfo = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rotary, idx, parallel)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if idx in spec.dense_layers:
            self.mlp: nn.Module = SwiGLU(spec.hidden_size, spec.dense_intermediate_size, parallel)
        else:
            self.mlp = SparseMoE(spec, extra_slots, parallel)
        self.reduce = parallel.all_reduce if parallel.active else None  # sum of partial outputs

    def forward(self, x, positions, ctx: ForwardContext, residual: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x: the embeddings (residual None) or the previous layer's MLP output, not yet added
        to the residual stream (maybe unsummed `SlotOutputs`) -> (this layer's MLP output, the
        residual stream before it,
        distinct expert slots touched: 0-d int64, None in a dense layer or when the context
        does not count them). Each residual add travels into the next norm, where it is fused."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        attn = self.self_attn(h, positions, ctx)
        h, residual = self.post_attention_layernorm.add_forward(
            attn if self.reduce is None else self.reduce(attn), residual)
        touched = None
        if isinstance(self.mlp, SparseMoE):
            mlp, touched = self.mlp(h, ctx)
        else:
            mlp = self.mlp(h)
        if self.reduce is None:
            return mlp, residual, touched  # an unsummed MoE output is summed by the next norm
        if isinstance(mlp, SlotOutputs):
            mlp = mlp.total()
        return self.reduce(mlp), residual, touched


class MoEForCausalLM(nn.Module):
    def __init__(self, spec: MoESpec, extra_slots: int = 0, max_positions: Optional[int] = None,
                 parallel: Optional[ParallelInfo] = None):
        super().__init__()
        self.spec = spec
        self.extra_slots = extra_slots
        self.parallel = parallel or SINGLE
        # kv heads this rank caches (all of them in one process)
        self.num_local_kv_heads = self.parallel.attention_heads(spec.num_heads, spec.num_kv_heads).num_kv_heads
        self.rotary = Rotary(spec.head_dim, max_positions or spec.max_position_embeddings, spec.rope_theta)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, self.rotary, i, extra_slots, self.parallel)
                                    for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]

    @property
    def brownout_ready(self) -> bool:
        moes = self.moe_layers()
        return bool(moes) and all(m.brownout_ready for m in moes)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> ForwardOutput:
        """input_ids/positions [T] (paged) or [B, L] (full) -> final hidden states and the
        expert slots each MoE layer touched ([M] int64, None when not counted)."""
        x = self.embed_tokens(input_ids)
        residual = None
        touched = []
        for layer in self.layers:
            x, residual, layer_touched = layer(x, positions, ctx, residual)
            if layer_touched is not None:
                touched.append(layer_touched)
        hidden = self.norm(x) if residual is None else self.norm.add_forward(x, residual)[0]
        return ForwardOutput(hidden, torch.stack(touched) if touched else None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head's output in the model's dtype: what greedy decoding reads (`compute_logits`
        widens it to float32 for sampling and logprobs)."""
        return self.lm_head(hidden)

    @staticmethod
    def _full_inputs(B: int, L: int, device, tau: Optional[float]) -> tuple[torch.Tensor, ForwardContext]:
        """Positions [B, L] and the context of a causal [B, L] batch without KV cache."""
        positions = torch.arange(L, device=device).expand(B, L)
        tau_t = None if tau is None else torch.tensor(float(tau), device=device)
        return positions, ForwardContext(tau=tau_t, count_touched=False)

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, tau: Optional[float] = None) -> torch.Tensor:
        """Logits [B, L, V] of a batch of equal-length sequences, causal, no KV cache.

        With `tau` set (and united experts installed) brownout counts are taken over all
        B*L tokens, as in one serving step of that many tokens.
        """
        positions, ctx = self._full_inputs(*input_ids.shape, input_ids.device, tau)
        return self.compute_logits(self.forward(input_ids, positions, ctx).hidden)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> the first decoder layer's input x [B, L, D] (its residual: None)."""
        return self.embed_tokens(input_ids)

    @torch.inference_mode()
    def run_layer(self, index: int, x: torch.Tensor, residual: Optional[torch.Tensor],
                  tau: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer `index` over a causal [B, L] batch as `forward_full` runs it: the
        layer's input (x [B, L, D], the residual stream before it: None for the first layer)
        -> the next layer's input (x, residual). With `tau`, brownout counts are taken over
        the batch's B*L tokens, as in `forward_full`."""
        positions, ctx = self._full_inputs(x.shape[0], x.shape[1], x.device, tau)
        x, residual, _ = self.layers[index](x, positions, ctx, residual)
        return x, residual
