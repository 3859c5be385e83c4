"""Brownout routing (SPEC 1.3) as Triton kernels: one launch for small steps, two for large.

Same outputs as `brownout_routing.brownout_route_torch`, without its ~25 small launches:
  1. `_plan_kernel` (one program): per-expert counts of the valid assignments (a histogram
     over chunks of the T*k ids), the keep set from an [E, CH] "who sorts before me"
     comparison per chunk of CH experts (count desc, lower id first), the lone-member rule
     from an [E, CH] same-group comparison, and the remap table `slot_of` [E] in scratch.
     Each phase reads what the previous one stored, after a block barrier.
  2. `_apply_kernel` (grid over token blocks): gather `slot_of[ids]`, merge a token's
     assignments that land on one united slot through a [BLOCK_T, K, K] comparison, write
     ids and weights. For small steps the plan program runs this loop itself (one launch).
Decode-sized steps take `_route_regs_kernel` instead: one program that loads the ids once
and keeps counts, keep set, groups and remap table in registers, so no phase waits on a
store, a block barrier and a load of the one before it.
No host synchronisation, grids depend on shapes only and `tau` may be a 0-d device
tensor, so a call can be captured in a CUDA graph. The keep test is done in float64 on
integers, exactly as the torch version (`before < float64(tau) * total`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch version
    triton = None

MAX_EXPERTS = 1024  # beyond this the [E, CH] tiles stop fitting one program; torch is used
MAX_TOP_K = 16
# T*k up to this: one launch (plan + apply in one program). H100, 60 experts, top-4, T 2048
# (benchmarks/results/routing/routing_h100.md): one launch 73 us eager vs 121 us for two (host launch
# cost dominates), but 20 vs 11 us inside a CUDA graph; steps this long run eager.
FUSED_MAX_ASSIGNMENTS = 8192
# The register kernel up to this many padded assignments (T_pad x k_pad: 128 tokens of top-8):
# its [T, k, k] merge tile stays at 8K elements
REGS_MAX_ASSIGNMENTS = 1024
REGS_MAX_EXPERTS = 128  # and up to this many (padded) experts: its [E, E] rank tile is 16K elements
# on: decode-sized steps route in the register kernel; BROWNOUT_REGS_ROUTE=0 takes the plan
# kernel's phases through scratch instead
REGS_ROUTE_ENV = "BROWNOUT_REGS_ROUTE"
REGS_ROUTE = os.environ.get(REGS_ROUTE_ENV, "1") != "0"  # read once: the step path asks per layer


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_interpreted() -> bool:
    """True when triton decorated this module's kernels for its CPU interpreter."""
    return triton is not None and not isinstance(_plan_kernel, triton.runtime.JITFunction)


