"""Router top-k selection (softmax over all experts, optional renormalisation over the k).

Matches the Hugging Face reference: softmax in float32, top-k, renormalise if the model's
config says so. Pure tensor ops, no host synchronisation.
"""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] float32, ids [T, k] int32
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)

