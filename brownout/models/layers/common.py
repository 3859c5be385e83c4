"""Small building blocks: RMSNorm, rotary embedding (neox layout), SwiGLU MLP."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from brownout.models.context import SlotOutputs
from brownout.parallel.info import SINGLE, ParallelInfo


class DecodeLinear(nn.Linear):
    """nn.Linear whose decode-size calls (a few rows on CUDA, autograd off) may take the
    skinny Triton GEMM (`brownout.kernels.skinny_gemm`; BROWNOUT_SKINNY_GEMM=0 turns it off), which
    spreads a weight over every SM where cuBLAS's tiles leave most of them idle."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2:
            from brownout.kernels import triton_module

            sk = triton_module("skinny_gemm")
            if sk is not None and sk.ENABLED and sk.usable(x, self.weight):
                return sk.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.weight.dtype == x.dtype:
            from brownout.kernels import norm_rope  # lazy (triton); one launch instead of seven

            if norm_rope.kernels_usable(x) and x.stride(-1) == 1:
                return norm_rope.rms_norm(x, self.weight, self.eps)
        # float32 statistics, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: "torch.Tensor | SlotOutputs", residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a decoder layer's residual add and the norm
        after it, fused into one kernel on CUDA; x may be a MoE layer's unsummed
        `SlotOutputs`, summed in that same kernel."""
        if isinstance(x, SlotOutputs):
            from brownout.kernels import norm_rope

            if (norm_rope.kernels_usable(residual) and self.weight.dtype == residual.dtype == x.y.dtype
                    and residual.dim() == 2):
                return norm_rope.add_slots_rms_norm(x.y, x.ids, residual, self.weight, self.eps)
            x = x.total()
        if x.is_cuda and self.weight.dtype == x.dtype and residual.dtype == x.dtype:
            from brownout.kernels import norm_rope

            if norm_rope.kernels_usable(x) and x.stride(-1) == 1 and residual.stride(-1) == 1:
                return norm_rope.add_rms_norm(x, residual, self.weight, self.eps)
        total = residual + x
        return self.forward(total), total


class Rotary(nn.Module):
    """cos/sin table over all positions; applied to the halves of each head (neox style)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, Dh/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [..., T, H, Dh], positions [..., T]
        cos = self.cos[positions].unsqueeze(-2)  # [..., T, 1, Dh/2]
        sin = self.sin[positions].unsqueeze(-2)
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


    def apply_qk(self, q: torch.Tensor, k: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k; on CUDA serving tensors [T, H, Dh], in place by one Triton launch
        each (the torch version issues ~11 kernels per tensor)."""
        half = q.shape[-1] // 2
        if q.is_cuda and q.dim() == 3 and half & (half - 1) == 0 and q.stride(-1) == 1 \
                and k.stride(-1) == 1:
            from brownout.kernels import norm_rope  # lazy: triton on CUDA only

            if norm_rope.kernels_usable(q):
                both = _adjacent_heads(q, k)
                if both is not None:  # q's heads then k's in one row of the qkv output: one launch
                    norm_rope.rotary_(both, positions, self.cos, self.sin)
                else:
                    norm_rope.rotary_(q, positions, self.cos, self.sin)
                    norm_rope.rotary_(k, positions, self.cos, self.sin)
                return q, k
        return self(q, positions), self(k, positions)


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """A [T, Hq + Hk, Dh] view over q [T, Hq, Dh] and k [T, Hk, Dh] when k's heads follow
    q's in the same storage with the same strides (the split of one qkv projection), else None."""
    if q.dtype != k.dtype or q.stride() != k.stride() or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    if k.storage_offset() != q.storage_offset() + q.shape[1] * q.stride(1):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


class SwiGLU(nn.Module):
    """A dense gated FFN (dense layers and the shared expert).

    Under tensor parallelism the intermediate dimension is split: gate/up are column
    parallel, down is row parallel, so `forward` returns this rank's partial sum (the
    decoder layer all-reduces it).
    """

    def __init__(self, hidden: int, inter: int, parallel: Optional[ParallelInfo] = None):
        super().__init__()
        _, inter = (parallel or SINGLE).split(inter, "MLP intermediate size")  # local width
        self.gate_up_proj = DecodeLinear(hidden, 2 * inter, bias=False)  # [2I, D] gate then up
        self.down_proj = DecodeLinear(inter, hidden, bias=False)
        self.inter = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if h.is_cuda and h.dim() == 2 and h.stride(-1) == 1:
            from brownout.kernels import norm_rope  # lazy (triton); one pass, not two strided ones

            if norm_rope.kernels_usable(h):
                return self.down_proj(norm_rope.silu_and_mul(h))
        return self.down_proj(F.silu(h[..., : self.inter]) * h[..., self.inter:])
