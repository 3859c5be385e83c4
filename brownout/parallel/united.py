"""`average:WAY` united experts (contiguous groups, uniform mean; see unite/uncalibrated.py)
built on a model split over ranks.

No rank holds every whole expert, so each builds what it can and one collective completes
it: with experts split along I, a rank's means are its slice of the full means and an
all-gather joins the slices; with expert parallelism, each rank sums its own members of
every group and an all-reduce adds the partial sums. Every rank then holds the same full
united experts a single process would build, and `install_united` keeps its part.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from brownout.kernels.brownout_routing import contiguous_groups


def _gather(local: torch.Tensor, parallel) -> list[torch.Tensor]:
    parts = [torch.empty_like(local) for _ in range(parallel.world_size)]
    dist.all_gather(parts, local.contiguous(), group=parallel.group)
    return parts


def _means_split_inter(moe, group_of: torch.Tensor, parallel):
    """Experts split along I -> full united (w13 [G, 2I, D], w2 [G, D, I])."""
    G = int(group_of.max()) + 1
    members = [torch.nonzero(group_of == g).flatten().to(moe.w13.device) for g in range(G)]
    w13 = torch.stack([moe.w13[idx].mean(dim=0) for idx in members])  # [G, 2I/N, D]
    w2 = torch.stack([moe.w2[idx].mean(dim=0) for idx in members])  # [G, D, I/N]
    inter = w13.shape[1] // 2  # this rank's width
    parts13 = _gather(w13, parallel)
    gate = torch.cat([p[:, :inter] for p in parts13], dim=1)
    up = torch.cat([p[:, inter:] for p in parts13], dim=1)
    return torch.cat([gate, up], dim=1), torch.cat(_gather(w2, parallel), dim=2)


def _means_expert_parallel(moe, group_of: torch.Tensor, parallel):
    """Whole experts split by rank -> full united (w13 [G, 2I, D], w2 [G, D, I])."""
    G = int(group_of.max()) + 1
    lo, n = parallel.expert_range(moe.num_experts)
    dev, dtype = moe.w13.device, moe.w13.dtype
    mine = group_of[lo:lo + n].to(dev)  # [n] group of each local expert
    w13 = torch.zeros((G,) + tuple(moe.w13.shape[1:]), dtype=torch.float32, device=dev)
    w2 = torch.zeros((G,) + tuple(moe.w2.shape[1:]), dtype=torch.float32, device=dev)
    w13.index_add_(0, mine, moe.w13[:n].float())  # partial sums over this rank's members
    w2.index_add_(0, mine, moe.w2[:n].float())
    parallel.all_reduce(w13)
    parallel.all_reduce(w2)
    size = torch.bincount(group_of.to(dev), minlength=G).to(torch.float32)  # [G]
    return (w13 / size[:, None, None]).to(dtype), (w2 / size[:, None, None]).to(dtype)


@torch.no_grad()
def install_average(model, way: int) -> None:
    """Build and install `average:WAY` united experts in every MoE layer of a split model."""
    parallel = model.parallel
    for moe in model.moe_layers():
        group_of = contiguous_groups(moe.num_experts, way)  # [E], on the CPU
        build = _means_expert_parallel if parallel.ep else _means_split_inter
        w13, w2 = build(moe, group_of, parallel)
        moe.install_united(w13, w2, group_of)
