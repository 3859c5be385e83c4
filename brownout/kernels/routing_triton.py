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

`router_topk` runs the router GEMM and this selection in one launch (`_router_topk_kernel`)
where the router fits one tile: at most ROUTER_MAX_ROWS tokens and ROUTER_MAX_COLUMNS logit
columns (E and the shared gate), padded to a power of two (`router_topk_usable` says when;
otherwise the router GEMM and `select_experts_triton` run as two launches). Its programs
split the hidden dimension as `skinny_gemm` does: each asks L2 for the first lines of its
slice of the weight before its `pdl_wait`, streams the slice, signals the next kernel
(pdl.py rule 3), writes its float32 partial to a workspace and arrives on a counter. The
last program to arrive sums the partials, rounds them once to x's dtype (what the GEMM
would store), stores those logits and routes every row from exactly those rounded values
(`_select_rows`, the body `_topk_kernel` runs too), so ids equal the two-kernel path's
wherever the logits round alike; then it resets the counter for the next launch or graph
replay. Under PDL the kernel after it launches only once every program has passed its
wait, when every earlier kernel has finished: a `fused_moe(..., x_settled=True)` after it
sees its input x complete whenever an earlier kernel wrote x (the early align needs x
complete when the align starts; x may still be in flight when this kernel starts).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from brownout.kernels import pdl, skinny_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use `routing.select_experts`
    triton = None

