"""Plain-torch MoE expert computation: the CPU path and the reference for the Triton kernel.

Semantics shared with `fused_moe`: expert slot ids may point past the model's own experts
(united experts live in slots E..E+G-1) and an id of -1 means "skip this assignment"
(brownout de-duplication writes it). Loops over the distinct slots used, so it reads the
host once per call: fine on the CPU, never used inside a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts_ref(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [S, 2I, D] gate rows then up rows, S expert slots
    w2: torch.Tensor,  # [S, D, I]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k] int, -1 = skip
) -> torch.Tensor:  # [T, D]
    T, k = topk_ids.shape
    inter = w2.shape[-1]
    out = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    slots, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        idx = order[start:start + count]
        start += count
        if slot < 0:
            continue
        tok = idx // k  # [n] token of each assignment
        h = x[tok] @ w13[slot].t()  # [n, 2I]
        act = F.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
        y = (act @ w2[slot].t()).float()  # [n, D]
        out.index_add_(0, tok, y * topk_weights.reshape(-1)[idx].unsqueeze(1).float())
    return out.to(x.dtype)
