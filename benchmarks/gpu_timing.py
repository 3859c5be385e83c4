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