MAX_EXPERTS = 1024  # one row of logits lives in one program's registers; wider routers use torch
MAX_TOP_K = 8  # the families served route to at most 8 experts; the selection loop unrolls k times
MAX_COLUMNS = 16  # k routed plus the shared slots: one row of outputs stays in registers
BLOCK_T = 1  # rows per program: one warp per row keeps every reduction in warp shuffles
# `router_topk`, the router GEMM and the top-k in one launch:
# decode steps up to this many tokens: the last program routes every row alone, which at
# 64 rows costs more than the separate top-k kernel's one program a row saves
ROUTER_MAX_ROWS = 16
ROUTER_MAX_COLUMNS = 256  # every logit column (E, the shared gate) sits in one register tile of the last program
ROUTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the dtypes tl.dot takes on both sides
MIN_TILE = 16  # tl.dot's smallest tile side: the column tile and the step are at least this
MAX_BLOCK_K = 128  # the longest step along D: skinny_gemm's fastest in its tile sweep
STEP_BYTES = 16 * 1024  # weight bytes per loop step: the NUM_STAGES steps in flight fit shared memory at any width
NUM_STAGES = skinny_gemm.NUM_STAGES  # loop steps in flight per program, as the GEMM it replaces
ROUTER_MAX_SPLIT = skinny_gemm.MAX_SPLIT_K  # partial sums per launch: D splits as skinny_gemm splits it


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
    from brownout.kernels.skinny_gemm import _accumulate  # the skinny GEMM's main loop

    @triton.jit
    def _select_rows(x, g, offs_t, mt, active_ptr, valid_ptr, out_w_ptr, out_ids_ptr, E, shared_first, s_v,
                     K: tl.constexpr, RENORM: tl.constexpr, HAS_ACTIVE: tl.constexpr, N_SHARED: tl.constexpr,
                     GATED: tl.constexpr, HAS_VALID: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_T: tl.constexpr):
        """Steps 2-6 for the rows offs_t [BT] (mt: those that exist): their float32 logits x
        [BT, EP] (columns >= E and missing rows are ignored) and the shared gate's float32
        logits g [BT] (used only when GATED) -> weights and ids stored to the contiguous
        [T, K + N_SHARED] outputs."""
        offs_e = tl.arange(0, E_PAD)  # [EP]
        offs_k = tl.arange(0, K_PAD)  # [KP]
        m2 = mt[:, None] & (offs_e < E)[None, :]  # [BT, EP]
        x = tl.where(m2, x, float("-inf"))
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
        mt = offs_t < T
        m2 = mt[:, None] & (offs_e < E)[None, :]  # [BT, EP]
        x = tl.load(logits_ptr + offs_t[:, None] * s_t + offs_e[None, :] * s_e, mask=m2,
                    other=float("-inf")).to(tl.float32)  # [BT, EP]
        if GATED:  # the shared expert's gate logit follows the router's E
            g = tl.load(logits_ptr + offs_t * s_t + E * s_e, mask=mt, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_T], dtype=tl.float32)
        _select_rows(x, g, offs_t, mt, active_ptr, valid_ptr, out_w_ptr, out_ids_ptr, E, shared_first, s_v,
                     K, RENORM, HAS_ACTIVE, N_SHARED, GATED, HAS_VALID, E_PAD, K_PAD, BLOCK_T)

    @triton.jit
    def _route_tile(acc, rn, rm, n_ok, m_ok, logits_ptr, stride_lm, active_ptr, valid_ptr, out_w_ptr,
                    out_ids_ptr, E, shared_first, s_v,
                    K: tl.constexpr, RENORM: tl.constexpr, HAS_ACTIVE: tl.constexpr, N_SHARED: tl.constexpr,
                    GATED: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, RNE_BITS: tl.constexpr):
        """The router's summed float32 logits acc [BN, BM] (columns, rows) -> the logits in
        the output's dtype, stored [T, N], and the top-k of all rows from exactly those
        rounded values."""
        if RNE_BITS:  # the CPU interpreter's float32 -> bf16 cast truncates: round to nearest
            # even through the bits, as the GPU's cast does
            b = acc.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            acc = b.to(tl.float32, bitcast=True)  # a bf16 value: the cast below is exact
        lg = acc.to(logits_ptr.dtype.element_ty)  # one rounding, as the GEMM's output
        tl.store(logits_ptr + rm[None, :] * stride_lm + rn[:, None], lg, mask=n_ok[:, None] & m_ok[None, :])
        x = tl.trans(lg.to(tl.float32))  # [BM, BN]: a row of logits per token
        if GATED:  # column E, picked out of the registers
            g = tl.sum(tl.where(rn[None, :] == E, x, 0.0), axis=1)  # [BM]
        else:
            g = tl.zeros([BLOCK_M], dtype=tl.float32)
        _select_rows(x, g, rm, m_ok, active_ptr, valid_ptr, out_w_ptr, out_ids_ptr, E, shared_first, s_v,
                     K, RENORM, HAS_ACTIVE, N_SHARED, GATED, HAS_VALID, BLOCK_N, K_PAD, BLOCK_M)

    @triton.jit(do_not_specialize=["T"])  # one binary for every step length
    def _router_topk_kernel(x_ptr, w_ptr, logits_ptr, ws_ptr, count_ptr, active_ptr, valid_ptr, out_w_ptr,
                            out_ids_ptr, T, N, D, D_PER_SPLIT, E, stride_xm, stride_wn, stride_lm,
                            shared_first, s_v,
                            SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, RNE_BITS: tl.constexpr,
                            PRECISION: tl.constexpr,
                            PF_LINES: tl.constexpr, PF_STEP: tl.constexpr,
                            K: tl.constexpr, RENORM: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                            N_SHARED: tl.constexpr, GATED: tl.constexpr, HAS_VALID: tl.constexpr,
                            K_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        """Program `split` sums columns [split * D_PER_SPLIT, + D_PER_SPLIT) of x [T, D] @
        w [N, D]^T for all N logit columns (BN, one tile) and all T rows (BM); the last of
        the SPLIT_K programs to arrive sums the partials and routes every row."""
        split = tl.program_id(0)
        rn = tl.arange(0, BLOCK_N)  # every logit column: E experts, the shared gate, padding
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < T
        k_lo = split * D_PER_SPLIT
        k_hi = tl.minimum(D, k_lo + D_PER_SPLIT)
        # the first lines of this program's slice of every weight row, asked of L2 before the wait
        pf_k = tl.minimum(k_lo + tl.arange(0, PF_LINES) * PF_STEP, k_hi - 1)
        prefetch_l2(w_ptr + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn + pf_k[None, :],
                    USE_PDL)
        pdl_wait(USE_PDL)
        acc = _accumulate(x_ptr, w_ptr, rn, n_ok, T, k_lo, k_hi, stride_xm, stride_wn,
                          BLOCK_N, BLOCK_M, BLOCK_K, DOT_F32, PRECISION)
        pdl_launch(USE_PDL)  # after the weight stream (rule 3)
        if SPLIT_K > 1:
            # partials [SPLIT_K, BN, BM]; the last program to arrive sums them and routes
            cell = rn[:, None] * BLOCK_M + rm[None, :]
            tl.store(ws_ptr + split * (BLOCK_N * BLOCK_M) + cell, acc)
            tl.debug_barrier()  # every thread's partial is written before the arrival
            arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    acc += tl.load(ws_ptr + s * (BLOCK_N * BLOCK_M) + cell, cache_modifier=".cg")
                tl.store(count_ptr, 0)  # ready for the next launch (graph replays)
                _route_tile(acc, rn, rm, n_ok, m_ok, logits_ptr, stride_lm, active_ptr, valid_ptr, out_w_ptr,
                            out_ids_ptr, E, shared_first, s_v, K, RENORM, HAS_ACTIVE, N_SHARED, GATED,
                            HAS_VALID, BLOCK_N, K_PAD, BLOCK_M, RNE_BITS)
        else:
            _route_tile(acc, rn, rm, n_ok, m_ok, logits_ptr, stride_lm, active_ptr, valid_ptr, out_w_ptr,
                        out_ids_ptr, E, shared_first, s_v, K, RENORM, HAS_ACTIVE, N_SHARED, GATED,
                        HAS_VALID, BLOCK_N, K_PAD, BLOCK_M, RNE_BITS)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_routing(E: int, top_k: int, n_shared: int, gated: bool, columns: int, have: str) -> None:
    """Raise unless the kernels can route k of E experts (+ n_shared shared columns) from
    `columns` logit columns (`have` names them, e.g. "router logits have {} columns")."""
    if not 1 <= top_k <= min(MAX_TOP_K, E) or E > MAX_EXPERTS or top_k + n_shared > MAX_COLUMNS:
        raise ValueError(f"top_k {top_k} of {E} experts (+{n_shared} shared) is outside the kernel's "
                         f"range (k <= {MAX_TOP_K}, E <= {MAX_EXPERTS}, columns <= {MAX_COLUMNS})")
    if columns < E + int(gated):
        raise ValueError(f"{have.format(columns)}; {E} experts"
                         f"{' and the shared gate' if gated else ''} need {E + int(gated)}")


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
    _check_routing(E, top_k, n_shared, gated, router_logits.shape[1], "router logits have {} columns")
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


@functools.cache
def _router_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`router_topk`'s split-K partials and its arrival counter on `device` (zero between
    launches: the last program of each launch resets it). Allocated on the first call, which
    serving makes in the warm-up forward before graph capture.

    One workspace and one counter serve every layer's launch because launches on one stream
    never touch them at the same time: a launch reads or writes them only after its
    `pdl_wait`, which returns once the kernel before it has finished, and that kernel
    finished only after its own wait; so at most one kernel of a stream is past its wait at
    any moment (pdl.py rule 1; rule 4's early align moves a signal, never a wait), and
    without PDL the stream runs kernels one after another anyway. skinny_gemm's `_scratch`
    rests on the same rule and could serve here too; this kernel keeps its own (256 KB) so
    that neither kernel's layout or reset constrains the other's."""
    tile = skinny_gemm.row_block(ROUTER_MAX_ROWS) * max(MIN_TILE, _pow2(ROUTER_MAX_COLUMNS))  # the widest launch's
    return (torch.empty(ROUTER_MAX_SPLIT * tile, dtype=torch.float32,
                        device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def router_topk_usable(x: torch.Tensor, weight: torch.Tensor, top_k: int, num_shared: int = 0, *,
                       num_experts: Optional[int] = None, gated: bool = False) -> bool:
    """Whether `router_topk` takes this router: triton present, a CUDA (or interpreted)
    tensor without autograd, 1 to ROUTER_MAX_ROWS rows, at most ROUTER_MAX_COLUMNS logit
    columns (the experts and, `gated`, the shared gate's row after them), x and the weight
    of one dtype with contiguous rows, and a top-k the selection handles. Otherwise the caller runs the router GEMM and
    `select_experts_triton` (or the torch path) as two launches."""
    if triton is None or x.dim() != 2 or weight.dim() != 2:
        return False
    E = weight.shape[0] if num_experts is None else num_experts
    return (1 <= x.shape[0] <= ROUTER_MAX_ROWS and 1 <= weight.shape[0] <= ROUTER_MAX_COLUMNS
            and E + int(gated) <= weight.shape[0] and x.shape[1] == weight.shape[1] >= 1
            and x.dtype == weight.dtype and x.dtype in ROUTER_DTYPES
            and x.stride(-1) == 1 and weight.stride(-1) == 1 and not torch.is_grad_enabled()
            and triton_topk_available(x.device, E, top_k, num_shared))


def router_topk(
    x: torch.Tensor,  # [T, D], T <= ROUTER_MAX_ROWS
    weight: torch.Tensor,  # [N, D]: the router's E rows (+ the shared gate's), N <= ROUTER_MAX_COLUMNS
    top_k: int,
    renormalize: bool,
    active_k: Optional[torch.Tensor] = None,  # 0-d int on the device: routed experts kept (k')
    *,
    num_experts: Optional[int] = None,  # E (default: every row of the weight)
    shared=None,  # routing.SharedSlots of a folded shared expert, or None
    valid: Optional[torch.Tensor] = None,  # [T] bool: False rows get id -1 everywhere
    split_k: Optional[int] = None,  # programs splitting D (default: skinny_gemm's rule); tests force it
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router GEMM and its top-k in one launch (see the module docstring): weights
    [T, k (+count)] float32 and ids int32, as `select_experts_triton(F.linear(x, weight), ...)`
    gives them, and the logits [T, N] in x's dtype (the shared gate's column for
    `gated_shared_add`, the routing trace)."""
    T, D = x.shape
    N = weight.shape[0]
    E = N if num_experts is None else num_experts
    n_shared = shared.count if shared is not None else 0
    gated = shared is not None and shared.gated
    _check_routing(E, top_k, n_shared, gated, N, "the router weight has {} rows")
    if T > ROUTER_MAX_ROWS or N > ROUTER_MAX_COLUMNS or weight.shape[1] != D or weight.dtype != x.dtype \
            or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype}: at "
                         f"most {ROUTER_MAX_ROWS} rows and {ROUTER_MAX_COLUMNS} weight rows of one dtype, "
                         "contiguous along D")
    dev = x.device
    cols = top_k + n_shared
    logits = torch.empty((T, N), dtype=x.dtype, device=dev)
    out_w = torch.empty((T, cols), dtype=torch.float32, device=dev)
    out_ids = torch.empty((T, cols), dtype=torch.int32, device=dev)
    if T == 0:
        return out_w, out_ids, logits
    block_n = max(MIN_TILE, _pow2(N))
    block_m = skinny_gemm.row_block(T)  # a power of two of at least 16 rows
    block_k = max(MIN_TILE, min(MAX_BLOCK_K, STEP_BYTES // (block_n * x.element_size())))
    split = (skinny_gemm.choose_split_k(1, D, dev, block_n, block_m) if split_k is None
             else split_k)
    if not 1 <= split <= ROUTER_MAX_SPLIT:
        raise ValueError(f"split_k {split}: between 1 and {ROUTER_MAX_SPLIT}")
    d_per_split = triton.cdiv(triton.cdiv(D, split), block_k) * block_k
    ws, count = _router_scratch(dev)
    has_active = active_k is not None
    if has_active and active_k.device != dev:
        active_k = active_k.to(dev)  # out of contract (a host tensor); the copy is not capturable
    on_gpu = x.is_cuda and not _kernels_interpreted()
    _router_topk_kernel[(split,)](
        x, weight, logits, ws, count, active_k if has_active else out_ids,
        valid if valid is not None else out_ids, out_w, out_ids, T, N, D, d_per_split, E,
        x.stride(0), weight.stride(0), logits.stride(0), shared.first if shared is not None else 0,
        valid.stride(0) if valid is not None else 0,
        SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=not on_gpu,
        RNE_BITS=not on_gpu and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else None, PF_LINES=pdl.PREFETCH_LINES,
        PF_STEP=pdl.L2_LINE_BYTES // weight.element_size(),
        K=top_k, RENORM=bool(renormalize), HAS_ACTIVE=has_active, N_SHARED=n_shared, GATED=gated,
        HAS_VALID=valid is not None, K_PAD=max(2, _pow2(cols)),
        num_warps=4, num_stages=NUM_STAGES if on_gpu else 1, **pdl.launch_opts(x))
    return out_w, out_ids, logits
