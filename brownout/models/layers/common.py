"""Small building blocks: RMSNorm, rotary embedding (neox layout), SwiGLU MLP."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from brownout.distributed.parallel import SINGLE, ParallelInfo


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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


class SwiGLU(nn.Module):
    """A dense gated FFN (dense layers and the shared expert).

    Under tensor parallelism the intermediate dimension is split: gate/up are column
    parallel, down is row parallel, so `forward` returns this rank's partial sum (the
    decoder layer all-reduces it).
    """

    def __init__(self, hidden: int, inter: int, parallel: Optional[ParallelInfo] = None):
        super().__init__()
        _, inter = (parallel or SINGLE).split(inter, "MLP intermediate size")  # local width
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)  # [2I, D] gate then up
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.inter = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        return self.down_proj(F.silu(h[..., : self.inter]) * h[..., self.inter:])
