"""Brownout routing: redirect assignments of cold experts to their group's united expert.

Implements SPEC 1.3 with tensor ops only (no host synchronisation, no data-dependent
shapes), so it runs inside a captured CUDA graph with `tau` held in a device tensor:

1. count assignments per expert over the valid tokens of the step;
2. order experts by count descending, ties by lower id; expert at sorted position i is
   kept iff the cumulative count *before* it is < tau * total assignments
   (tau = 1 keeps every used expert, tau = 0 keeps none);
3. assignments to non-kept experts go to slot `num_experts + group_of[e]` with the same
   weight, except in a group where exactly one member is redirected: that member is kept
   (a united expert costs as much as the member it would replace);
4. two assignments of one token landing on the same united slot are merged: the first
   (lowest k position) carries the summed weight, the others get id -1 and weight 0.
   An id of -1 means "skip" to the expert kernels.

Padding tokens (`valid[t]` False) are not counted and come back with id -1 and weight 0,
so they touch no expert slot at all. Input ids of -1 (assignments shed by `select_experts`)
are not counted either and stay -1 with weight 0: shedding runs first, so the keep set is
chosen over the assignments the step actually computes. With `valid=None` every token is valid and tau = 1
returns the input ids and weights unchanged (bit-identical).

`brownout_route` runs the Triton kernels of `brownout_routing_triton` (one or two launches)
for CUDA tensors when triton is installed, and `brownout_route_torch` (the reference) else.

Reference: BrownoutServe (united experts + dynamic bypassing of cold experts).
"""

from __future__ import annotations

from typing import Optional

import torch

from brownout.kernels import triton_module


def contiguous_groups(num_experts: int, way: int, device=None) -> torch.Tensor:
    """Group index of each expert for the paper's grouping `e // way` -> [E] int64.

    `G = ceil(E / way)` groups; the last one is smaller when `way` does not divide `E`.
    """
    if num_experts < 1 or way < 1:
        raise ValueError(f"num_experts and way must be >= 1, got {num_experts}, {way}")
    return torch.arange(num_experts, dtype=torch.int64, device=device) // way


