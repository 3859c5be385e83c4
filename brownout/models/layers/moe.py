"""Sparse MoE block with packed expert weights, united-expert slots and brownout routing.

Weights of all experts of a layer sit in two packed tensors, `w13` [S, 2I, D] (gate rows,
then up rows) and `w2` [S, D, I], where S = E routed experts + extra slots. United experts
(SPEC 1.2) are installed into slots E..E+G-1; brownout routing (SPEC 1.3) remaps router
choices onto them on the device, so the expert kernel runs unchanged on the new ids.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from brownout.kernels.moe_ref import moe_experts_ref
from brownout.kernels.brownout_routing import brownout_route, count_touched
from brownout.kernels.routing import select_experts
from brownout.models.context import ForwardContext
from brownout.models.layers.common import SwiGLU
from brownout.models.spec import MoESpec


class SparseMoE(nn.Module):
    def __init__(self, spec: MoESpec, extra_slots: int):
        super().__init__()
        E, D, inter = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.num_experts = E
        self.top_k = spec.top_k
        self.renormalize = spec.renormalize
        self.num_slots = E + extra_slots
        self.gate = nn.Linear(D, E, bias=False)  # router
        self.w13 = nn.Parameter(torch.empty(self.num_slots, 2 * inter, D))  # [S, 2I, D]
        self.w2 = nn.Parameter(torch.empty(self.num_slots, D, inter))  # [S, D, I]
        self.shared_expert = SwiGLU(D, spec.shared_expert_intermediate_size) \
            if spec.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) \
            if (self.shared_expert is not None and spec.shared_expert_gate) else None
        self.register_buffer("group_of", torch.zeros(E, dtype=torch.long), persistent=False)
        self.num_groups = 0  # united experts installed (0: brownout unavailable)
        self.capture: Optional[list] = None  # set to a list to record routing (calibration)

    @property
    def brownout_ready(self) -> bool:
        return self.num_groups > 0

    @torch.no_grad()
    def install_united(self, w13_u: torch.Tensor, w2_u: torch.Tensor, group_of: torch.Tensor) -> None:
        """Place G united experts into slots E..E+G-1; group_of [E] maps expert -> group."""
        G = w13_u.shape[0]
        if G > self.num_slots - self.num_experts:
            raise ValueError(f"{G} united experts do not fit the {self.num_slots - self.num_experts} "
                             f"extra expert slots; load with more extra_expert_slots")
        if tuple(w13_u.shape[1:]) != tuple(self.w13.shape[1:]) or \
                tuple(w2_u.shape[1:]) != tuple(self.w2.shape[1:]):
            raise ValueError(f"united expert shapes {tuple(w13_u.shape)}/{tuple(w2_u.shape)} do not "
                             f"match the model's experts {tuple(self.w13.shape[1:])}/{tuple(self.w2.shape[1:])}")
        if group_of.shape != (self.num_experts,) or int(group_of.min()) < 0 or int(group_of.max()) >= G:
            raise ValueError(f"group_of must map each of the {self.num_experts} experts to a group in [0, {G})")
        E = self.num_experts
        self.w13[E:E + G].copy_(w13_u)
        self.w2[E:E + G].copy_(w2_u)
        self.group_of.copy_(group_of.to(self.group_of.device, torch.long))
        self.num_groups = G

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        router_logits = self.gate(x)  # [T, E]
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)  # [T, k]
        if self.capture is not None:
            self.capture.append(dict(x=x.detach().cpu(), topk_ids=ids.cpu(), topk_weights=weights.cpu()))
        if ctx.tau is not None and self.brownout_ready:
            ids, weights = brownout_route(ids, weights, ctx.tau, self.group_of, self.num_experts, ctx.valid)
        if ctx.touched is not None:
            counted = ids if ctx.valid is None else torch.where(ctx.valid.unsqueeze(1), ids, -1)
            ctx.touched.append(count_touched(counted, self.num_slots))
        out = self._experts(x, weights, ids, ctx)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape)

    def _experts(self, x, weights, ids, ctx: ForwardContext) -> torch.Tensor:
        if ctx.use_kernels:
            from brownout.kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids)
        return moe_experts_ref(x, self.w13, self.w2, weights, ids)
