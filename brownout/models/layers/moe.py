"""Sparse MoE block with packed expert weights, united-expert slots and brownout routing.

Weights of all experts of a layer sit in two packed tensors, `w13` [S, 2I, D] (gate rows,
then up rows) and `w2` [S, D, I], where S = E routed experts + extra slots. United experts
(SPEC 1.2) are installed into slots E..E+G-1; brownout routing (SPEC 1.3) remaps router
choices onto them on the device, so the expert kernel runs unchanged on the new ids.

Under tensor parallelism the router, brownout routing and slot ids stay global (every rank
computes them for all tokens, identically); a rank holds either every slot's slice of the
intermediate dimension, or, with expert parallelism, whole experts (its routed experts,
then the united experts placed on it; `local_of` maps global slot -> local slot or -1).
`forward` returns this rank's partial sum; the decoder layer all-reduces it.

A shared expert (Qwen2-MoE) is folded into the expert kernel after loading
(`fold_shared_expert`): its intermediate dimension is cut into `shared / moe_intermediate`
slots of the experts' shape, placed after the routed and united slots, and every token gets
those slots as extra assignments weighted by its shared gate (whose row joins the router's,
so one GEMM gives both). SwiGLU is elementwise over the intermediate dimension and the down
projection is linear in it, so the slots' outputs sum to the shared expert's. A decode step
then runs the router GEMM, one routing launch and the four expert kernels instead of also
the shared expert's five (gate GEMM, gate/up GEMM, SwiGLU, down GEMM, gated add). Steps
longer than FOLDED_MAX_TOKENS run the shared slots through cuBLAS instead (`_shared_dense`):
there the shared expert is arithmetic, which the grouped expert kernel does at a fraction
of cuBLAS's rate, and the saved launches are noise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from brownout.parallel.experts import local_slots, localize, slot_table
from brownout.parallel.info import SINGLE, ParallelInfo
from brownout.parallel.sharding import shard_dim, shard_gate_up
from brownout.kernels.moe_ref import moe_experts_ref
from brownout.kernels.brownout_routing import brownout_route, count_touched
from brownout.kernels.routing import SharedSlots, append_shared, route_experts, route_with_router
from brownout.models.context import ForwardContext, SlotOutputs
from brownout.models.layers.common import DecodeLinear, SwiGLU
from brownout.models.spec import MoESpec


# Steps of at most this many tokens give the folded shared expert to the expert kernel: the
# decode graphs' batch sizes, where a step is launches and weight bytes, not arithmetic.
FOLDED_MAX_TOKENS = 128


class SparseMoE(nn.Module):
    def __init__(self, spec: MoESpec, extra_slots: int, parallel: Optional[ParallelInfo] = None):
        super().__init__()
        self.parallel = parallel = parallel or SINGLE
        E, D, inter = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.num_experts = E
        self.top_k = spec.top_k
        self.renormalize = spec.renormalize
        self.num_slots = E + extra_slots  # global slot ids
        self.inter = inter  # full width of one expert
        self.gate = DecodeLinear(D, E, bias=False)  # router
        lo, n_local = parallel.expert_range(E)
        self.num_local_experts = n_local
        slots = n_local if parallel.ep else self.num_slots  # this rank's slots (EP: routed only)
        local_inter = inter if parallel.ep else parallel.split(inter, "expert intermediate size")[1]
        self.w13 = nn.Parameter(torch.empty(slots, 2 * local_inter, D))  # [S, 2I, D]
        self.w2 = nn.Parameter(torch.empty(slots, D, local_inter))  # [S, D, I]
        local_of = None
        if parallel.ep:
            local_of = torch.full((self.num_slots,), -1, dtype=torch.long)
            local_of[lo:lo + n_local] = torch.arange(n_local)
        self.register_buffer("local_of", local_of, persistent=False)
        self.shared_expert = SwiGLU(D, spec.shared_expert_intermediate_size, parallel) \
            if spec.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) \
            if (self.shared_expert is not None and spec.shared_expert_gate) else None
        self.shared_slots: Optional[SharedSlots] = None  # set by fold_shared_expert
        self.register_buffer("group_of", torch.zeros(E, dtype=torch.long), persistent=False)
        self.num_groups = 0  # united experts installed (0: brownout unavailable)
        self.capture: Optional[list] = None  # set to a list to record routing (calibration)

    @property
    def brownout_ready(self) -> bool:
        return self.num_groups > 0

    @torch.no_grad()
    def install_united(self, w13_u: torch.Tensor, w2_u: torch.Tensor, group_of: torch.Tensor) -> None:
        """Place G united experts into slots E..E+G-1; group_of [E] maps expert -> group.

        w13_u [G, 2I, D] and w2_u [G, D, I] are whole united experts; under tensor
        parallelism each rank keeps its part (its slice of I, or its placed slots)."""
        G = w13_u.shape[0]
        if G > self.num_slots - self.num_experts:
            raise ValueError(f"{G} united experts do not fit the {self.num_slots - self.num_experts} "
                             f"extra expert slots; load with more extra_expert_slots")
        D = self.gate.in_features
        full13, full2 = (2 * self.inter, D), (D, self.inter)
        if tuple(w13_u.shape[1:]) != full13 or tuple(w2_u.shape[1:]) != full2:
            raise ValueError(f"united expert shapes {tuple(w13_u.shape)}/{tuple(w2_u.shape)} do not "
                             f"match the model's experts {full13}/{full2}")
        if group_of.shape != (self.num_experts,) or int(group_of.min()) < 0 or int(group_of.max()) >= G:
            raise ValueError(f"group_of must map each of the {self.num_experts} experts to a group in [0, {G})")
        E = self.num_experts
        if self.parallel.ep:
            self._install_placed(w13_u, w2_u, group_of)
        else:
            self.w13[E:E + G].copy_(shard_gate_up(w13_u, self.parallel, self.inter, dim=1))
            self.w2[E:E + G].copy_(shard_dim(w2_u, self.parallel, 2, "expert intermediate size"))
        self.group_of.copy_(group_of.to(self.group_of.device, torch.long))
        self.num_groups = G

    def can_fold_shared_expert(self) -> bool:
        """A shared expert whose width is a whole number of expert widths, in one process
        (tensor and expert parallel ranks keep the separate shared expert)."""
        spec_w = 0 if self.shared_expert is None else self.shared_expert.inter
        return self.shared_expert is not None and self.parallel.world_size == 1 \
            and spec_w % self.inter == 0 and spec_w > 0

    @torch.no_grad()
    def fold_shared_expert(self) -> bool:
        """Move the loaded shared expert into slots of `w13`/`w2` (see the module docstring);
        False, and nothing changed, where `can_fold_shared_expert` says no."""
        if not self.can_fold_shared_expert():
            return False
        I, D = self.inter, self.gate.in_features
        n = self.shared_expert.inter // I
        gate_up = self.shared_expert.gate_up_proj.weight  # [2 n I, D]: gate rows, then up rows
        g, u = gate_up[:n * I].view(n, I, D), gate_up[n * I:].view(n, I, D)
        w13_sh = torch.cat([g, u], dim=1)  # [n, 2I, D]: each slot's gate rows, then its up rows
        w2_sh = self.shared_expert.down_proj.weight.view(D, n, I).transpose(0, 1)  # [n, D, I]
        self.w13 = nn.Parameter(torch.cat([self.w13.data, w13_sh.to(self.w13)]), requires_grad=False)
        self.w2 = nn.Parameter(torch.cat([self.w2.data, w2_sh.to(self.w2)]), requires_grad=False)
        gated = self.shared_expert_gate is not None
        if gated:  # one router GEMM gives the E logits and the shared gate's
            router = torch.cat([self.gate.weight.data, self.shared_expert_gate.weight.data.to(self.gate.weight)])
            self.gate.weight = nn.Parameter(router, requires_grad=False)  # [E + 1, D]
            self.gate.out_features = router.shape[0]
            self.shared_expert_gate = None
        self.shared_expert = None
        self.shared_slots = SharedSlots(first=self.num_slots, count=n, gated=gated)
        return True

    def _install_placed(self, w13_u: torch.Tensor, w2_u: torch.Tensor, group_of: torch.Tensor) -> None:
        """Expert parallel: keep the united experts placed on this rank after its routed ones."""
        p = self.parallel
        rank_of, local = slot_table(group_of.cpu(), w13_u.shape[0], self.num_slots, p.world_size)
        mine = torch.nonzero(rank_of[self.num_experts:] == p.rank).flatten()  # [G_r] group ids
        n = self.num_local_experts
        w13 = torch.cat([self.w13[:n], w13_u[mine.to(w13_u.device)].to(self.w13)])  # [n + G_r, 2I, D]
        w2 = torch.cat([self.w2[:n], w2_u[mine.to(w2_u.device)].to(self.w2)])  # [n + G_r, D, I]
        if w13.shape == self.w13.shape:
            self.w13.copy_(w13)
            self.w2.copy_(w2)
        else:  # another number of united slots lands here: new storage (before graph capture)
            self.w13 = nn.Parameter(w13, requires_grad=False)
            self.w2 = nn.Parameter(w2, requires_grad=False)
        self.local_of.copy_(local_slots(rank_of, local, p.rank).to(self.local_of.device))

    def forward(self, x: torch.Tensor, ctx: ForwardContext
                ) -> tuple["torch.Tensor | SlotOutputs", Optional[torch.Tensor]]:
        """x [..., D] -> (this rank's partial output [..., D], or its unsummed `SlotOutputs`
        where `ctx.defer_moe_sum` allows; distinct slots touched: 0-d int64 on x's device,
        None when `ctx.count_touched` is off)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        in_slots = self.shared_slots is not None and x.shape[0] <= FOLDED_MAX_TOKENS
        # [T, k (+shared when in_slots)]; padding rows have id -1
        weights, ids, routed, logits = self._route(x, ctx, in_slots)
        # the fused kernel counts the slots it is given; expert parallel (local ids) needs
        # the separate count over global ids. The count covers routed and united slots: a
        # folded shared expert's slots are read by every step, as the unfolded one is.
        in_kernel = ctx.count_touched and ctx.use_kernels and self.local_of is None and x.is_cuda
        if in_kernel:
            touched: Optional[torch.Tensor] = torch.empty((), dtype=torch.int64, device=x.device)
        else:
            touched = count_touched(ids[:, :self.top_k], self.num_slots) if ctx.count_touched else None
        # the sum over each token's assignments can wait for the next norm when nothing is
        # added to it here (no shared expert outside the slots) and no other rank adds to it
        defer = (ctx.defer_moe_sum and ctx.use_kernels and self.shared_expert is None
                 and (self.shared_slots is None or in_slots) and len(shape) == 2)
        out = self._experts(x, weights, ids, ctx, routed, touched if in_kernel else None, defer)
        if defer:
            return out, touched
        if self.shared_slots is not None and not in_slots:
            out = self._shared_dense(x, logits, out)
        elif self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is None:
                out = out + shared
            else:
                out = gated_shared_add(out, self.shared_expert_gate(x), shared)
        return out.reshape(shape), touched

    def _shared_dense(self, x: torch.Tensor, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + the folded shared expert over x [T, D] by dense GEMMs on its slots' weights
        (gated by the logit after the router's E when the family gates it)."""
        sh = self.shared_slots
        n, I, D, T = sh.count, self.inter, x.shape[-1], x.shape[0]
        w13 = self.w13[sh.first:sh.first + n]  # [n, 2I, D]: a contiguous block
        h = torch.nn.functional.linear(x, w13.reshape(n * 2 * I, D))  # [T, n * 2I]
        a = _silu_and_mul(h.view(T * n, 2 * I)).view(T, n, I)
        y = torch.bmm(a.transpose(0, 1), self.w2[sh.first:sh.first + n].transpose(1, 2)).sum(0)  # [T, D]
        if not sh.gated:
            return out + y
        return gated_shared_add(out, logits[:, self.num_experts:self.num_experts + 1], y)

    def _route(self, x: torch.Tensor, ctx: ForwardContext, in_slots: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
        """x [T, D] -> (weights [T, k], slot ids [T, k], whether brownout routing ran, the
        router's logits). `in_slots`: the folded shared expert's columns follow the k.

        Shedding (`ctx.top_k`) runs before brownout routing: it is then the model at top-k'
        whatever tau is (its price is measured alone), and brownout's keep set is chosen
        over the assignments the step computes."""
        E, shared = self.num_experts, (self.shared_slots if in_slots else None)
        routed = ctx.tau is not None and self.brownout_ready
        one_launch = ctx.exempt is None and self.capture is None and (not routed or shared is not None)
        # at decode sizes the router GEMM joins that launch on plain-routed steps; a
        # brownout-routed step keeps the two launches, which time faster before its routing
        # kernels than the fused one
        fused = route_with_router(x, self.gate.weight, self.top_k, self.renormalize, ctx.top_k,
                                  num_experts=E, shared=shared, valid=ctx.valid) \
            if one_launch and not routed and ctx.use_kernels else None
        if fused is not None:
            weights, ids, router_logits = fused
        else:
            router_logits = self.gate(x)  # [T, E] (+ the shared gate's column when folded)
        if one_launch:
            # top-k, shared columns and padding rows in one launch; a routed step then
            # redirects the first k columns in place (the shared ones are never redirected)
            if fused is None:
                weights, ids = route_experts(router_logits, self.top_k, self.renormalize, ctx.top_k,
                                             num_experts=E, shared=shared, valid=ctx.valid)
            if routed:
                k = self.top_k
                brownout_route(ids[:, :k], weights[:, :k], ctx.tau, self.group_of, E, ctx.valid,
                               out=(ids[:, :k], weights[:, :k]))
            return weights, ids, routed, router_logits
        weights, ids = route_experts(router_logits, self.top_k, self.renormalize, ctx.top_k,
                                     num_experts=E)  # [T, k]; shed assignments have id -1
        full = (weights, ids)  # what exempt tokens keep: the model's k, no redirection
        if ctx.exempt is not None and ctx.top_k is not None:
            full = route_experts(router_logits, self.top_k, self.renormalize, num_experts=E)
        if self.capture is not None:
            self.capture.append(dict(x=x.detach().cpu(), topk_ids=ids.cpu(), topk_weights=weights.cpu()))
        if routed:  # padding rows come back with id -1
            ids, weights = brownout_route(ids, weights, ctx.tau, self.group_of, self.num_experts, ctx.valid)
        elif ctx.valid is not None:  # CUDA-graph padding rows skip every expert
            ids = torch.where(ctx.valid.unsqueeze(1), ids, -1)
        if ctx.exempt is not None:  # exempt tokens: their router's own top-k, as at tau 1
            keep = ctx.exempt.unsqueeze(1)  # [T, 1]
            weights = torch.where(keep, full[0], weights)
            ids = torch.where(keep, full[1].to(ids.dtype), ids)
        if shared is not None:
            weights, ids = append_shared(weights, ids.to(torch.int32), router_logits, E, shared, ctx.valid)
        return weights, ids, routed, router_logits

    def _experts(self, x, weights, ids, ctx: ForwardContext, routed: bool = False,
                 touched: Optional[torch.Tensor] = None, defer: bool = False):
        """The weighted sum of each token's experts [T, D], or with `defer` (kernels only)
        its unsummed `SlotOutputs`."""
        if self.local_of is not None:  # expert parallel: only the slots held here
            ids = localize(ids, self.local_of)
        if ctx.use_kernels:
            from brownout.kernels.fused_moe import fused_moe  # lazy: triton on CUDA only

            # routed: tiles sized for the low-tau case, where the rows crowd into the united
            # slots (the routed path only runs at tau < 1; tau = 1 takes the plain one)
            n_shared = ids.shape[1] - self.top_k  # the folded shared expert's columns, if present
            # their slots are fixed (global ids, so not under expert parallel's local ones)
            fixed = (self.shared_slots.first, n_shared) if n_shared and self.local_of is None else None
            out = fused_moe(x, self.w13, self.w2, weights, ids,
                            busy_slots=self.num_groups + n_shared if routed else None,
                            touched_out=touched, count_slots=self.num_slots, sum_slots=not defer,
                            # x was written before the routing launches that wrote the ids,
                            # which signal after their waits
                            shared_slots=fixed, x_settled=True)
            return SlotOutputs(*out) if defer else out
        return moe_experts_ref(x, self.w13, self.w2, weights, ids)


def _silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """h [N, 2I] (gate then up) -> silu(gate) * up [N, I]: one Triton pass on CUDA."""
    if h.is_cuda and h.stride(-1) == 1:
        from brownout.kernels import norm_rope  # lazy: triton on CUDA only

        if norm_rope.kernels_usable(h):
            return norm_rope.silu_and_mul(h)
    inter = h.shape[-1] // 2
    return torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]


def gated_shared_add(out: torch.Tensor, gate_logit: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """out + sigmoid(gate_logit) * shared: one Triton pass on CUDA serving tensors (torch
    takes its slow broadcast path, two kernels), the torch ops elsewhere."""
    if out.is_cuda and out.dim() == 2 and out.stride(-1) == 1 and shared.stride(-1) == 1 \
            and out.dtype == shared.dtype == gate_logit.dtype:
        from brownout.kernels import norm_rope  # lazy: triton on CUDA only

        if norm_rope.kernels_usable(out):
            return norm_rope.gated_add(out, gate_logit, shared)
    return out + torch.sigmoid(gate_logit) * shared
