"""The kernel benchmark's sweeps run end to end under the interpreter (tiny shapes), and the
tables they write are ones `fused_moe`'s lookups read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


ENV = dict(os.environ, TRITON_INTERPRET="1")


def _sweep(out: Path, tokens: str, mode: str) -> dict:
    """Run the kernel benchmark's sweep (`mode`: --crowded, --folded or both) at smoke shapes."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--smoke", "--out",
                    str(out), "--tokens", tokens, "--skip-attention", *mode.split()],
                   check=True, env=ENV, cwd=ROOT, timeout=600, capture_output=True)
    return json.loads((out / "kernels_raw.json").read_text())


def _lookup(table_file: Path, call: str):
    """`call` on the fused MoE module (`t`: the table) in a process of its own: importing the
    kernels here would fix triton's mode for the rest of the session (see triton_interpret.py)."""
    probe = ("import json, sys, torch; from brownout.kernels import fused_moe as fm; "
             f"t = json.load(open(sys.argv[1])); print(json.dumps({call}))")
    out = subprocess.run([sys.executable, "-c", probe, str(table_file)], check=True, env=ENV, cwd=ROOT,
                         timeout=300, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_crowded_sweep_smoke_writes_a_readable_table(tmp_path):
    rows = _sweep(tmp_path, "8,32", "--crowded")["moe_crowded"]["rows"]
    assert [r["tokens"] for r in rows] == [32]  # 8 tokens: 8 rows per united slot, plain table
    assert rows[0]["rel_err_vs_fp64"] < 1e-4 and rows[0]["tuned_us"] > 0
    table_file = tmp_path / "cpu-interpreter.json"
    table = json.loads(table_file.read_text())
    got = _lookup(table_file, "fm.lookup_crowded_config(t, 30.0, 10, 32, 64, torch.float32)")
    assert got == table["S=10,N=32,K=64,dtype=float32,crowded"]["32"]


def test_folded_sweep_smoke_adds_a_width_keyed_table(tmp_path):
    rows = _sweep(tmp_path, "1,8", "--folded")["moe_folded"]["rows"]
    assert sorted(r["tokens"] for r in rows) == [1, 8]
    for r in rows:
        assert r["rel_err_vs_fp64"] < 1e-4 and r["tuned_us"] > 0 and r["before_us"] > 0
        # every token reads the shared expert's 2 slots beside its routed ones
        assert r["slots_touched"] >= 2 + 1
    table_file = tmp_path / "cpu-interpreter.json"
    table = json.loads(table_file.read_text())
    # smoke layout: 8 experts, room for 4 way-2 united slots, 2 shared slots; 2 + 2 per token
    folded = table["S=14,N=32,K=64,dtype=float32,k=4"]
    assert set(folded) == {"1", "8"}
    got = _lookup(table_file, "fm.lookup_config(t, 8, 14, 32, 64, torch.float32, top_k=4)")
    assert got == folded["8"]


def test_crowded_folded_sweep_smoke_keys_the_engine_layout(tmp_path):
    """Tau = 0 in the engine's layout: the united slots beside the folded shared expert's
    fixed blocks, keyed by the rows per busy slot the MoE layer asks with (T x (k + shared) /
    (united + shared)), under the engine's slot count."""
    rows = _sweep(tmp_path, "8,32", "--crowded --folded")["moe_crowded"]["rows"]
    # smoke layout: 8 experts in 2 way-4 groups, 2 shared slots; 8 tokens: 8 rows a busy slot
    assert [r["tokens"] for r in rows] == [32] and rows[0]["scenario"] == "folded_united"
    assert rows[0]["rel_err_vs_fp64"] < 1e-4 and rows[0]["tuned_us"] > 0
    assert rows[0]["slots_touched"] == 4  # both united slots and both shared ones
    table_file = tmp_path / "cpu-interpreter.json"
    table = json.loads(table_file.read_text())
    got = _lookup(table_file, "fm.lookup_crowded_config(t, 30.0, 14, 32, 64, torch.float32)")
    assert got == table["S=14,N=32,K=64,dtype=float32,crowded"]["32"]



def test_attention_sweep_smoke_writes_the_table_decode_tiles_reads(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--smoke", "--out",
                    str(tmp_path), "--batches", "1,2"],
                   check=True, env=ENV, cwd=ROOT, timeout=600, capture_output=True)
    raw = json.loads((tmp_path / "attention_raw.json").read_text())
    assert [b["batch"] for b in raw["batches"]] == [1, 2]
    for b in raw["batches"]:
        timed = [r for r in b["tried"] if "us" in r]
        assert timed and all(r["rel_err"] <= 2e-2 for r in timed)
        assert any(r["tiles"].get("vec") for r in timed)  # the one-row path ran and matched
    table = json.loads((tmp_path / "attention_smoke.json").read_text())
    entries = table["G=1,D=32,block=16,dtype=bfloat16"]
    winners = {b["batch"]: b["best"] for b in raw["batches"]}
    # one entry a swept batch: its winner's tiles and the batch as its bound
    assert sorted((e["max_batch"], json.dumps({k: v for k, v in e.items() if k != "max_batch"},
                                              sort_keys=True)) for e in entries) == \
        [(b, json.dumps(winners[b], sort_keys=True)) for b in (1, 2)]
    probe = ("import json, sys; from brownout.kernels.paged_attention import pick_tiles; "
             "t = json.loads(sys.argv[1]); print(json.dumps([pick_tiles(t, b) for b in (1, 2, 9)]))")
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(entries)], check=True, env=ENV,
                         cwd=ROOT, timeout=300, capture_output=True, text=True).stdout
    picked = json.loads(out.strip().splitlines()[-1])
    assert picked[:2] == [winners[1], winners[2]]
    assert picked[2] == winners[2]  # past the sweep: the largest batch's tiles
