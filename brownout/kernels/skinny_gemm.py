"""Linear layers at decode sizes: y = x W^T (+ b) for a few rows of x, one Triton launch.

At one to a few tokens a linear layer only streams its weight, so its time is the weight's
bytes over the bandwidth the launch reaches. cuBLAS picks 64-column tiles there: the
attention's QKV projection of a 2.7B-active MoE (6144 columns) gets 96 programs on a
132-SM GPU, its output projection (2048 columns) 32, and the router (61 columns) a GEMV
split into a dot kernel and a reduction kernel. This kernel gives the weight's rows to
enough programs to fill the GPU: 32-column tiles, and where that still leaves SMs idle, the
K dimension split among programs, whose float32 partials the last program of each tile to
finish sums (an arrival counter per tile, reset by that program, so one launch does all of
it and CUDA graphs replay it as is).

The rows ride as the N side of a [BLOCK_N, BLOCK_K] x [BLOCK_K, BLOCK_M] product (x
transposed, padded to a power of two of at least the 16 rows a tensor-core tile needs), so
the weight is read once for all of them. Float32 accumulation, one rounding to the
output's dtype, bias added in float32 before it, as cuBLAS's bf16 GEMM does; results match
`torch.nn.functional.linear` to bf16 rounding, not bitwise.

`DecodeLinear` layers take it where it applies (up to SKINNY_MAX_ROWS rows and SKINNY_MAX_N
outputs, where cuBLAS's tiles leave SMs idle); `BROWNOUT_SKINNY_GEMM=0` turns it off.

An attention layer's QKV projection takes a second kernel on the same main loop and split-K
reduction (`qkv_rope_write_kv`), whose tiles are one head each (head_dim weight rows), so a
neox rotary pair (i, i + head_dim / 2) lies in one tile. Its epilogue, run by the last
program of each head to arrive, reads the head's two halves back from the float32 workspace
(at every split, so no register shuffle pairs them), rounds them as the projection's output,
then rotates q and k heads in float32 and rounds again; it stores q, and writes k and v heads
into the paged KV cache at each row's slot (slot -1, a padding row, writes nothing). That is
the QKV GEMM and `paged_attention.rope_write_kv` in one launch, with their bits where the GEMM
has the same tiles and split (`skinny_linear(..., block_n=head_dim, block_k=bk, split_k=s)`);
against the default 32 x 128 tiles, which split K less, the float32 sums run in another order.
The layer takes it where the projection would take this GEMM and has no q/k norms;
`BROWNOUT_QKV_EPILOGUE=0` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use F.linear
    triton = None

SKINNY_MAX_ROWS = 64  # decode batches up to 64 ride in one tile; beyond, cuBLAS's own tiles fill
SKINNY_MAX_N = 4096  # outputs up to which cuBLAS's 64-column tiles leave half of 132 SMs idle
# Wider layers (a QKV projection) take the kernel at steps of up to WIDE_MAX_ROWS rows when it
# launches with PDL: its weights' first lines then arrive during the previous kernel, which
# cuBLAS's launch does not overlap; at more rows cuBLAS's own tiles are faster.
# BROWNOUT_WIDE_MAX_ROWS overrides the row limit, for timing the step at other limits.
WIDE_MAX_N = 8192
WIDE_MAX_ROWS = int(os.environ.get("BROWNOUT_WIDE_MAX_ROWS", "8"))
BLOCK_N = 32  # weight rows per program: the fastest of 16 and 32 in the tile sweep
BLOCK_K = 128  # columns per loop step (8 KB of weight per program), the sweep's fastest
MAX_SPLIT_K = 16  # partial sums per tile: beyond it the reduction outweighs the gain
MIN_K_PER_SPLIT = 256  # a program streams at least this many columns (two loop steps)
NUM_STAGES = 3  # loop steps in flight per program (software pipelining of the weight loads)
PROGRAMS_PER_SM = 2  # programs in flight per SM that saturate its share of the bandwidth
WORKSPACE_FLOATS = 1 << 20  # float32 partials shared by all calls (4 MiB); larger calls don't split
MAX_TILES = 1 << 14  # arrival counters, one a tile: far more tiles than SKINNY_MAX_N gives
ENV = "BROWNOUT_SKINNY_GEMM"
QKV_ENV = "BROWNOUT_QKV_EPILOGUE"
MIN_HEAD_DIM = 16  # a head's rows are the M side of the main loop's tl.dot, which takes 16 or more
MAX_HEAD_DIM = 128  # the largest head tile whose sm_90 build fits registers (no spills)
MIN_HEAD_BLOCK_K = 32  # a head tile's columns per loop step: 64 bytes of each bf16 row, two DRAM sectors
HEAD_TILE_8_WARPS = 24 << 10  # bytes of a head tile's loop step (weight and x) and accumulator above
#                               which it takes 8 warps: 4 warps spill registers on sm_90 at 32 KiB


ENABLED = os.environ.get(ENV, "1") != "0"  # read once: DecodeLinear asks on every call
QKV_EPILOGUE = os.environ.get(QKV_ENV, "1") != "0"  # read once: every attention layer asks each step


def _kernels_interpreted() -> bool:
    return triton is not None and not isinstance(_skinny_kernel, triton.runtime.JITFunction)


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

    @triton.jit
    def _accumulate(x_ptr, w_ptr, rn, n_ok, M, k_lo, k_hi, stride_xm, stride_wn,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        """The main loop: W[rn, k_lo:k_hi] x[:, k_lo:k_hi]^T as a float32 [BLOCK_N, BLOCK_M]
        tile (weight rows by x rows). It reads x, so it runs after the kernel's `pdl_wait`."""
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None],
                         mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            if DOT_F32:  # the CPU interpreter's dot is wrong on bf16 operands
                w, xt = w.to(tl.float32), xt.to(tl.float32)
            acc += tl.dot(w, xt, input_precision=PRECISION)
        return acc

    @triton.jit
    def _partial_ptrs(ws_ptr, tile, split, row0, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_M: tl.constexpr):
        """Rows row0 .. row0 + ROWS of split `split`'s partial of `tile` in the workspace, laid
        out [SPLIT_K, tiles, BLOCK_N, BLOCK_M]."""
        cell = (row0 + tl.arange(0, ROWS))[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        return ws_ptr + (split * tl.num_programs(0) + tile).to(tl.int64) * (BLOCK_N * BLOCK_M) + cell

    @triton.jit
    def _store_partial(acc, ws_ptr, tile, split, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        tl.store(_partial_ptrs(ws_ptr, tile, split, 0, BLOCK_N, BLOCK_N, BLOCK_M), acc)
        tl.debug_barrier()  # every thread's partial is written before the arrival (or read-back)

    @triton.jit
    def _last_to_arrive(count_ptr, tile, SPLIT_K: tl.constexpr):
        """Count this program in at its tile's counter: True for the tile's last program,
        which then sees every other program's partial."""
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        return arrived == SPLIT_K - 1

    @triton.jit
    def _sum_partials(ws_ptr, tile, row0, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Rows row0 .. row0 + ROWS of `tile`, summed over the splits in split order."""
        acc = tl.zeros([ROWS, BLOCK_M], dtype=tl.float32)
        for s in range(0, SPLIT_K):
            acc += tl.load(_partial_ptrs(ws_ptr, tile, s, row0, ROWS, BLOCK_N, BLOCK_M),
                           cache_modifier=".cg")
        return acc

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_wn, stride_om,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                       PRECISION: tl.constexpr, PF_LINES: tl.constexpr, PF_STEP: tl.constexpr,
                       USE_PDL: tl.constexpr):
        tile = tl.program_id(0)
        split = tl.program_id(1)
        rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        # the first lines of this program's weight rows, asked of L2 before the wait
        pf_k = tl.minimum(k_lo + tl.arange(0, PF_LINES) * PF_STEP, k_hi - 1)
        prefetch_l2(w_ptr + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn + pf_k[None, :],
                    USE_PDL)
        pdl_wait(USE_PDL)
        acc = _accumulate(x_ptr, w_ptr, rn, n_ok, M, k_lo, k_hi, stride_xm, stride_wn,
                          BLOCK_N, BLOCK_M, BLOCK_K, DOT_F32, PRECISION)
        pdl_launch(USE_PDL)
        if SPLIT_K > 1:
            # partials [SPLIT_K, tiles, BLOCK_N, BLOCK_M]; the last program to arrive sums them
            _store_partial(acc, ws_ptr, tile, split, BLOCK_N, BLOCK_M)
            if _last_to_arrive(count_ptr, tile, SPLIT_K):
                acc = _sum_partials(ws_ptr, tile, 0, BLOCK_N, SPLIT_K, BLOCK_N, BLOCK_M)
                tl.store(count_ptr + tile, 0)  # ready for the next launch (graph replays)
                if HAS_BIAS:
                    acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None],
                         acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None],
                     acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

    @triton.jit
    def _store_kv(cache_ptr, slot, ok, kvh, y1, y2, stride_b, stride_s, stride_h,
                  HALF: tl.constexpr, KV_BLOCK: tl.constexpr):
        """Head `kvh`'s halves y1, y2 [HALF, BLOCK_M] of each row into the paged cache at its
        slot; rows not `ok` (padding, slot -1, or past the step) write nothing."""
        slot = tl.where(ok, slot, 0)
        base = (slot // KV_BLOCK) * stride_b + (slot % KV_BLOCK) * stride_s + kvh * stride_h
        ptrs = cache_ptr + base[None, :] + tl.arange(0, HALF)[:, None]
        tl.store(ptrs, y1.to(cache_ptr.dtype.element_ty), mask=ok[None, :])
        tl.store(ptrs + HALF, y2.to(cache_ptr.dtype.element_ty), mask=ok[None, :])

    @triton.jit
    def _qkv_rope_kernel(x_ptr, w_ptr, b_ptr, q_ptr, ws_ptr, count_ptr, pos_ptr, cos_ptr, sin_ptr,
                         k_cache_ptr, v_cache_ptr, slot_ptr, M, K, K_PER_SPLIT, Hq, Hkv,
                         stride_xm, stride_wn, stride_qt, stride_qh, stride_c,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, KV_BLOCK: tl.constexpr,
                         DOT_F32: tl.constexpr, PRECISION: tl.constexpr, PF_LINES: tl.constexpr,
                         PF_STEP: tl.constexpr, USE_PDL: tl.constexpr):
        # one tile: one head's HEAD_DIM weight rows (q heads, then k heads, then v heads), so a
        # neox rotary pair (i, i + HEAD_DIM / 2) lies in one tile; program (head, split) sums
        # one K slice of it, and the head's last program to arrive finishes the head
        HALF: tl.constexpr = HEAD_DIM // 2
        head = tl.program_id(0)
        split = tl.program_id(1)
        rn = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        # the first lines of this program's weight rows, asked of L2 before the wait
        pf_k = tl.minimum(k_lo + tl.arange(0, PF_LINES) * PF_STEP, k_hi - 1)
        prefetch_l2(w_ptr + rn[:, None].to(tl.int64) * stride_wn + pf_k[None, :], USE_PDL)
        pdl_wait(USE_PDL)
        acc = _accumulate(x_ptr, w_ptr, rn, rn >= 0, M, k_lo, k_hi, stride_xm, stride_wn,
                          HEAD_DIM, BLOCK_M, BLOCK_K, DOT_F32, PRECISION)
        pdl_launch(USE_PDL)
        # the partial goes through the workspace at every split: the epilogue reads the head's
        # two halves back as separate [HALF, BLOCK_M] tiles (no register shuffle)
        _store_partial(acc, ws_ptr, head, split, HEAD_DIM, BLOCK_M)
        last = True
        if SPLIT_K > 1:
            last = _last_to_arrive(count_ptr, head, SPLIT_K)
        if last:
            if SPLIT_K > 1:
                tl.store(count_ptr + head, 0)  # ready for the next launch (graph replays)
            j = tl.arange(0, HALF)
            rm = tl.arange(0, BLOCK_M)
            m_ok = rm < M
            y1 = _sum_partials(ws_ptr, head, 0, HALF, SPLIT_K, HEAD_DIM, BLOCK_M)  # [HALF, BLOCK_M]
            y2 = _sum_partials(ws_ptr, head, HALF, HALF, SPLIT_K, HEAD_DIM, BLOCK_M)
            if HAS_BIAS:
                y1 += tl.load(b_ptr + head * HEAD_DIM + j).to(tl.float32)[:, None]
                y2 += tl.load(b_ptr + head * HEAD_DIM + HALF + j).to(tl.float32)[:, None]
            # the projection's rounding to x's dtype first, as `skinny_linear` stores it; the
            # rotary then computes in float32 from those values and rounds again, as
            # `rope_write_kv` does: the same bits as the two launches
            y1 = y1.to(q_ptr.dtype.element_ty)
            y2 = y2.to(q_ptr.dtype.element_ty)
            if head < Hq + Hkv:  # a q or k head: rotary at each row's position
                pos = tl.load(pos_ptr + rm, mask=m_ok, other=0).to(tl.int64)
                cos = tl.load(cos_ptr + pos[None, :] * stride_c + j[:, None])  # [HALF, BLOCK_M]
                sin = tl.load(sin_ptr + pos[None, :] * stride_c + j[:, None])
                a1 = y1.to(tl.float32)
                a2 = y2.to(tl.float32)
                r1 = (a1 * cos - a2 * sin).to(q_ptr.dtype.element_ty)
                r2 = (a2 * cos + a1 * sin).to(q_ptr.dtype.element_ty)
                if head < Hq:
                    qo = q_ptr + rm[None, :].to(tl.int64) * stride_qt + head * stride_qh + j[:, None]
                    tl.store(qo, r1, mask=m_ok[None, :])
                    tl.store(qo + HALF, r2, mask=m_ok[None, :])
                else:
                    slot = tl.load(slot_ptr + rm, mask=m_ok, other=-1).to(tl.int64)
                    _store_kv(k_cache_ptr, slot, m_ok & (slot >= 0), head - Hq, r1, r2,
                              stride_kb, stride_ks, stride_kh, HALF, KV_BLOCK)
            else:  # a v head: into the cache as projected
                slot = tl.load(slot_ptr + rm, mask=m_ok, other=-1).to(tl.int64)
                _store_kv(v_cache_ptr, slot, m_ok & (slot >= 0), head - Hq - Hkv, y1, y2,
                          stride_vb, stride_vs, stride_vh, HALF, KV_BLOCK)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K partials and arrival counters of `device` (counters start at zero and every
    launch leaves them there). Allocated on the first call, which serving makes in the warm-up
    forward before graph capture."""
    return (torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
            torch.zeros(MAX_TILES, dtype=torch.int32, device=device))


def choose_split_k(n_tiles: int, K: int, device: torch.device, block_n: int = BLOCK_N,
                   block_m: int = 16) -> int:
    """Split K only as far as it takes to give every SM `PROGRAMS_PER_SM` programs, keeping at
    least `MIN_K_PER_SPLIT` columns a program; a power of two (few compiled variants)."""
    if device.type != "cuda" or _kernels_interpreted():
        sms = 8  # the interpreter: exercise the split on small shapes
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-PROGRAMS_PER_SM * sms // n_tiles)
    split = max(1, min(want, K // MIN_K_PER_SPLIT, MAX_SPLIT_K))
    split = 1 << (split.bit_length() - 1)
    while split > 1 and not fits_workspace(split, n_tiles, block_n, block_m):
        split //= 2
    return split


def fits_workspace(split: int, n_tiles: int, block_n: int, block_m: int) -> bool:
    """Whether a launch's float32 partials and arrival counters fit the shared scratch."""
    return split == 1 or (split * n_tiles * block_n * block_m <= WORKSPACE_FLOATS and n_tiles <= MAX_TILES)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_linear` takes this call: triton present, a CUDA (or interpreted)
    tensor without autograd, at most SKINNY_MAX_ROWS rows and SKINNY_MAX_N outputs (wider
    layers fill the GPU with cuBLAS's own tiles; up to WIDE_MAX_N at WIDE_MAX_ROWS rows under
    PDL), contiguous rows of the weight."""
    return (triton is not None and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS
            and (weight.shape[0] <= SKINNY_MAX_N
                 or (weight.shape[0] <= WIDE_MAX_N and x.shape[0] <= WIDE_MAX_ROWS and pdl.active(x)))
            and (x.is_cuda or _kernels_interpreted()) and not torch.is_grad_enabled()
            and x.stride(-1) == 1 and weight.stride(-1) == 1 and x.dtype == weight.dtype)


def row_block(M: int) -> int:
    """The row tile: a power of two of at least 16 (the smallest tensor-core tile)."""
    return max(16, 1 << max(0, (M - 1).bit_length()))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  split_k: int | None = None, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
                  num_stages: int = NUM_STAGES) -> torch.Tensor:
    """x [M, K] (M <= SKINNY_MAX_ROWS) @ weight[N, K]^T (+ bias [N]) -> [M, N] in x's dtype.
    `split_k` overrides the K split (a power of two); the tile arguments serve the benchmark's
    sweep."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_tiles = triton.cdiv(N, block_n)
    block_m = row_block(M)
    split = choose_split_k(n_tiles, K, x.device, block_n, block_m) if split_k is None else split_k
    if not 1 <= split <= MAX_SPLIT_K or not fits_workspace(split, n_tiles, block_n, block_m):
        raise ValueError(f"split_k {split} for {n_tiles} tiles of {block_n} x {block_m}: at most "
                         f"{MAX_SPLIT_K} splits whose partials fit {WORKSPACE_FLOATS} floats")
    ws, counts = _scratch(x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    on_gpu = x.is_cuda and not _kernels_interpreted()
    _skinny_kernel[(n_tiles, split)](
        x, weight, bias if bias is not None else x, out, ws, counts, M, N, K, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_F32=not on_gpu, PRECISION="ieee" if x.dtype == torch.float32 else None,
        PF_LINES=pdl.PREFETCH_LINES, PF_STEP=pdl.L2_LINE_BYTES // weight.element_size(),
        num_warps=4, num_stages=num_stages if on_gpu else 1, **pdl.launch_opts(x))
    return out


def head_tiles(head_dim: int, block_m: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of `qkv_rope_write_kv`'s head tiles: as many weight elements per
    loop step as BLOCK_N x BLOCK_K (so a 128-row head streams 32 columns a step), and 8 warps
    where the step's tiles and the accumulator outgrow 4 warps' registers."""
    block_k = max(MIN_HEAD_BLOCK_K, min(BLOCK_K, BLOCK_N * BLOCK_K // head_dim))
    footprint = (head_dim + block_m) * block_k * element_size + head_dim * block_m * 4
    return block_k, 4 if footprint <= HEAD_TILE_8_WARPS else 8


def epilogue_fits(split: int, n_heads: int, head_dim: int, block_m: int) -> bool:
    """Whether `qkv_rope_write_kv`'s partials (which pass through the workspace at every
    split) and arrival counters fit the shared scratch."""
    return split * n_heads * head_dim * block_m <= WORKSPACE_FLOATS and n_heads <= MAX_TILES


def qkv_rope_write_kv_usable(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                             num_kv_heads: int, head_dim: int, qk_norm: bool = False) -> bool:
    """Whether `qkv_rope_write_kv` serves an attention layer's call: where `skinny_linear`
    would take its QKV projection (`usable`), without per-head q/k norms (they come between
    the projection and the rotary), a power-of-two head dim of MIN_HEAD_DIM to MAX_HEAD_DIM,
    weight rows (Hq + 2 Hkv) x head_dim, float32 rotary tables [P, head_dim / 2] with unit
    stride (sin strided as cos), caches [blocks, block_size, Hkv, head_dim] with unit-stride
    heads (the layouts `rope_write_kv` takes), and one split's partials in the workspace."""
    n_heads = num_heads + 2 * num_kv_heads
    return (not qk_norm and usable(x, weight)
            and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0
            and weight.shape[0] == n_heads * head_dim
            and cos.dim() == 2 and cos.shape[-1] == head_dim // 2 and sin.shape == cos.shape
            and cos.dtype == sin.dtype == torch.float32 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
            and k_cache.dim() == 4 and tuple(k_cache.shape[2:]) == (num_kv_heads, head_dim)
            and v_cache.shape == k_cache.shape and k_cache.stride(-1) == v_cache.stride(-1) == 1
            and epilogue_fits(1, n_heads, head_dim, row_block(x.shape[0])))


def qkv_rope_write_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int, *,
                      split_k: int | None = None) -> torch.Tensor:
    """An attention layer's QKV projection, rotary and KV-cache write in one launch.

    x [T, K] @ weight[(Hq + 2 Hkv) * Dh, K]^T (+ bias), whose rows are q's heads, then k's,
    then v's; q and k rotated (neox halves, tables cos/sin [P, Dh/2] at `positions` [T]);
    the rotated k and v written into k_cache/v_cache [blocks, block_size, Hkv, Dh] at
    slot_mapping[t] (slot -1: a padding row, nothing written) -> the rotated q [T, Hq, Dh]
    in x's dtype. The same bits as `skinny_linear(x, weight, bias, block_n=Dh, block_k=bk,
    split_k=s)` then `rope_write_kv` on its q, k, v, at the split s this call takes and bk of
    `head_tiles`. `split_k` overrides the K split (a power of two)."""
    M, K = x.shape
    n_heads = num_heads + 2 * num_kv_heads
    if weight.shape[0] != n_heads * head_dim or head_dim < MIN_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"weight {tuple(weight.shape)} is not {n_heads} heads of a power-of-two "
                         f"head dim >= {MIN_HEAD_DIM} (got {head_dim})")
    q = torch.empty(M, num_heads, head_dim, dtype=x.dtype, device=x.device)
    if M == 0:
        return q
    block_m = row_block(M)
    split = choose_split_k(n_heads, K, x.device, head_dim, block_m) if split_k is None else split_k
    if not 1 <= split <= MAX_SPLIT_K or not epilogue_fits(split, n_heads, head_dim, block_m):
        raise ValueError(f"split_k {split} for {n_heads} heads of {head_dim} x {block_m}: at most "
                         f"{MAX_SPLIT_K} splits whose partials fit {WORKSPACE_FLOATS} floats")
    ws, counts = _scratch(x.device)
    block_k, num_warps = head_tiles(head_dim, block_m, x.element_size())
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    on_gpu = x.is_cuda and not _kernels_interpreted()
    _qkv_rope_kernel[(n_heads, split)](
        x, weight, bias if bias is not None else x, q, ws, counts, positions.reshape(-1), cos, sin,
        k_cache, v_cache, slot_mapping, M, K, k_per_split, num_heads, num_kv_heads,
        x.stride(0), weight.stride(0), q.stride(0), q.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_K=block_k,
        KV_BLOCK=k_cache.shape[1], DOT_F32=not on_gpu,
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        PF_LINES=pdl.PREFETCH_LINES, PF_STEP=pdl.L2_LINE_BYTES // weight.element_size(),
        num_warps=num_warps, num_stages=NUM_STAGES if on_gpu else 1, **pdl.launch_opts(x))
    return q
