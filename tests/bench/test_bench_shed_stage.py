"""The engine benchmark's `shed` stage, its CPU-safe parts: the k' levels, the flops at k',
and the whole stage on a tiny model with an eager runner and a stand-in timer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_engine  # noqa: E402

from brownout.config import CacheConfig, ModelLoadConfig  # noqa: E402
from brownout.runner.loader import load_model  # noqa: E402
from brownout.runner.model_runner import ModelRunner  # noqa: E402


def test_shed_levels():
    assert bench_engine.shed_levels(4) == [4, 3, 2, 1]
    assert bench_engine.shed_levels(8) == [8, 7, 4, 1]
    assert bench_engine.shed_levels(2) == [2, 1] and bench_engine.shed_levels(1) == [1]


@pytest.fixture(scope="module")
def runner(tiny_models):
    loaded = load_model(ModelLoadConfig(model=str(tiny_models["mixtral"]), device="cpu", dtype="float32"))
    return ModelRunner(loaded, CacheConfig(num_blocks=64, block_size=16), max_batch=8,
                       max_model_len=256, enforce_eager=True)


def test_flops_scale_with_k_prime(runner):
    sched = bench_engine.prefill_sched(64, runner.block_size, runner.model.spec.vocab_size)
    full = bench_engine.step_flops(runner.model, sched)
    assert bench_engine.step_flops(runner.model, sched, runner.model.spec.top_k) == full
    assert bench_engine.step_flops(runner.model, sched, 1) < full


def test_stage_on_an_eager_runner(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_engine, "SHED_PREFILL_TOKENS", (32, 64))
    monkeypatch.setattr(bench_engine, "SHED_DECODE_BATCH", 4)
    monkeypatch.setattr(bench_engine, "SHED_DECODE_CONTEXT", 16)
    seen = []

    def timer(r, sched, rungs, graphs):  # the GPU timer's contract without CUDA events
        out = r.execute(sched, rungs)
        seen.append((rungs, out.top_k))
        return 1.0 + 0.5 * (rungs.top_k or 0), out.experts_touched

    wb = bench_engine.weight_bytes(runner.model)
    rows = bench_engine.stage_shed(runner, wb, 1e12, 1e14, tmp_path, timer=timer)
    k = runner.model.spec.top_k
    assert len(rows) == 3 * len(bench_engine.shed_levels(k)) * 2
    assert rows == json.loads((tmp_path / "shed.json").read_text())
    assert rows[0]["top_k"] == k and rows[0]["tau"] == 1.0 and rows[0]["vs_full"] == 1.0
    assert all(r["graph"] is None for r in rows)  # eager runner: no graphs
    assert {(r.top_k, t) for r, t in seen} == {(k, None), (1, 1)}  # k' = k sheds nothing
    prefill = [r for r in rows if r["kind"] == "prefill" and r["tokens"] == 64 and r["tau"] == 1.0]
    assert prefill[-1]["flops_ms"] < prefill[0]["flops_ms"]
    assert all(r["experts_touched_mean"] > 0 for r in rows)
