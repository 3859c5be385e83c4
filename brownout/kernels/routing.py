"""Router top-k selection (softmax over all experts, optional renormalisation over the k),
with optional expert shedding down to k' < k routed experts per token.

Matches the Hugging Face reference: softmax in float32, top-k, renormalise if the model's
config says so. Pure tensor ops, no host synchronisation.

Shedding (`active_k`, a 0-d device tensor, so a CUDA graph reads it at replay) keeps each
token's k' highest-weight assignments: `torch.topk` returns them sorted, so positions
>= k' are dropped (id -1, weight 0, which every expert path skips). The kept weights are
renormalised exactly as the family's router does at top-k': Mixtral and Qwen3-MoE
(renormalize) divide by the kept sum; Qwen2-MoE without norm_topk_prob keeps the softmax
probabilities as they are. So shedding at k' computes what the model computes with
top_k = k', and at k' = k it returns the plain selection bit for bit.

A folded shared expert (`SharedSlots`: the shared expert split into `count` slots of the
expert weights, see `SparseMoE.fold_shared_expert`) appends `count` columns to every row:
slot ids `first`..`first + count - 1`, each weighted sigmoid(the row's logit at column E)
when the family gates its shared expert (the gate's row sits after the router's), 1
otherwise. Shared columns are never shed or renormalised. `valid` (CUDA-graph padding rows
False) gives invalid rows id -1 in every column.

`select_experts` is the reference and the CPU path. `route_experts` is what the MoE layer
calls: on CUDA with triton installed, for steps of at most TRITON_MAX_TOKENS tokens, the
one-launch kernel of `routing_triton` (same outputs, see its docstring for the tie rule);
the torch ops everywhere else, and everywhere with BROWNOUT_FUSED_TOPK=0 in the environment
(the switch `benchmarks/bench_routing_topk.py` and A/B engine runs use).
`route_with_router` takes the router GEMM into that launch where the router fits one tile
(`routing_triton.router_topk`: decode-size steps; BROWNOUT_ROUTER_TOPK=0 keeps two launches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from brownout.kernels import triton_module

# Decode steps (CUDA-graph batches) and short prefills stay under this: there the ~4 launches
# of the torch path dominate; longer steps are bandwidth-bound and those launches are noise.
TRITON_MAX_TOKENS = 256
# "0" turns the fused kernel off (the torch ops then run on CUDA too), for A/B timings
FUSED_TOPK_ENV = "BROWNOUT_FUSED_TOPK"
FUSED_TOPK = os.environ.get(FUSED_TOPK_ENV, "1") != "0"  # read once: the step path asks per layer
# "0" keeps the router GEMM and the top-k as two launches where `route_with_router` would fuse them
ROUTER_TOPK_ENV = "BROWNOUT_ROUTER_TOPK"
ROUTER_TOPK = os.environ.get(ROUTER_TOPK_ENV, "1") != "0"  # read once: the step path asks per layer


@dataclass(frozen=True)
class SharedSlots:
    """Where a folded shared expert sits: slots first..first+count-1, each one weighted by
    the sigmoid of the logit after the router's E (`gated`) or by 1."""
    first: int
    count: int
    gated: bool


def append_shared(
    weights: torch.Tensor,  # [T, k] float32
    ids: torch.Tensor,  # [T, k] int32
    router_logits: torch.Tensor,  # [T, E (+1 when gated)]
    num_experts: int,
    shared: SharedSlots,
    valid: Optional[torch.Tensor] = None,  # [T] bool
) -> tuple[torch.Tensor, torch.Tensor]:  # [T, k + count] each
    """The shared expert's columns after the routed ones (torch ops; the reference)."""
    T = ids.shape[0]
    if shared.gated:
        w = torch.sigmoid(router_logits[:, num_experts].float())  # [T]
    else:
        w = torch.ones(T, dtype=torch.float32, device=ids.device)
    w_sh = w.unsqueeze(1).expand(T, shared.count)
    ids_sh = torch.arange(shared.first, shared.first + shared.count, dtype=ids.dtype,
                          device=ids.device).expand(T, shared.count)
    if valid is not None:
        ids_sh = torch.where(valid.unsqueeze(1), ids_sh, -1)
    return torch.cat([weights, w_sh], dim=1), torch.cat([ids, ids_sh], dim=1)


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
    active_k: Optional[torch.Tensor] = None,  # 0-d int: routed experts kept per token (k')
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] float32, ids [T, k] int32 (-1 = shed)
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k], sorted descending
    ids = ids.to(torch.int32)
    if active_k is not None:
        keep = torch.arange(top_k, device=ids.device) < active_k  # [k]
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_experts(
    router_logits: torch.Tensor,  # [T, E] ([T, E + 1] with a gated shared expert)
    top_k: int,
    renormalize: bool,
    active_k: Optional[torch.Tensor] = None,  # 0-d int on the logits' device
    *,
    num_experts: Optional[int] = None,  # E (default: every column)
    shared: Optional[SharedSlots] = None,
    valid: Optional[torch.Tensor] = None,  # [T] bool: False rows get id -1 everywhere
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k (+count)] float32, ids int32 (-1 = skip)
    """`select_experts` (then the shared columns and the padding rows' -1), in one Triton
    launch on CUDA for short steps with autograd off (the kernel records no graph); the
    torch ops elsewhere, the CPU included."""
    E = router_logits.shape[1] if num_experts is None else num_experts
    if router_logits.is_cuda and FUSED_TOPK \
            and router_logits.shape[0] <= TRITON_MAX_TOKENS \
            and not (torch.is_grad_enabled() and router_logits.requires_grad):
        kern = triton_module("routing_triton")
        n_shared = shared.count if shared is not None else 0
        if kern is not None and kern.triton_topk_available(router_logits.device, E, top_k, n_shared):
            return kern.select_experts_triton(router_logits, top_k, renormalize, active_k,
                                              num_experts=E, shared=shared, valid=valid)
    weights, ids = select_experts(router_logits[:, :E], top_k, renormalize, active_k)
    if valid is not None:
        ids = torch.where(valid.unsqueeze(1), ids, -1)
    if shared is not None:
        weights, ids = append_shared(weights, ids, router_logits, E, shared, valid)
    return weights, ids


def route_with_router(
    x: torch.Tensor,  # [T, D]: the MoE input
    weight: torch.Tensor,  # [E (+1 shared gate), D]: the router's weight
    top_k: int,
    renormalize: bool,
    active_k: Optional[torch.Tensor] = None,
    *,
    num_experts: Optional[int] = None,
    shared: Optional[SharedSlots] = None,
    valid: Optional[torch.Tensor] = None,
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The router GEMM and `route_experts` in one launch (`routing_triton.router_topk`):
    (weights, ids, logits) as `route_experts(x @ weight^T, ...)` gives them with those logits,
    or None where that kernel does not take the call (neither CUDA nor triton's interpreter,
    a long step, a wide router, either switch off); the caller then runs the two launches."""
    if not (FUSED_TOPK and ROUTER_TOPK):
        return None
    kern = triton_module("routing_triton")
    n_shared = shared.count if shared is not None else 0
    if kern is None or not kern.router_topk_usable(x, weight, top_k, n_shared, num_experts=num_experts,
                                                   gated=shared is not None and shared.gated):
        return None
    return kern.router_topk(x, weight, top_k, renormalize, active_k, num_experts=num_experts,
                            shared=shared, valid=valid)