def count_touched(ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Distinct expert slots with at least one assignment (ids of -1 ignored) -> 0-d int64."""
    flat = ids.reshape(-1).long()  # [N]
    hits = torch.zeros(num_slots + 1, dtype=torch.int64, device=flat.device)
    # slot -1 lands in bucket 0, which is dropped
    hits.scatter_add_(0, flat.clamp(min=-1) + 1, torch.ones_like(flat))
    return (hits[1:] > 0).sum()


def _expert_counts(flat_ids: torch.Tensor, counted: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert over counted assignments -> [E] int64."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    counts.scatter_add_(0, flat_ids.clamp(0, num_experts - 1), counted.long())
    return counts


def _keep_mask(counts: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Keep set of SPEC 1.3 step 2 -> [E] bool."""
    E = counts.shape[0]
    ids = torch.arange(E, dtype=torch.int64, device=counts.device)
    # one unique key per expert: count first, then lower id first; sorting unique keys
    # gives the same order on every device without relying on a stable sort
    key = counts * E + (E - 1 - ids)  # [E]
    order = torch.argsort(key, descending=True)  # [E]
    sorted_counts = counts[order]  # [E]
    before = torch.cumsum(sorted_counts, 0) - sorted_counts  # [E] cumulative count before
    threshold = tau.to(torch.float64) * counts.sum().to(torch.float64)  # 0-d
    kept_sorted = before.to(torch.float64) < threshold  # [E]
    return torch.zeros_like(kept_sorted).scatter(0, order, kept_sorted)


def _redirect_mask(counts: torch.Tensor, kept: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
    """Used experts outside the keep set, minus lone members of their group -> [E] bool."""
    redirected = (counts > 0) & ~kept  # [E]
    num_groups = group_of.shape[0]  # upper bound on G, keeps the shape static
    per_group = torch.zeros(num_groups, dtype=torch.int64, device=counts.device)
    per_group.scatter_add_(0, group_of, redirected.long())  # [G'] redirected members
    return redirected & (per_group[group_of] >= 2)


def _merge_duplicates(ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Merge assignments of one token to one united slot (SPEC 1.3 step 4).

    ids [T, k] int64 remapped, weights [T, k] float32 -> (ids, weights) with the first
    occurrence carrying the summed weight and later ones -1 / 0.
    """
    k = ids.shape[1]
    united = ids >= num_experts  # [T, k]; expert ids are distinct per token already
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & united.unsqueeze(2)  # [T, k, k]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # j' < j
    has_earlier = (same & earlier).any(dim=2)  # [T, k] a previous position holds this slot
    summed = (same.to(weights.dtype) * weights.unsqueeze(1)).sum(dim=2)  # [T, k]
    merged_w = torch.where(united, summed, weights)
    new_ids = torch.where(has_earlier, torch.full_like(ids, -1), ids)
    new_w = torch.where(has_earlier, torch.zeros_like(merged_w), merged_w)
    return new_ids, new_w


def brownout_route_torch(
    topk_ids: torch.Tensor,  # [T, k] int, expert ids in [0, E) or -1 (shed)
    topk_weights: torch.Tensor,  # [T, k] float32
    tau: torch.Tensor,  # 0-d float32 on the same device (a Python float is accepted)
    group_of: torch.Tensor,  # [E] int64, group index of each routed expert (0..G-1)
    num_experts: int,
    valid: Optional[torch.Tensor] = None,  # [T] bool, False for padding tokens
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, k] (input dtype, -1 = skip), weights [T, k]
    """Apply brownout routing to one step's router output of one MoE layer (torch ops).

    The reference for the Triton kernels, and the path on the CPU."""
    T, k = topk_ids.shape
    if not torch.is_tensor(tau):
        tau = torch.tensor(float(tau), dtype=torch.float32, device=topk_ids.device)
    ids = topk_ids.long()  # [T, k]
    live = ids >= 0  # [T, k] False where shed
    if valid is not None:
        live = live & valid.unsqueeze(1)
    counted = live.reshape(-1)  # [T*k]
    flat = ids.reshape(-1)  # [T*k]
    counts = _expert_counts(flat, counted, num_experts)  # [E]
    kept = _keep_mask(counts, tau)  # [E]
    redirect = _redirect_mask(counts, kept, group_of)  # [E]
    experts = torch.arange(num_experts, dtype=torch.int64, device=ids.device)
    slot_of = torch.where(redirect, num_experts + group_of, experts)  # [E] remap table
    remapped = slot_of[ids.clamp(0, num_experts - 1)]  # [T, k]
    # a shed assignment holds no slot, so it never merges into a united one
    remapped = torch.where(ids < 0, torch.full_like(remapped, -1), remapped)
    new_ids, new_w = _merge_duplicates(remapped, topk_weights, num_experts)
    new_ids = torch.where(live, new_ids, torch.full_like(new_ids, -1))
    new_w = torch.where(live, new_w, torch.zeros_like(new_w))
    return new_ids.to(topk_ids.dtype), new_w



def brownout_route(
    topk_ids: torch.Tensor,  # [T, k] int, expert ids in [0, E)
    topk_weights: torch.Tensor,  # [T, k] float32
    tau: torch.Tensor,  # 0-d float32 on the same device (a Python float is accepted)
    group_of: torch.Tensor,  # [E] int64, group index of each routed expert (0..G-1)
    num_experts: int,
    valid: Optional[torch.Tensor] = None,  # [T] bool, False for padding tokens
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,  # (ids, weights) [T, k] to write
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, k] (input dtype, -1 = skip), weights [T, k]
    """Apply brownout routing to one step's router output of one MoE layer.

    On CUDA with triton installed: the fused kernels of `brownout_routing_triton` (one or
    two launches instead of ~25); elsewhere `brownout_route_torch`. Same outputs. `out`
    (views with unit column strides, e.g. the first k columns of a wider routing output,
    the inputs themselves allowed) receives the result in place of new tensors."""
    if topk_ids.is_cuda:
        kern = triton_module("brownout_routing_triton")
        if kern is not None and kern.triton_route_available(topk_ids.device, num_experts,
                                                            topk_ids.shape[1]):
            return kern.brownout_route_triton(topk_ids, topk_weights, tau, group_of,
                                              num_experts, valid, out=out)
    ids, weights = brownout_route_torch(topk_ids, topk_weights, tau, group_of, num_experts, valid)
    if out is None:
        return ids, weights
    out[0].copy_(ids)
    out[1].copy_(weights)
    return out
