"""Router top-k selection (`routing.select_experts`) as one Triton launch per MoE layer.

torch issues about four kernels for it (float32 softmax, top-k gather, a bitonic sort of the
k, an elementwise pass or two for shedding and renormalisation); at decode batch sizes each
is a few microseconds of mostly launch latency. `_topk_kernel` does all of it per token row:

  1. load the row's E logits (padded to a power of two, masked), upcast to float32;
  2. softmax statistics: row max, sum of exp(l - max);
  3. k rounds of selection on the logits: the largest not-yet-taken logit, ties to the
     lowest expert index; its weight is exp(l - max) / sum;
  4. shedding: positions >= active_k (read from a 0-d device tensor, so a CUDA graph reads
     its value at replay) get id -1 and weight 0;
  5. renormalisation over the kept weights when `renormalize`;
  6. a folded shared expert's columns after the k (`routing.SharedSlots`: fixed slot ids,
     weight sigmoid(the logit at column E) or 1), and id -1 across a padding row.

Selection compares logits, not probabilities: softmax is monotonic, so the order is the
same, and ids then do not depend on how the exp is rounded on a given device.
Ties: equal logits go to the lowest expert index first. `torch.topk` leaves the order of
equal values unspecified (on the CPU it follows its partial sort, not the index), so ids
match `select_experts` exactly wherever the top k+1 logits of a row are distinct, and tied
positions carry equal weights either way.
Weights match `select_experts` to float32 rounding (exp and sum order differ from torch's).
No host synchronisation; the grid depends on T only, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use `routing.select_experts`
    triton = None

MAX_EXPERTS = 1024  # one row of logits lives in one program's registers; wider routers use torch
MAX_TOP_K = 8  # the families served route to at most 8 experts; the selection loop unrolls k times
MAX_COLUMNS = 16  # k routed plus the shared slots: one row of outputs stays in registers
BLOCK_T = 1  # rows per program: one warp per row keeps every reduction in warp shuffles


def _kernels_interpreted() -> bool:
    """True when triton decorated this module's kernels for its CPU interpreter."""
    return triton is not None and not isinstance(_topk_kernel, triton.runtime.JITFunction)


