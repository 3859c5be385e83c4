"""The persistent chain of GEMVs (`benchmarks/bench_persistent_chain.py`): under triton's CPU
interpreter, in one program (tasks in order), the chain's output against each link computed
by torch with the same roundings; and its counters' protocol, which one program in order
cannot test: each task counts into the counter of the rows it writes, each task waits on
the counter of the rows it reads, and each counter expects exactly the tasks counting into
it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("chain", sys.argv[1])
chain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chain)
assert chain.triton is not None
g = torch.Generator().manual_seed(0)
P, D = 3, 256
w = (0.05 * torch.randn(P, D, D, generator=g)).to(torch.bfloat16)  # gain ~0.8 a link
x0 = torch.randn(D, generator=g).to(torch.bfloat16)
want = chain.chain_reference(w, x0)
for ahead, block_n, splits in ((False, 32, 8), (True, 32, 8), (True, 64, 4)):
    got = chain.chain_persistent(w, x0, programs=1, ahead=ahead, block_n=block_n, splits=splits)
    assert got.shape == (D,) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(got, torch.zeros_like(got))
print("ok")
"""


def test_chain_matches_the_links_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks" / "bench_persistent_chain.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def _chain_module():
    import importlib.util

    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("chain", ROOT / "benchmarks" / "bench_persistent_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("d,n,splits", [(256, 32, 8), (256, 64, 4), (2048, 32, 8), (2048, 64, 8), (2048, 128, 8)])
def test_each_counter_counts_the_tasks_that_write_the_rows_its_readers_read(d, n, splits):
    """At the interpreter test's sizes and at each layout the benchmark times."""
    chain = _chain_module()
    bk = d // splits
    written = chain._slice_written.fn
    read = chain._slice_read.fn
    counts = [0] * splits
    for r in range(chain.tasks_per_link(d, n, splits)):
        rows = range((r // splits) * n, (r // splits + 1) * n)  # the rows task r writes
        assert {row // bk for row in rows} == {written(r, splits, n, bk)}
        counts[written(r, splits, n, bk)] += 1
        cols = range((r % splits) * bk, (r % splits + 1) * bk)  # the previous link's rows it reads
        assert {c // bk for c in cols} == {read(r, splits)}
    assert counts == [chain.slice_tasks(d, n, splits)] * splits
