"""Timing helper shared by the GPU benchmark scripts: median of CUDA-event timings."""

from __future__ import annotations

import statistics

import torch


def cuda_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` between CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_call_us(fn, calls: int, iters: int = 30, warmup: int = 5) -> float:
    """Microseconds per call of fn(i) for i = 0..calls-1, captured in one CUDA graph and
    replayed (median of CUDA-event timings): launch overhead spread over the calls, as in a
    model's graph. fn runs once before the capture (compilation, allocator warm-up)."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return cuda_time_ms(graph.replay, iters=iters, warmup=warmup) * 1e3 / calls