def triton_topk_available(device: torch.device, num_experts: int, top_k: int,
                          num_shared: int = 0) -> bool:
    """True when the kernel can run these shapes on `device` (CUDA, or the interpreter)."""
    if triton is None or num_experts > MAX_EXPERTS or not 1 <= top_k <= min(MAX_TOP_K, num_experts) \
            or top_k + num_shared > MAX_COLUMNS:
        return False
    return device.type == "cuda" or _kernels_interpreted()


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

    @triton.jit(do_not_specialize=["T"])  # one binary for every step length
    def _topk_kernel(logits_ptr, active_ptr, valid_ptr, out_w_ptr, out_ids_ptr, T, E, s_t, s_e,
                     shared_first, s_v,
                     K: tl.constexpr, RENORM: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                     N_SHARED: tl.constexpr, GATED: tl.constexpr, HAS_VALID: tl.constexpr,
                     E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr):
        """Rows [pid * BT, pid * BT + BT). Shapes: BT rows, EP experts, KP output columns
        (k routed, then N_SHARED shared)."""
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        offs_e = tl.arange(0, E_PAD)  # [EP]
        offs_k = tl.arange(0, K_PAD)  # [KP]
        mt = offs_t < T
        me = offs_e < E
        m2 = mt[:, None] & me[None, :]  # [BT, EP]
        x = tl.load(logits_ptr + offs_t[:, None] * s_t + offs_e[None, :] * s_e, mask=m2,
                    other=float("-inf")).to(tl.float32)  # [BT, EP]
        row_max = tl.max(x, axis=1)  # [BT]
        p = tl.where(m2, tl.exp(x - row_max[:, None]), 0.0)
        denom = tl.sum(p, axis=1)  # [BT]
        avail = m2  # experts not yet selected
        w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        ids = tl.full([BLOCK_T, K_PAD], -1, dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(tl.where(avail, x, float("-inf")), axis=1)  # [BT]
            # lowest index among the available experts holding the best logit
            hit = avail & (x == best[:, None])
            e_j = tl.min(tl.where(hit, offs_e[None, :], E_PAD), axis=1)  # [BT]
            avail = avail & (offs_e[None, :] != e_j[:, None])
            w_j = tl.exp(best - row_max) / denom  # the same rounding as p at e_j
            at_j = offs_k[None, :] == j  # [1, KP]
            w = tl.where(at_j, w_j[:, None], w)
            ids = tl.where(at_j, e_j[:, None], ids)
        if HAS_ACTIVE:
            k_act = tl.load(active_ptr).to(tl.int32)
            keep = offs_k[None, :] < k_act  # [1, KP]
            w = tl.where(keep, w, 0.0)
            ids = tl.where(keep, ids, -1)
        if RENORM:
            w = w / tl.sum(w, axis=1)[:, None]
        KO: tl.constexpr = K + N_SHARED  # output columns
        if N_SHARED > 0:
            is_sh = (offs_k[None, :] >= K) & (offs_k[None, :] < KO)  # [1, KP]
            if GATED:  # the shared expert's gate logit follows the router's E
                g = tl.load(logits_ptr + offs_t * s_t + E * s_e, mask=mt, other=0.0).to(tl.float32)
                w_sh = 1.0 / (1.0 + tl.exp(-g))  # [BT]
            else:
                w_sh = tl.full([BLOCK_T], 1.0, tl.float32)
            w = tl.where(is_sh, w_sh[:, None], w)
            ids = tl.where(is_sh, shared_first + offs_k[None, :] - K, ids)
        if HAS_VALID:  # CUDA-graph padding rows touch no slot
            ok = tl.load(valid_ptr + offs_t * s_v, mask=mt, other=0) != 0  # [BT]
            ids = tl.where(ok[:, None], ids, -1)
        out = offs_t[:, None] * KO + offs_k[None, :]  # outputs are contiguous [T, KO]
        mo = mt[:, None] & (offs_k[None, :] < KO)
        tl.store(out_w_ptr + out, w, mask=mo)
        tl.store(out_ids_ptr + out, ids, mask=mo)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def select_experts_triton(
    router_logits: torch.Tensor,  # [T, E], any float dtype
    top_k: int,
    renormalize: bool,
    active_k: Optional[torch.Tensor] = None,  # 0-d int on the device: routed experts kept (k')
    *,
    num_experts: Optional[int] = None,  # E: the router's columns (default: all of them)
    shared=None,  # routing.SharedSlots of a folded shared expert, or None
    valid: Optional[torch.Tensor] = None,  # [T] bool: False rows get id -1 everywhere
    block_t: int = BLOCK_T,  # rows per program (a power of two); the benchmark sweeps it
    num_warps: Optional[int] = None,  # None: one warp per row, at most 4
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k (+count)] float32, ids int32 (-1 = skip)
    """`routing.route_experts`' torch path in one Triton launch (see the module docstring)."""
    T = router_logits.shape[0]
    E = router_logits.shape[1] if num_experts is None else num_experts
    n_shared = shared.count if shared is not None else 0
    gated = shared is not None and shared.gated
    if not 1 <= top_k <= min(MAX_TOP_K, E) or E > MAX_EXPERTS or top_k + n_shared > MAX_COLUMNS:
        raise ValueError(f"top_k {top_k} of {E} experts (+{n_shared} shared) is outside the kernel's "
                         f"range (k <= {MAX_TOP_K}, E <= {MAX_EXPERTS}, columns <= {MAX_COLUMNS})")
    if router_logits.shape[1] < E + int(gated):
        raise ValueError(f"router logits have {router_logits.shape[1]} columns; {E} experts"
                         f"{' and the shared gate' if gated else ''} need {E + int(gated)}")
    dev = router_logits.device
    cols = top_k + n_shared
    out_w = torch.empty((T, cols), dtype=torch.float32, device=dev)
    out_ids = torch.empty((T, cols), dtype=torch.int32, device=dev)
    if T == 0:
        return out_w, out_ids
    has_active = active_k is not None
    if has_active and active_k.device != dev:
        active_k = active_k.to(dev)  # out of contract (a host tensor); the copy is not capturable
    _topk_kernel[(triton.cdiv(T, block_t),)](
        router_logits, active_k if has_active else out_ids, valid if valid is not None else out_ids,
        out_w, out_ids, T, E,
        router_logits.stride(0), router_logits.stride(1), shared.first if shared is not None else 0,
        valid.stride(0) if valid is not None else 0,
        K=top_k, RENORM=bool(renormalize), HAS_ACTIVE=has_active, N_SHARED=n_shared, GATED=gated,
        HAS_VALID=valid is not None, E_PAD=max(2, _pow2(E)),
        K_PAD=max(2, _pow2(cols)), BLOCK_T=block_t,
        num_warps=num_warps if num_warps is not None else min(4, block_t), **pdl.launch_opts(router_logits))
    return out_w, out_ids
