"""Self-attention with rotary embedding, optional QKV bias and per-head q/k RMSNorm,
over a paged KV cache (serving) or over a plain [B, L] batch (calibration, evaluation).

On the Triton path at decode sizes the QKV projection rotates q and k and writes k and v
into the paged cache in its own epilogue (`skinny_gemm.qkv_rope_write_kv`, one launch where
the projection and `rope_write_kv` took two); models with q/k norms, larger steps and
BROWNOUT_QKV_EPILOGUE=0 keep the two.

Under tensor parallelism a rank holds only its heads (qkv_proj column parallel, o_proj row
parallel, its KV cache only its kv heads) and returns its partial sum of o_proj; the
decoder layer all-reduces it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from brownout.parallel.info import SINGLE, ParallelInfo
from brownout.kernels.attention_ref import paged_attention_ref, write_kv_ref
from brownout.models.context import ForwardContext
from brownout.models.layers.common import DecodeLinear, RMSNorm, Rotary
from brownout.models.spec import MoESpec


class Attention(nn.Module):
    def __init__(self, spec: MoESpec, rotary: Rotary, layer_idx: int,
                 parallel: Optional[ParallelInfo] = None):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        heads = (parallel or SINGLE).attention_heads(spec.num_heads, spec.num_kv_heads)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads  # this rank's
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.qkv_proj = DecodeLinear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = DecodeLinear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary
        self.scale = spec.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        s = self.spec
        if ctx.attn is not None and ctx.use_kernels:
            q = self._qkv_rope_write_kv(x, positions, ctx)
            if q is not None:
                return self.o_proj(self._paged_attention(q, ctx).flatten(-2))
        # x [..., T, D] -> q [..., T, Hq, Dh], k/v [..., T, Hkv, Dh]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, s.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, s.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, s.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.attn is not None and ctx.use_kernels:
            out = self._paged_kernels(q, k, v, positions, ctx)
        else:
            q, k = self.rotary.apply_qk(q, k, positions)
            out = self._full(q, k, v) if ctx.attn is None else self._paged(q, k, v, ctx)
        return self.o_proj(out.flatten(-2))

    def _qkv_rope_write_kv(self, x, positions, ctx: ForwardContext) -> Optional[torch.Tensor]:
        """The Triton path at decode sizes: the QKV projection, rotary and the cache write in
        one launch, whose epilogue rotates each q and k head and writes k and v into the cache
        (`skinny_gemm.qkv_rope_write_kv`) -> the rotated q [T, Hq, Dh]; None where it does not
        apply (more rows than the skinny GEMM takes, q/k norms, ...) or is turned off
        (BROWNOUT_SKINNY_GEMM=0 or BROWNOUT_QKV_EPILOGUE=0), and the separate launches run."""
        from brownout.kernels import triton_module

        sk = triton_module("skinny_gemm")
        if sk is None or not (sk.ENABLED and sk.QKV_EPILOGUE):
            return None
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        proj, rot = self.qkv_proj, self.rotary
        if not sk.qkv_rope_write_kv_usable(x, proj.weight, rot.cos, rot.sin, k_cache, v_cache, self.num_heads,
                                           self.num_kv_heads, self.spec.head_dim, qk_norm=self.q_norm is not None):
            return None
        return sk.qkv_rope_write_kv(x, proj.weight, proj.bias, positions, rot.cos, rot.sin, k_cache, v_cache,
                                    ctx.attn.slot_mapping, self.num_heads, self.num_kv_heads, self.spec.head_dim)

    def _paged_kernels(self, q, k, v, positions, ctx: ForwardContext) -> torch.Tensor:
        """The Triton path: rotary and the cache write in one launch, then paged attention."""
        from brownout.kernels.paged_attention import rope_write_kv, rope_write_kv_usable  # lazy: triton

        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        if rope_write_kv_usable(q, k, v, self.rotary.cos):
            rope_write_kv(q, k, v, positions, self.rotary.cos, self.rotary.sin, k_cache, v_cache,
                          ctx.attn.slot_mapping)
            return self._paged_attention(q, ctx)
        q, k = self.rotary.apply_qk(q, k, positions)
        return self._paged(q, k, v, ctx)

    def _paged_attention(self, q, ctx: ForwardContext) -> torch.Tensor:
        """Triton paged attention of q over the layer's cache, this step's k and v written."""
        from brownout.kernels.paged_attention import paged_attention  # lazy: triton

        meta = ctx.attn
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, meta.max_query_len, self.scale)

    def _full(self, q, k, v) -> torch.Tensor:
        # q [B, L, Hq, Dh]: plain causal attention, no cache
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=self.scale, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    def _paged(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        meta = ctx.attn
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        if ctx.use_kernels:
            from brownout.kernels.paged_attention import write_kv  # lazy: triton

            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            return self._paged_attention(q, ctx)
        write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta.block_tables_list,
                                   meta.seq_lens_list, meta.query_lens_list, self.scale)
