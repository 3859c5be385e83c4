"""A chain of dependent decode-size GEMVs: one launch a link (the skinny GEMM under PDL) against
one persistent launch that hands each link's output to the next through counters in memory.

The question it answers: what a kernel boundary costs a batch-1 decode step. A batch-1
layer is a chain of small kernels whose time past their bytes is the hand-offs between
them: each waits for the previous kernel to finish and then for its first bytes. A
persistent kernel would keep every SM's programs resident and start each link's weight
stream before the previous link is done, waiting only where it reads that link's output.
This is that design at its simplest, over P links y_p = W_p x_{p-1} (W_p [D, D] bf16, x_0
given):

- tasks (link, 32-row tile, K split) are numbered link by link; program g of G takes
  tasks g, g + G, ... (all G programs are resident, so every task a program waits on was
  taken by a program that runs: no deadlock; under the CPU interpreter G = 1, in order);
- a task loads its weight tile first (it depends on nothing; with AHEAD the program loads
  its next task's tile before it waits on this one, two tiles in its registers), then
  spins until the previous link's counter of its K slice is full (the tasks that wrote
  those rows, every split; one counter a slice, so the counts spread over SPLITS addresses
  and a slice is read as soon as it is complete), reads that link's float32 partials of
  its K slice (summed in split order, rounded to bf16 as a GEMM's output is), stores its
  partial and counts itself in (release, after a block barrier);
- the last link's partials, summed, are the chain's output;
- with as many programs as a link has tasks, each program takes one task a link, and AHEAD
  streams its next link's tile while it waits on this link: the whole next link's weights are
  in flight during each hand-off (TASK_A_LINK's layouts).

Timings inside CUDA graphs, replays between CUDA events, median of REPEATS: the chain as P
launches of `skinny_linear` (PDL on), as P `F.linear` calls (cuBLAS), and as the persistent
launch at several programs per SM (its graph also zeroes the counters and sums the last
link's partials: three short kernels the others do not run). The weight bytes over the
copy bandwidth (`bench_engine.copy_bandwidth`) is the floor; (time - floor) / P is what
each link costs past its bytes.
Writes chain.json and chain.md under --out.
Usage: python benchmarks/bench_persistent_chain.py --out DIR   (CUDA GPU with triton required)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU test skips without triton
    triton = None

D = 2048  # the model's hidden size: a Qwen1.5-MoE output projection per link (8 MB of bf16)
LINKS = 24  # one link a layer of the model
BLOCK_N = 32  # weight rows per task, as the skinny GEMM's tiles
SPLITS = 8  # K splits per tile: 512 tasks a link, about four per SM, as the skinny GEMM spreads one
PROGRAMS_PER_SM = (1, 2, 4)  # persistent programs an SM: more tiles in flight per link
# (rows a tile, warps) of the layouts with one task a program a link: 16, 32 and 64 KB tiles, so
# that with AHEAD each program streams the next link's tile while it waits on this one
TASK_A_LINK = ((32, 4), (64, 8), (128, 8))
REPEATS = 5  # timing repeats per variant: the spread between them shows the noise
REPLAYS = 50  # graph replays a repeat, whose median drops the odd slow replay
MATCH_TOL = 0.05  # a variant's largest error over the output's scale: bf16 rounding over 24 links stays far under it
NUM_WARPS = 4  # a task's [32, 256] tile over 128 threads: 64 weights a thread, no spills
SMEM_PER_SM = 228 * 1024  # a Hopper SM's shared memory, where the device does not report it
SMEM_RESERVED = 1024  # shared memory the system keeps for each resident block
REG_GRANULE = 8  # registers a thread are allocated in units of 256 a warp


if triton is not None:

    @triton.jit
    def _slice_written(r, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The K slice of the next link that task r's rows fall in: the counter it counts into."""
        return (r // SPLITS) * BLOCK_N // BLOCK_K

    @triton.jit
    def _slice_read(r, SPLITS: tl.constexpr):
        """The K slice of the previous link's rows that task r reads: the counter it waits on."""
        return r % SPLITS

    @triton.jit
    def _task_tile(w_ptr, t, D, TASKS_PER_LINK, TOTAL, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLITS: tl.constexpr):
        """Task t's weight tile [BLOCK_N, BLOCK_K] (zeros past the last task)."""
        link = t // TASKS_PER_LINK
        r = t % TASKS_PER_LINK
        rn = (r // SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = (r % SPLITS) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (tl.arange(0, BLOCK_N) * 0 + t) < TOTAL
        return tl.load(w_ptr + link.to(tl.int64) * D * D + rn[:, None] * D + rk[None, :], mask=ok[:, None],
                       other=0.0)

    @triton.jit
    def _chain_kernel(w_ptr, x0_ptr, part_ptr, done_ptr, P, D, TASKS_PER_LINK, SLICE_TASKS, G,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
                      ITERS: tl.constexpr, AHEAD: tl.constexpr):
        g = tl.program_id(0)
        total = P * TASKS_PER_LINK
        rn0 = tl.arange(0, BLOCK_N)
        rk0 = tl.arange(0, BLOCK_K)
        sp = tl.arange(0, SPLITS)
        if AHEAD:
            w_next = _task_tile(w_ptr, g, D, TASKS_PER_LINK, total, BLOCK_N, BLOCK_K, SPLITS)
        for i in range(0, ITERS):
            t = i * G + g
            if AHEAD:  # the next task's tile is loaded while this one waits and computes
                w = w_next
                w_next = _task_tile(w_ptr, t + G, D, TASKS_PER_LINK, total, BLOCK_N, BLOCK_K, SPLITS)
            else:
                w = _task_tile(w_ptr, t, D, TASKS_PER_LINK, total, BLOCK_N, BLOCK_K, SPLITS)
            if t < total:
                link = t // TASKS_PER_LINK
                r = t % TASKS_PER_LINK
                rn = (r // SPLITS) * BLOCK_N + rn0
                rk = (r % SPLITS) * BLOCK_K + rk0
                if link == 0:
                    x = tl.load(x0_ptr + rk).to(tl.float32)
                else:
                    # the previous link's rows this task reads are its K slice: the tiles of one
                    # counter (SLICE_TASKS of them). Spin on plain reads of that counter (no
                    # atomics competing with the producers' counts), then one acquire so the
                    # partials are read after it
                    cnt = done_ptr + (link - 1) * SPLITS + _slice_read(r, SPLITS)
                    while tl.load(cnt, volatile=True) < SLICE_TASKS:
                        pass
                    tl.atomic_add(cnt, 0, sem="acquire")
                    prev = part_ptr + (link - 1).to(tl.int64) * SPLITS * D
                    x = tl.sum(tl.load(prev + sp[:, None] * D + rk[None, :], cache_modifier=".cg"), axis=0)
                    x = x.to(tl.bfloat16).to(tl.float32)  # the link's output, rounded as a GEMM stores it
                y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)  # [BLOCK_N]
                tl.store(part_ptr + link.to(tl.int64) * SPLITS * D + (r % SPLITS) * D + rn, y)
                tl.debug_barrier()  # every thread's partial is written before the count
                tl.atomic_add(done_ptr + link * SPLITS + _slice_written(r, SPLITS, BLOCK_N, BLOCK_K), 1, sem="release")


def slice_tasks(d: int, block_n: int = BLOCK_N, splits: int = SPLITS) -> int:
    """Tasks that write one K slice of a link's output: its rows' tiles, every split."""
    return (d // splits) // block_n * splits


def tasks_per_link(d: int, block_n: int = BLOCK_N, splits: int = SPLITS) -> int:
    """A link's tasks: its row tiles times its K splits."""
    return (d // block_n) * splits


def chain_persistent(w: torch.Tensor, x0: torch.Tensor, programs: int, ahead: bool = False,
                     block_n: int = BLOCK_N, splits: int = SPLITS, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """w [P, D, D] bf16, x0 [D] bf16 -> the last link's output [D] (bf16) by the persistent
    launch over `programs` programs (1 under the CPU interpreter); `ahead`: each program
    loads its next task's tile before it waits on the current one. With `programs` equal to
    a link's tasks, each program takes one task a link, and its next task is the next link's."""
    P, n, k = w.shape
    if n != k or k % splits or (k // splits) % block_n:
        raise ValueError(f"links [{P}, {n}, {k}]: square, a K slice (columns / {splits}) a multiple of {block_n} rows")
    tasks = tasks_per_link(n, block_n, splits)
    part = torch.empty(P, splits, n, dtype=torch.float32, device=w.device)
    # a counter a (link, K slice of the next link): the tiles of that slice's rows, every split
    done = torch.zeros(P * splits, dtype=torch.int32, device=w.device)
    args = (w, x0, part, done, P, n, tasks, slice_tasks(k, block_n, splits), programs)
    consts = dict(BLOCK_N=block_n, BLOCK_K=k // splits, SPLITS=splits, ITERS=triton.cdiv(P * tasks, programs),
                  AHEAD=ahead, num_warps=num_warps)
    if w.is_cuda:  # every program must be resident, or a spinning one can wait on one never started
        compiled = _chain_kernel.warmup(*args, grid=(1,), **consts)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(w.device)
        regs = -(-compiled.n_regs // REG_GRANULE) * REG_GRANULE * 32 * num_warps
        smem = getattr(props, "shared_memory_per_multiprocessor", SMEM_PER_SM)
        per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // max(1, regs),
                     props.max_threads_per_multi_processor // (32 * num_warps),
                     smem // (compiled.metadata.shared + SMEM_RESERVED))
        if programs > per_sm * props.multi_processor_count:
            raise ValueError(f"{programs} programs, but only {per_sm} an SM fit ({compiled.n_regs} registers a "
                             f"thread, {compiled.metadata.shared} bytes of shared memory)")
    _chain_kernel[(programs,)](*args, **consts)
    return part[-1].sum(0).to(w.dtype)


def chain_reference(w: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Each link's output rounded to bf16 from a float32 product, as the kernels round it."""
    x = x0
    for wp in w:
        x = (wp.float() @ x.float()).to(w.dtype)
    return x


def _time_graph(fn, repeats: int = REPEATS, replays: int = REPLAYS) -> list[float]:
    """us per call of fn, captured in a CUDA graph, median of `replays` per repeat."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    out = []
    for _ in range(repeats):
        times = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        times.sort()
        out.append(times[len(times) // 2])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engine import copy_bandwidth  # the engine runs' roofline rate, measured the same way

    from brownout.kernels import skinny_gemm as sk

    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = (0.02 * torch.randn(LINKS, D, D, device=dev)).to(torch.bfloat16)
    x0 = torch.randn(D, device=dev).to(torch.bfloat16)
    want = chain_reference(w, x0)
    bw = copy_bandwidth()
    floor_us = w.numel() * w.element_size() / bw * 1e6
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []

    def links_skinny():
        x = x0.view(1, D)
        for wp in w:
            x = sk.skinny_linear(x, wp)
        return x

    def links_cublas():
        x = x0.view(1, D)
        for wp in w:
            x = torch.nn.functional.linear(x, wp)
        return x

    variants = [("skinny GEMM a link (PDL)", links_skinny), ("cuBLAS a link", links_cublas)]
    for pps in PROGRAMS_PER_SM:
        for ahead in (False, True):
            variants.append((f"persistent, {pps} program(s) an SM{', next tile loaded ahead' if ahead else ''}",
                             lambda pps=pps, ahead=ahead: chain_persistent(w, x0, sms * pps, ahead)))
    for block_n, warps in TASK_A_LINK:
        g = tasks_per_link(D, block_n)
        for ahead in (False, True):
            variants.append((f"persistent, one {block_n}-row task a program a link ({g} programs, {warps} warps)"
                             f"{', next link loaded ahead' if ahead else ''}",
                             lambda g=g, ahead=ahead, block_n=block_n, warps=warps:
                             chain_persistent(w, x0, g, ahead, block_n=block_n, num_warps=warps)))
    for name, fn in variants:
        try:
            got = fn().view(-1)
        except Exception as e:  # one variant failing to compile or run leaves the others' rows
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[-300:]}"))
            print(json.dumps(rows[-1]), flush=True)
            continue
        err = (got.float() - want.float()).abs().max().item()
        us = _time_graph(fn)
        med = sorted(us)[len(us) // 2]
        scale = want.float().abs().max().item()
        rows.append(dict(variant=name, us=us, median_us=med, floor_us=floor_us,
                         past_bytes_per_link_us=(med - floor_us) / LINKS, max_abs_err=err,
                         scale=scale, matches=err <= MATCH_TOL * scale))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                links=LINKS, d=D, copy_bandwidth_tb_s=bw / 1e12, repeats=REPEATS, replays=REPLAYS)
    (args.out / "chain.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# A chain of {LINKS} dependent {D} x {D} bf16 GEMVs, {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {meta['copy_bandwidth_tb_s']:.2f} TB/s; "
             f"floor (the weights' bytes at that bandwidth) {floor_us:.1f} us. Median of {REPEATS} repeats "
             f"(each the median of {REPLAYS} graph replays). Made by `python benchmarks/bench_persistent_chain.py`.",
             "", "| variant | us (repeats) | / floor | us a link past its bytes | max abs error (output scale) | matches |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['median_us']:.1f} ({min(r['us']):.1f}-{max(r['us']):.1f}) | "
                     f"{r['median_us'] / floor_us:.2f}x | {r['past_bytes_per_link_us']:.2f} | "
                     f"{r['max_abs_err']:.3g} ({r['scale']:.3g}) | {'yes' if r['matches'] else '**no**'} |")
    (args.out / "chain.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
