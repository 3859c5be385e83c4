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
WIDE_MAX_N = 8192
WIDE_MAX_ROWS = 8
BLOCK_N = 32  # weight rows per program: the fastest of 16 and 32 in the tile sweep
BLOCK_K = 128  # columns per loop step (8 KB of weight per program), the sweep's fastest
MAX_SPLIT_K = 16  # partial sums per tile: beyond it the reduction outweighs the gain
MIN_K_PER_SPLIT = 256  # a program streams at least this many columns (two loop steps)
NUM_STAGES = 3  # loop steps in flight per program (software pipelining of the weight loads)
PROGRAMS_PER_SM = 2  # programs in flight per SM that saturate its share of the bandwidth
WORKSPACE_FLOATS = 1 << 20  # float32 partials shared by all calls (4 MiB); larger calls don't split
MAX_TILES = 1 << 14  # arrival counters, one a tile: far more tiles than SKINNY_MAX_N gives
ENV = "BROWNOUT_SKINNY_GEMM"


ENABLED = os.environ.get(ENV, "1") != "0"  # read once: DecodeLinear asks on every call


def _kernels_interpreted() -> bool:
    return triton is not None and not isinstance(_skinny_kernel, triton.runtime.JITFunction)


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

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
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        # the first lines of this program's weight rows, asked of L2 before the wait
        pf_k = tl.minimum(k_lo + tl.arange(0, PF_LINES) * PF_STEP, k_hi - 1)
        prefetch_l2(w_ptr + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn + pf_k[None, :],
                    USE_PDL)
        pdl_wait(USE_PDL)
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
        pdl_launch(USE_PDL)
        if SPLIT_K > 1:
            # partials [SPLIT_K, tiles, BLOCK_N, BLOCK_M]; the last program to arrive sums them
            cell = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + rm[None, :]
            n_tiles = tl.num_programs(0)
            tl.store(ws_ptr + (split * n_tiles + tile).to(tl.int64) * (BLOCK_N * BLOCK_M) + cell, acc)
            tl.debug_barrier()  # every thread's partial is written before the arrival
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    acc += tl.load(ws_ptr + (s * n_tiles + tile).to(tl.int64) * (BLOCK_N * BLOCK_M) + cell,
                                   cache_modifier=".cg")
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
