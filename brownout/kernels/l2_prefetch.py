"""The folded shared expert's weights pulled into L2 on a side stream during a decode step's
latency-bound stretch.

Between a layer's attention and its expert GEMMs a small decode step runs a chain of short
kernels (the attention merge, the output projection, a norm, the router, top-k or the
brownout plan, the align) that read a few MB: the HBM sits mostly idle for tens of
microseconds, then the expert GEMMs stream their weights. The shared expert's slots are
read by every step whatever the routing says, so their first bytes can be fetched during
that stretch: a kernel on a side stream asks L2 for them (`prefetch.global.L2`, no
registers, nothing waits for it), and the gate/up GEMM, which then takes the shared slots'
blocks first, finds them in the cache. The side stream forks after the attention kernel
(whose KV reads would evict the lines) and joins after the MoE layer, so CUDA graphs
capture it as a branch of the step.

Off by default; `BROWNOUT_L2_PREFETCH=1` turns it on (the benchmark times both).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton never prefetch
    triton = None

ENV = "BROWNOUT_L2_PREFETCH"
ENABLED = os.environ.get(ENV, "0") == "1"  # read once: every decode layer asks
PREFETCH_BYTES = 24 << 20  # half of the H200's 50 MB L2: room left for the stretch's own reads
MAX_TOKENS = 64  # decode steps up to this size have the idle stretch; larger steps fill the HBM
PROGRAMS = 32  # side-stream programs: enough to issue the lines quickly, few SMs taken
LINES_PER_STEP = 1024  # lines each program asks for per loop step (8 per thread)
LINE_BYTES = 128  # one request per L2 line


def wanted(x: torch.Tensor) -> bool:
    """Whether a layer prefetches for a step of x's rows: on, CUDA, a small step, compiled
    kernels with the prefetch instruction (sm_80+: Ampere's `prefetch.global.L2`)."""
    return (ENABLED and triton is not None and x.is_cuda and 0 < x.shape[0] <= MAX_TOKENS
            and os.environ.get("TRITON_INTERPRET", "0") != "1")


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


if triton is not None:

    @triton.jit
    def _prefetch_kernel(ptr, n_lines, LINE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
        step = tl.num_programs(0) * BLOCK
        for start in range(tl.program_id(0) * BLOCK, n_lines, step):
            idx = tl.minimum(start + tl.arange(0, BLOCK), n_lines - 1).to(tl.int64)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                      [ptr + idx * LINE_ELEMS], dtype=tl.int32, is_pure=False, pack=1)


def fork(weights: torch.Tensor, nbytes: int = PREFETCH_BYTES) -> None:
    """Ask L2 for the first `nbytes` of `weights` (contiguous) on the device's side stream,
    after the work queued so far on the current stream. `join` must follow in the same step."""
    if not weights.is_contiguous():
        raise ValueError("l2_prefetch.fork needs contiguous weights")
    index = weights.device.index if weights.device.index is not None else torch.cuda.current_device()
    side, cur = _side_stream(index), torch.cuda.current_stream(weights.device)
    n_lines = min(nbytes, weights.numel() * weights.element_size()) // LINE_BYTES
    if n_lines == 0:
        return
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        _prefetch_kernel[(PROGRAMS,)](weights, n_lines, LINE_ELEMS=LINE_BYTES // weights.element_size(),
                                      BLOCK=LINES_PER_STEP, num_warps=4)


def join(device: torch.device) -> None:
    """The current stream waits for the side stream (the graph's branch rejoins the step)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.current_stream(device).wait_stream(_side_stream(index))