def triton_route_available(device: torch.device, num_experts: int, top_k: int) -> bool:
    """True when the kernels can run these shapes on `device` (CUDA, or the interpreter)."""
    if triton is None or num_experts > MAX_EXPERTS or top_k > MAX_TOP_K:
        return False
    return device.type == "cuda" or _kernels_interpreted()


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

    @triton.jit
    def _apply_block(t0, ids_ptr, w_ptr, valid_ptr, slot_ptr, out_ids_ptr, out_w_ptr,
                     T, K, E, s_it, s_ik, s_wt, s_wk, s_v, s_ot,
                     HAS_VALID: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr):
        """Remap and merge tokens [t0, t0 + BLOCK_T). Shapes: BT tokens, KP top-k slots."""
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BT]
        offs_j = tl.arange(0, K_PAD)  # [KP]
        mj = offs_j < K
        m2 = (offs_t < T)[:, None] & mj[None, :]  # [BT, KP]
        e_in = tl.load(ids_ptr + offs_t[:, None] * s_it + offs_j[None, :] * s_ik, mask=m2,
                       other=0).to(tl.int32)
        live = e_in >= 0  # [BT, KP] False where shed: no slot, never merged
        e = tl.minimum(tl.maximum(e_in, 0), E - 1)  # the torch version clamps too
        w = tl.load(w_ptr + offs_t[:, None] * s_wt + offs_j[None, :] * s_wk, mask=m2, other=0.0)
        slot = tl.load(slot_ptr + e, mask=m2 & live, other=-1)  # [BT, KP]
        _merge_store(offs_t, offs_j, mj, m2, live, slot, w.to(tl.float32), valid_ptr, out_ids_ptr,
                     out_w_ptr, T, E, s_v, s_ot, HAS_VALID)

    @triton.jit
    def _merge_store(offs_t, offs_j, mj, m2, live, slot, wf, valid_ptr, out_ids_ptr, out_w_ptr,
                     T, E, s_v, s_ot, HAS_VALID: tl.constexpr):
        """Merge a token's assignments that land on one united slot (the first keeps the summed
        weight, the others become -1) and store ids and weights; [BT, KP] tiles."""
        united = slot >= E
        # same[t, j, j']: position j' holds the united slot of position j
        same = (slot[:, :, None] == slot[:, None, :]) & united[:, :, None] & mj[None, None, :]
        earlier = offs_j[None, None, :] < offs_j[None, :, None]  # j' < j
        has_earlier = tl.max((same & earlier).to(tl.int32), axis=2) > 0  # [BT, KP]
        summed = tl.sum(tl.where(same, wf[:, None, :], 0.0), axis=2)  # [BT, KP]
        new_w = tl.where(united, summed, wf)
        new_id = tl.where(has_earlier, -1, slot)
        new_w = tl.where(has_earlier | (live == 0), 0.0, new_w)
        if HAS_VALID:
            v = tl.load(valid_ptr + offs_t * s_v, mask=offs_t < T, other=0) != 0  # [BT]
            new_id = tl.where(v[:, None], new_id, -1)
            new_w = tl.where(v[:, None], new_w, 0.0)
        out = offs_t[:, None] * s_ot + offs_j[None, :]  # outputs: rows of stride s_ot, unit columns
        tl.store(out_ids_ptr + out, new_id.to(out_ids_ptr.dtype.element_ty), mask=m2)
        tl.store(out_w_ptr + out, new_w.to(out_w_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _redirected(before, total, cnt, me, tau_ptr, tau_val, TAU_IS_PTR: tl.constexpr):
        """Experts outside the keep set (before < tau * total, in float64 on integers, as the
        torch version) that have assignments to redirect."""
        if TAU_IS_PTR:
            tau = tl.load(tau_ptr).to(tl.float64)
        else:
            tau = tl.cast(tau_val, tl.float64)  # a float argument is float32
        kept = before.to(tl.float64) < tau * total.to(tl.float64)
        return (cnt > 0) & (kept == 0) & me

    @triton.jit(do_not_specialize=["T"])  # one binary for every step length
    def _plan_kernel(ids_ptr, w_ptr, valid_ptr, group_ptr, tau_ptr, tau_val, scratch_ptr,
                     out_ids_ptr, out_w_ptr, T, K, E,
                     s_it, s_ik, s_wt, s_wk, s_v, s_g, s_ot,
                     HAS_VALID: tl.constexpr, TAU_IS_PTR: tl.constexpr, FUSED: tl.constexpr,
                     E_PAD: tl.constexpr, HBINS: tl.constexpr, CH: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        """Counts, keep set, lone-member rule -> slot_of in scratch[2E:3E]; then, if FUSED,
        the apply loop over all tokens. scratch: counts [E], redirected [E], slot_of [E]."""
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        cnt_ptr = scratch_ptr
        red_ptr = scratch_ptr + E
        slot_ptr = scratch_ptr + 2 * E
        # 1. histogram of valid assignments; masked ones go to bin HBINS-1 >= E, dropped
        hist = tl.zeros([HBINS], dtype=tl.int32)
        N = T * K
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)  # [BN] flat assignment index
            m = n < N
            t = n // K
            e = tl.load(ids_ptr + t * s_it + (n - t * K) * s_ik, mask=m, other=0).to(tl.int32)
            m = m & (e >= 0)  # shed assignments are not counted
            e = tl.minimum(tl.maximum(e, 0), E - 1)
            if HAS_VALID:
                m = m & (tl.load(valid_ptr + t * s_v, mask=m, other=0) != 0)
            hist += tl.histogram(tl.where(m, e, HBINS - 1), HBINS)
        offs_h = tl.arange(0, HBINS)
        total = tl.sum(tl.where(offs_h < E, hist, 0))
        tl.store(cnt_ptr + offs_h, hist, mask=offs_h < E)
        tl.debug_barrier()
        # 2. keep set: before[e] = sum of counts of experts ordered before e
        offs_e = tl.arange(0, E_PAD)  # [EP]
        me = offs_e < E
        c_e = tl.load(cnt_ptr + offs_e, mask=me, other=0)
        before = tl.zeros([E_PAD], dtype=tl.int32)
        for s in range(0, E_PAD, CH):
            offs_c = s + tl.arange(0, CH)  # [CH]
            c_c = tl.load(cnt_ptr + offs_c, mask=offs_c < E, other=0)
            ahead = (c_c[None, :] > c_e[:, None]) | (
                (c_c[None, :] == c_e[:, None]) & (offs_c[None, :] < offs_e[:, None]))  # [EP, CH]
            before += tl.sum(tl.where(ahead, c_c[None, :], 0), axis=1)
        redirected = _redirected(before, total, c_e, me, tau_ptr, tau_val, TAU_IS_PTR)  # [EP]
        g_e = tl.load(group_ptr + offs_e * s_g, mask=me, other=-1).to(tl.int32)
        tl.store(red_ptr + offs_e, redirected.to(tl.int32), mask=me)
        tl.debug_barrier()
        # 3. lone-member rule: a group needs >= 2 redirected members to use its united slot
        n_red = tl.zeros([E_PAD], dtype=tl.int32)
        for s in range(0, E_PAD, CH):
            offs_c = s + tl.arange(0, CH)
            r_c = tl.load(red_ptr + offs_c, mask=offs_c < E, other=0)
            g_c = tl.load(group_ptr + offs_c * s_g, mask=offs_c < E, other=-1).to(tl.int32)
            n_red += tl.sum(tl.where(g_c[None, :] == g_e[:, None], r_c[None, :], 0), axis=1)
        slot = tl.where(redirected & (n_red >= 2), E + g_e, offs_e)
        tl.store(slot_ptr + offs_e, slot, mask=me)
        if FUSED:
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):
                _apply_block(t0, ids_ptr, w_ptr, valid_ptr, slot_ptr, out_ids_ptr, out_w_ptr,
                             T, K, E, s_it, s_ik, s_wt, s_wk, s_v, s_ot, HAS_VALID, BLOCK_T, K_PAD)

    @triton.jit(do_not_specialize=["T"])  # one binary for every step length
    def _route_regs_kernel(ids_ptr, w_ptr, valid_ptr, group_ptr, tau_ptr, tau_val,
                           out_ids_ptr, out_w_ptr, T, K, E,
                           s_it, s_ik, s_wt, s_wk, s_v, s_g, s_ot,
                           HAS_VALID: tl.constexpr, TAU_IS_PTR: tl.constexpr, E_PAD: tl.constexpr,
                           T_PAD: tl.constexpr, K_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        """The plan and the apply of one step in registers: every input is loaded once, up
        front, and nothing goes through memory until the outputs are stored."""
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        offs_e = tl.arange(0, E_PAD)  # [EP]
        me = offs_e < E
        g_e = tl.load(group_ptr + offs_e * s_g, mask=me, other=-1).to(tl.int32)
        offs_t = tl.arange(0, T_PAD)  # [TP]
        offs_j = tl.arange(0, K_PAD)  # [KP]
        mj = offs_j < K
        m2 = (offs_t < T)[:, None] & mj[None, :]  # [TP, KP]
        e_in = tl.load(ids_ptr + offs_t[:, None] * s_it + offs_j[None, :] * s_ik, mask=m2,
                       other=-1).to(tl.int32)
        w = tl.load(w_ptr + offs_t[:, None] * s_wt + offs_j[None, :] * s_wk, mask=m2, other=0.0)
        live = e_in >= 0  # [TP, KP] False where shed or padding: no slot, never counted
        e = tl.minimum(tl.maximum(e_in, 0), E - 1)  # the torch version clamps too
        counted = live
        if HAS_VALID:
            v = tl.load(valid_ptr + offs_t * s_v, mask=offs_t < T, other=0) != 0  # [TP]
            counted = counted & v[:, None]
        # 1. counts per expert over the valid assignments
        flat_e = tl.reshape(e, [T_PAD * K_PAD])
        cnt = tl.histogram(flat_e, E_PAD, mask=tl.reshape(counted, [T_PAD * K_PAD]))  # [EP]
        total = tl.sum(cnt, 0)
        # 2. keep set: before[e] = counts of the experts ordered before e (count desc, id asc)
        ahead = (cnt[None, :] > cnt[:, None]) | (
            (cnt[None, :] == cnt[:, None]) & (offs_e[None, :] < offs_e[:, None]))  # [EP, EP]
        before = tl.sum(tl.where(ahead, cnt[None, :], 0), axis=1)
        redirected = _redirected(before, total, cnt, me, tau_ptr, tau_val, TAU_IS_PTR)  # [EP]
        # 3. lone-member rule: a group needs >= 2 redirected members to use its united slot
        n_red = tl.sum(((g_e[None, :] == g_e[:, None]) & redirected[None, :]).to(tl.int32), axis=1)
        slot_of = tl.where(redirected & (n_red >= 2), E + g_e, offs_e)  # [EP]
        # 4. apply: each assignment's slot, gathered from the table in registers
        slot = tl.reshape(tl.gather(slot_of, flat_e, 0), [T_PAD, K_PAD])
        slot = tl.where(m2 & live, slot, -1)
        _merge_store(offs_t, offs_j, mj, m2, live, slot, w.to(tl.float32), valid_ptr, out_ids_ptr,
                     out_w_ptr, T, E, s_v, s_ot, HAS_VALID)

    @triton.jit(do_not_specialize=["T"])
    def _apply_kernel(ids_ptr, w_ptr, valid_ptr, slot_ptr, out_ids_ptr, out_w_ptr,
                      T, K, E, s_it, s_ik, s_wt, s_wk, s_v, s_ot,
                      HAS_VALID: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        _apply_block(tl.program_id(0) * BLOCK_T, ids_ptr, w_ptr, valid_ptr, slot_ptr,
                     out_ids_ptr, out_w_ptr, T, K, E, s_it, s_ik, s_wt, s_wk, s_v, s_ot,
                     HAS_VALID, BLOCK_T, K_PAD)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def regs_route_fits(T: int, k: int, num_experts: int) -> bool:
    """The register kernel's tiles hold a step of T tokens of top-k over these experts."""
    return (max(2, _pow2(T)) * max(2, _pow2(k)) <= REGS_MAX_ASSIGNMENTS
            and _pow2(num_experts) <= REGS_MAX_EXPERTS)


def _plan_config(n_assign: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the one-program plan kernel: wider for long steps, since
    its histogram loop runs on one SM and waits on load latency. Few buckets, few binaries."""
    if n_assign <= 2048:
        return 1024, 4
    if n_assign <= 8192:
        return 2048, 8
    return 4096, 16


def brownout_route_triton(
    topk_ids: torch.Tensor,  # [T, k] int, expert ids in [0, E) or -1 (shed)
    topk_weights: torch.Tensor,  # [T, k] float
    tau,  # 0-d tensor (any float dtype, on the device) or a Python float
    group_of: torch.Tensor,  # [E] int, group index of each routed expert
    num_experts: int,
    valid: Optional[torch.Tensor] = None,  # [T] bool
    fused: Optional[bool] = None,  # one launch; None: by size (FUSED_MAX_ASSIGNMENTS)
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,  # (ids, weights) [T, k] to write
    regs: Optional[bool] = None,  # the register kernel; None: where it fits (`regs_route_fits`)
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, k] (input dtype, -1 = skip), weights [T, k]
    """`brownout_route` in one or two Triton launches (see the module docstring). `out`:
    views to write instead of new tensors (unit column stride, one row stride for both); they
    may be the inputs themselves, since every token's row is read before it is written.
    `fused` applies to the plan kernel, which runs where `regs` is False or does not fit."""
    T, k = topk_ids.shape
    E = num_experts
    dev = topk_ids.device
    if out is None:
        out_ids = torch.empty((T, k), dtype=topk_ids.dtype, device=dev)
        out_w = torch.empty((T, k), dtype=topk_weights.dtype, device=dev)
    else:
        out_ids, out_w = out
        if out_ids.shape != (T, k) or out_w.shape != (T, k) or out_ids.stride(1) != 1 \
                or out_w.stride(1) != 1 or out_ids.stride(0) != out_w.stride(0):
            raise ValueError(f"out views must be [T, k] = {(T, k)} with unit column strides and one row "
                             f"stride, got {tuple(out_ids.shape)} {out_ids.stride()} / "
                             f"{tuple(out_w.shape)} {out_w.stride()}")
    if T == 0:
        return out_ids, out_w
    scratch = torch.empty(3 * E, dtype=torch.int32, device=dev)  # counts, redirected, slot_of
    tau_is_ptr = torch.is_tensor(tau)
    if tau_is_ptr and tau.device != dev:
        tau = tau.to(dev)  # out of contract (a host tensor); the copy is not capturable
    # a Python tau is rounded to float32 here as the torch version does (the interpreter
    # hands float arguments over unrounded)
    tau_val = 0.0 if tau_is_ptr else float(torch.tensor(float(tau), dtype=torch.float32))
    tau_ptr = tau if tau_is_ptr else scratch
    has_valid = valid is not None
    v = valid.view(torch.uint8) if has_valid and valid.dtype == torch.bool else valid
    v = v if has_valid else scratch
    s_v = v.stride(0) if has_valid else 0
    e_pad = max(2, _pow2(E))
    k_pad = max(2, _pow2(k))
    fits = regs_route_fits(T, k, E)
    if regs is None:
        regs = REGS_ROUTE and fits
    elif regs and not fits:
        raise ValueError(f"{T} tokens of top-{k} over {E} experts exceed the register kernel's "
                         f"{REGS_MAX_ASSIGNMENTS} padded assignments or {REGS_MAX_EXPERTS} experts")
    if regs:
        t_pad = max(2, _pow2(T))
        _route_regs_kernel[(1,)](
            topk_ids, topk_weights, v, group_of, tau_ptr, tau_val, out_ids, out_w,
            T, k, E, topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0),
            topk_weights.stride(1), s_v, group_of.stride(0), out_ids.stride(0),
            HAS_VALID=has_valid, TAU_IS_PTR=tau_is_ptr, E_PAD=e_pad, T_PAD=t_pad, K_PAD=k_pad,
            num_warps=4 if t_pad * k_pad <= 256 and e_pad <= 64 else 8, **pdl.launch_opts(topk_ids))
        return out_ids, out_w
    if fused is None:
        fused = T * k <= FUSED_MAX_ASSIGNMENTS
    block_t = min(256, 4096 // (k_pad * k_pad))  # [BT, KP, KP] tiles of <= 4K elements
    block_n, warps = _plan_config(T * k)
    strides = (topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0),
               topk_weights.stride(1), s_v)
    _plan_kernel[(1,)](
        topk_ids, topk_weights, v, group_of, tau_ptr, tau_val, scratch, out_ids, out_w,
        T, k, E, *strides, group_of.stride(0), out_ids.stride(0),
        HAS_VALID=has_valid, TAU_IS_PTR=tau_is_ptr, FUSED=fused, E_PAD=e_pad,
        HBINS=_pow2(E + 1), CH=min(e_pad, max(8, 4096 // e_pad)), BLOCK_N=block_n, BLOCK_T=block_t,
        K_PAD=k_pad, num_warps=warps, **pdl.launch_opts(topk_ids))
    if not fused:
        _apply_kernel[(triton.cdiv(T, block_t),)](
            topk_ids, topk_weights, v, scratch[2 * E:], out_ids, out_w, T, k, E, *strides,
            out_ids.stride(0),
            HAS_VALID=has_valid, BLOCK_T=block_t, K_PAD=k_pad, num_warps=4,
            **pdl.launch_opts(topk_ids))
    return out_ids, out_w
