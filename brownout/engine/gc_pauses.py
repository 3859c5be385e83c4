"""Garbage-collector pauses of the engine process: fewer of them, and each one measured.

A full (generation 2) collection walks every tracked object. In the engine process that is
the model's Python objects, torch's and transformers' modules and every live request, so it
can take a hundred milliseconds on a small CPU (`benchmarks/host_overhead.py --no-gc-freeze`
measures it); it stops the step loop, so the GPU idles for as long and every running
request's next token is late. Two measures, both in the engine process:
  * `freeze_startup_heap()` after the engine is built: collect once, then move everything
    alive into the permanent generation (`gc.freeze`), so later collections walk only what
    serving allocates (requests, outputs);
  * `GCPauses` times every collection through `gc.callbacks` (count, seconds, the longest,
    by generation) for the engine's snapshot and so /metrics.
"""

from __future__ import annotations

import gc
import time


def freeze_startup_heap() -> int:
    """Collect, then freeze what is left; returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GCPauses:
    """Duration of every garbage collection of this process, by generation."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = 0.0
        self._start = None

    def install(self) -> "GCPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        if self._start is None:
            return
        dt = time.perf_counter() - self._start
        self._start = None
        gen = min(int(info.get("generation", 0)), 2)
        self.count[gen] += 1
        self.seconds[gen] += dt
        self.longest_s = max(self.longest_s, dt)

    def snapshot(self) -> dict:
        return {"gc_collections": {str(g): self.count[g] for g in range(3)},
                "gc_seconds": {str(g): self.seconds[g] for g in range(3)},
                "gc_longest_s": self.longest_s}
