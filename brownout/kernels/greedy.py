"""Greedy tokens from a decode step's logits in one launch, in the logits' own dtype.

A greedy row's token is the index of its largest logit, the first one on ties (torch's
`argmax`). On the raw bf16 output of lm_head that needs no float32 copy: widening a bf16 value
is exact, so the maximum and its first index are those of the widened logits. Torch's path
(`logits.float().argmax(1)`) reads the logits twice, writes a float32 copy twice their size, and
its reduction runs one block a row, where one read of the bf16 logits over many programs is
what the answer needs.

Here the vocabulary is cut into CHUNK-wide pieces, one program each per row: a program finds
its piece's maximum and the first index holding it, stores them as its row's partial, and the
last program of the row to arrive (an arrival counter a row, reset by that program, as in
`skinny_gemm`) picks the first piece holding the row's maximum. So ties resolve to the first
index, as torch's do; a NaN ranks above every number, as in torch, so a row holding one takes
its first NaN. The counters are the device's, so launches on one device run one after another
(the engine samples on one stream). `BROWNOUT_GREEDY_KERNEL=0` turns the kernel off.
"""

from __future__ import annotations

import functools
import os

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use torch's argmax
    triton = None

CHUNK = 4096  # logits per program: 8 KB of bf16, 32 a thread at 4 warps; 38 programs a row at 152k
NUM_WARPS = 4  # enough loads in flight for an 8 KB piece
MAX_ROWS = 4096  # arrival counters, one a row: beyond any decode batch the engine graphs
ENV = "BROWNOUT_GREEDY_KERNEL"
ENABLED = os.environ.get(ENV, "1") != "0"  # read once: the runner asks on every greedy step


def _kernels_interpreted() -> bool:
    return triton is not None and not isinstance(_argmax_kernel, triton.runtime.JITFunction)


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait  # noqa: F401

    @triton.jit
    def _argmax_kernel(x_ptr, part_val_ptr, part_idx_ptr, count_ptr, out_ptr, V, stride_x,
                       CHUNK: tl.constexpr, PIECES: tl.constexpr, PIECES_PAD: tl.constexpr,
                       USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)  # a short kernel: the next one may launch at once
        row = tl.program_id(0)
        piece = tl.program_id(1)
        offs = piece * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V,
                    other=float("-inf")).to(tl.float32)
        nan = x != x  # NaN ranks above every number, as torch ranks it: the first one wins
        first_nan = tl.min(tl.where(nan, offs, V), 0)
        best = tl.max(tl.where(nan, float("-inf"), x), 0)
        first = tl.min(tl.where(x == best, offs, V), 0)  # the piece's first index holding it
        best = tl.where(first_nan < V, float("nan"), best)  # a piece with a NaN reports it
        first = tl.where(first_nan < V, first_nan, first)
        cell = row * PIECES + piece
        tl.store(part_val_ptr + cell, best)
        tl.store(part_idx_ptr + cell, first)
        tl.debug_barrier()  # every thread's store lands before the arrival
        arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        if arrived == PIECES - 1:  # the row's last program: every partial is visible
            p = tl.arange(0, PIECES_PAD)
            ok = p < PIECES
            vals = tl.load(part_val_ptr + row * PIECES + p, mask=ok, other=float("-inf"),
                           cache_modifier=".cg")
            idx = tl.load(part_idx_ptr + row * PIECES + p, mask=ok, other=V, cache_modifier=".cg")
            # names of their own: the compiler types a name the branch rebinds by its value
            # before the branch, where the piece's NaN mask is CHUNK wide and this one PIECES_PAD
            row_nan = vals != vals
            row_first_nan = tl.min(tl.where(row_nan, idx, V), 0)
            top = tl.max(tl.where(row_nan, float("-inf"), vals), 0)
            pick = tl.min(tl.where(vals == top, idx, V), 0)
            tl.store(out_ptr + row, tl.where(row_first_nan < V, row_first_nan, pick).to(tl.int64))
            tl.store(count_ptr + row, 0)  # ready for the next launch


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """The arrival counters of `device`: zero before and after every launch."""
    return torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)


def usable(logits: torch.Tensor) -> bool:
    """Whether `greedy_tokens` takes these logits through its kernel: triton, a CUDA (or
    interpreted) [B, V] tensor of at most MAX_ROWS rows with a unit last stride."""
    return (triton is not None and logits.dim() == 2 and 0 < logits.shape[0] <= MAX_ROWS
            and logits.shape[1] > 0 and logits.stride(-1) == 1
            and (logits.is_cuda or _kernels_interpreted()))


def greedy_tokens(logits: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """logits [B, V] (bf16, fp16 or float32) -> int64 [B]: each row's first index of its
    maximum, `logits.float().argmax(1)`'s tokens. `chunk` (a power of two): logits a program
    reads, smaller in tests so that small vocabularies span several pieces."""
    if not usable(logits):
        return logits.float().argmax(dim=1)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two of at least 16, got {chunk}")
    B, V = logits.shape
    pieces = triton.cdiv(V, chunk)
    part_val = torch.empty(B * pieces, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(B * pieces, dtype=torch.int32, device=logits.device)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    _argmax_kernel[(B, pieces)](logits, part_val, part_idx, _counters(logits.device), out, V,
                                logits.stride(0), CHUNK=chunk, PIECES=pieces,
                                PIECES_PAD=max(2, triton.next_power_of_2(pieces)),
                                num_warps=NUM_WARPS, **pdl.launch_opts(logits))
    return out
