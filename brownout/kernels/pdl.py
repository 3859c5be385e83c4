"""Programmatic dependent launch (PDL) for the step's Triton kernels on Hopper and later GPUs.

A decode step is a chain of a few hundred short kernels, each of which streams a little
memory. Launched the ordinary way, kernel N+1's programs start only after kernel N's last
program exits, then wait a DRAM round trip for their first bytes: every kernel pays the
launch and the ramp of the memory pipe while the GPU's bandwidth sits idle. With PDL (sm_90+)
kernel N+1 is launched while N still runs, and its programs block at `griddepcontrol.wait`
until N has finished and its writes are visible.

The rules every kernel here follows when launched with `USE_PDL`:
  1. `pdl_wait` comes first, before the kernel reads anything an earlier kernel writes and
     before it writes anything, on every path, early returns included; `pdl_launch` (the
     signal that lets the next kernel launch) comes after it. So a kernel only starts once
     the kernel two launches back has finished and its writes are visible (except after an
     align that signals early, rule 4).
  2. Before the wait a kernel only reads what no kernel of the step writes (the weights,
     prefetched into L2) or what the kernel two launches back or earlier wrote (rule 1);
     the gate/up GEMM, which rule 4 can start earlier, only the weights and its input (so
     in `fused_moe`'s direct mode, where no align precedes it, only under `x_settled`).
  3. Short kernels signal right after the wait. Kernels that stream weights signal after
     their main loop: the next kernel's prefetch then lands in L2 just before it is read,
     not while this kernel still streams tens of MB through the cache.
  4. One exception to rule 1's order: the fused MoE's align signals before its wait when
     its caller vouches that an earlier kernel than the one that wrote the expert ids wrote
     the MoE input, and that this kernel signals only after its own wait (`fused_moe`'s
     `x_settled`; a torch kernel, which never signals, serves too): the align then starts
     only once that earlier kernel has finished. The gate/up GEMM after
     the align then starts with it, and its programs for the folded shared expert's fixed
     row blocks read only that input and the weights before their wait: they stream while
     the kernel before the align (the top-k, or brownout's last routing kernel) and the align
     run. Every program of the gate/up GEMM signals only after its wait, so the down GEMM
     after it still starts once the align has finished.
Kernels launched without PDL (cuBLAS, torch, NCCL) keep the ordinary stream order: a kernel
after a PDL kernel waits for it, and a PDL kernel after one of them starts when it exits (or
signals, as some library kernels do), then waits at its own `pdl_wait` all the same.
CUDA graphs capture the relaxed edges, so the replayed step keeps them.

On by default where the GPU supports it; `BROWNOUT_PDL=0` turns it off. Under the CPU
interpreter and on older GPUs the kernels compile without the PDL instructions.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton never launch these kernels
    triton = None

ENV = "BROWNOUT_PDL"
ENABLED = os.environ.get(ENV, "1") != "0"  # read once: every launch asks
MIN_CAPABILITY = (9, 0)  # griddepcontrol and the launch attribute need Hopper (sm_90)
L2_LINE_BYTES = 128  # one prefetch instruction per L2 line (the sector group DRAM fills)
PREFETCH_LINES = 4  # lines of each weight row a program asks for before its wait: its first
#                     two loop steps (128 bf16 columns each), the bytes the ramp would wait for


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _device_supports(index: int) -> bool:
    gdc = getattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait", None)
    return gdc is not None and torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def active(t: torch.Tensor) -> bool:
    """Whether launches on `t`'s device use PDL: on, a CUDA tensor, compiled kernels (not the
    interpreter) and an sm_90+ GPU."""
    if not ENABLED or triton is None or not t.is_cuda or _interpreting():
        return False
    return _device_supports(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_opts(t: torch.Tensor) -> dict:
    """Keyword arguments for a launch of a kernel taking `USE_PDL` on `t`'s device."""
    if active(t):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


if triton is not None:

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_launch(USE_PDL: tl.constexpr):
        """Let the next kernel launch once every program of this one has called this (or
        exited). Always after `pdl_wait` (rule 1)."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs, USE_PDL: tl.constexpr):
        """Ask L2 for the lines at `ptrs` (any shape; one address per 128-byte line is enough)
        without waiting for them: the kernel's weights arrive while the previous kernel ends."""
        if USE_PDL:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)
