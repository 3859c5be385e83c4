"""Decode attention tiles on the GPU: a sweep per batch size, written as the device's table.

For each batch size the engine graphs, one query token a sequence over a paged cache
(Hq = Hkv = 16, Dh 128, block 16, bf16: Qwen1.5-MoE-A2.7B's attention) at two contexts, it
times the kernel's tile variants (`paged_attention(tiles=...)`: KV tile, pipeline stages,
warps, the one-row path without tensor cores, context splits) against the default tiles, in
CUDA graphs that walk several layers' caches (HBM reads, not L2), and checks every variant's
output against the default's. The winner per batch size (lowest geometric mean over the
contexts of its time over the default's) goes to `attention_<device>.json`, which
`paged_attention.decode_tiles` reads. Times are in microseconds; the roofline is the KV and
query bytes over the copy bandwidth measured in the same run.

Usage: python benchmarks/bench_attention.py --out DIR [--budget-s S] [--batches 1,8,64]
       [--smoke]   (--smoke: tiny shapes under TRITON_INTERPRET=1 on the CPU, no timing claim)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brownout.kernels import paged_attention as pa  # noqa: E402

log = logging.getLogger("bench_attention")

HEADS, HEAD_DIM, KV_BLOCK = 16, 128, 16  # Qwen1.5-MoE-A2.7B: MHA, 128-wide heads, 16-token blocks
# the decode batch sizes swept, most wanted first (the budget cuts the tail): the single stream
# and the batches the roofline targets name, then the rest; a step between two takes the larger
# one's entry and a step past 128 batch 128's (pick_tiles)
BATCHES = (64, 1, 8, 128, 32, 16, 4, 2)
CONTEXTS = (512, 2048)  # the contexts of the engine's decode stage
LAYER_BYTES_MIN = 256 << 20  # a timed graph walks at least this many cache bytes: 5x the L2
MAX_LAYERS = 48  # and at most this many layers' caches (small batches reach the bytes at 48)
MAX_REL_ERR = 2e-2  # a variant whose output leaves the default's by more is wrong (bf16)
SMALL_PROGRAMS = 2 * 132  # below this many (sequence, head) programs a split may pay: 2 per H200 SM


def variants(batch: int, smoke: bool) -> list[dict]:
    """Tile variants for one batch size (without splits; `split_variants` adds them)."""
    if smoke:
        return [{}, {"block_n": 16, "vec": True}, {"block_n": 32, "num_stages": 2, "heads_first": True}]
    out = []
    for hf, bn, st in itertools.product((True, False), (16, 32, 64, 128), (2, 3, 4)):
        if bn == 16 and batch * HEADS >= SMALL_PROGRAMS:
            continue  # long contexts per program: 16-key tiles only pay where programs are few
        if bn == 128 and st == 4:
            continue  # 4 stages of 128-key K and V tiles overrun the shared memory
        out.append({"block_n": bn, "num_stages": st, "num_warps": 4, "heads_first": hf})
    # the one-row path and 8 warps: one variant each, so that the table can still pick them
    out += [{"block_n": 32, "num_stages": 4, "num_warps": 4, "vec": True, "heads_first": True},
            {"block_n": 64, "num_stages": 3, "num_warps": 8, "heads_first": True}]
    return out


def split_variants(best: dict, batch: int, smoke: bool) -> list[dict]:
    """The best tiles at other context splits, where a batch leaves the GPU short of programs."""
    if smoke:
        return [dict(best, num_splits=2)]
    if batch * HEADS >= SMALL_PROGRAMS:
        return []
    return [dict(best, num_splits=s) for s in (1, 2, 4, 8, 16)]


class Case:
    """One batch size's caches at one context: `layers` copies walked in one timed graph."""

    def __init__(self, batch: int, ctx: int, heads: int, dh: int, device: str, smoke: bool):
        self.batch, self.ctx = batch, ctx
        nb = -(-ctx // KV_BLOCK)
        per_layer = 2 * batch * nb * KV_BLOCK * heads * dh * 2
        self.layers = 1 if smoke else max(1, min(MAX_LAYERS, -(-LAYER_BYTES_MIN // per_layer)))
        torch.manual_seed(batch * 7919 + ctx)
        shape, bf16 = (batch * nb, KV_BLOCK, heads, dh), dict(device=device, dtype=torch.bfloat16)
        self.caches = [(torch.randn(shape, **bf16), torch.randn(shape, **bf16))
                       for _ in range(self.layers)]
        # shuffled blocks, as a cache that has served a while hands them out
        self.tables = torch.randperm(batch * nb, device=device).to(torch.int32).view(batch, nb)
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, heads, dh, **bf16)
        self.out = torch.empty_like(self.q)
        self.scale = dh ** -0.5
        self.bytes = 2 * batch * ctx * heads * dh * 2 + 2 * self.q.numel() * 2

    def call(self, tiles: dict, layer: int = 0) -> torch.Tensor:
        kc, vc = self.caches[layer]
        return pa.paged_attention(self.q, kc, vc, self.tables, self.lens, self.qsl, 1, self.scale,
                                  tiles=tiles, out=self.out)

    def time_us(self, tiles: dict, smoke: bool) -> float:
        if smoke:
            t0 = time.perf_counter()
            self.call(tiles)
            return (time.perf_counter() - t0) * 1e6
        from gpu_timing import graph_call_us
        return graph_call_us(lambda i: self.call(tiles, i), self.layers)


def copy_bandwidth_gbs(device: str, smoke: bool) -> float:
    if smoke:
        return float("nan")
    from gpu_timing import cuda_time_ms
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB, far past the L2
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_time_ms(lambda: dst.copy_(src)) / 1e6


def measure(case: Case, tiles: dict, ref: torch.Tensor, smoke: bool) -> dict:
    """One variant at one case: its time, or why it has none (compile failure, wrong output)."""
    row = {"tiles": tiles}
    try:
        case.out.fill_(float("nan"))  # a variant that writes nothing must not pass on the last one's output
        out = case.call(tiles).float()
        err = float((out - ref).norm() / ref.norm())
        row["rel_err"] = err
        if not math.isfinite(err) or err > MAX_REL_ERR:
            row["error"] = f"output off the default's by {err:.3g}"
            return row
        row["us"] = case.time_us(tiles, smoke)
    except Exception as exc:  # a variant that does not compile (shared memory, registers)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row


def sweep_batch(batch: int, device: str, bw: float, smoke: bool, deadline: float,
                family: str = "all") -> dict:
    """family "all": every variant; "splits": the device table's entry for this batch at 1, 2
    and 4 context splits, whatever the batch size (`split_variants` splits small batches only)."""
    heads, dh = (2, 32) if smoke else (HEADS, HEAD_DIM)
    contexts = (64,) if smoke else CONTEXTS
    cases = [Case(batch, c, heads, dh, device, smoke) for c in contexts]
    refs = [case.call({}).float().clone() for case in cases]
    default = [case.time_us({}, smoke) for case in cases]
    rows: list[dict] = []

    def score(tiles: dict) -> float | None:
        """Geometric mean over the contexts of time / default time; None if any case failed."""
        ratios = []
        for case, ref, d in zip(cases, refs, default):
            r = measure(case, tiles, ref, smoke)
            r.update(context=case.ctx)
            rows.append(r)
            if "us" not in r:
                return None
            ratios.append(r["us"] / d)
        return math.exp(statistics.fmean(math.log(x) for x in ratios))

    best, best_score = {}, 1.0
    if family == "splits":
        table = {} if smoke else pa._device_tiles(torch.cuda.get_device_name())
        held = pa.pick_tiles(table.get(pa.tiles_key(1, dh, KV_BLOCK, torch.bfloat16), []), batch)
        candidates = [dict(held, num_splits=n) for n in (1, 2, 4)]
    else:
        candidates = variants(batch, smoke)
    for tiles in candidates:
        if time.monotonic() > deadline:
            break
        s = score(tiles)
        if s is not None and s < best_score:
            best, best_score = tiles, s
    for tiles in ([] if family != "all" else split_variants(best, batch, smoke)):
        if time.monotonic() > deadline:
            break
        s = score(tiles)
        if s is not None and s < best_score:
            best, best_score = tiles, s
    per_ctx = []
    for case, d in zip(cases, default):
        tuned = next((r["us"] for r in rows if r["tiles"] == best and r["context"] == case.ctx
                      and "us" in r), d)
        roof = case.bytes / bw / 1e3 if math.isfinite(bw) else float("nan")
        per_ctx.append({"context": case.ctx, "layers": case.layers, "kv_bytes": case.bytes,
                        "roofline_us": roof, "default_us": d, "tuned_us": tuned,
                        "tuned_over_roofline": tuned / roof if roof == roof else None,
                        "tuned_over_default": tuned / d})
        log.info("attn B=%d ctx=%d default %.1f us tuned %.1f us roof %.1f (%s)", batch, case.ctx,
                 d, tuned, roof, best)
    del cases
    return {"batch": batch, "best": best, "score": best_score, "contexts": per_ctx, "tried": rows}


def table_md(res: dict) -> str:
    lines = [f"# Decode attention tiles: {res['device']}", "",
             f"{res['device']}, torch {res['torch']}, triton {res['triton']}, bf16, Hq = Hkv = "
             f"{res['heads']}, head dim {res['head_dim']}, cache block {KV_BLOCK}; copy bandwidth "
             f"{res['copy_bw_gbs']:.0f} GB/s measured in the run. Made by `{res['command']}` "
             "(benchmarks/bench_attention.py). Each time is one call in a CUDA graph walking "
             "several layers' caches (median of CUDA-event timings); default = the kernel's tiles "
             "before this table. Winner per batch = lowest geometric mean over the contexts of "
             "time / default.", "",
             "| batch | context | roofline us | default us | tuned us | tuned / roofline | "
             "tuned / default | tuned tiles |", "|---|---|---|---|---|---|---|---|"]
    for b in res["batches"]:
        t = ", ".join(f"{k}={v}" for k, v in b["best"].items()) or "default"
        for c in b["contexts"]:
            lines.append(f"| {b['batch']} | {c['context']} | {c['roofline_us']:.1f} | "
                         f"{c['default_us']:.1f} | {c['tuned_us']:.1f} | "
                         f"{(c['tuned_over_roofline'] or float('nan')):.2f} | "
                         f"{c['tuned_over_default']:.3f} | {t} |")
    return "\n".join(lines) + "\n"


def tried_md(res: dict) -> str:
    """Every variant each batch tried, per context: its time against the first (the table's
    entry in a family sweep)."""
    lines = ["", "## Every variant", "", "| batch | context | tiles | us | / first |",
             "|---|---|---|---|---|"]
    for b in res["batches"]:
        first = {}
        for r in b["tried"]:
            base = first.setdefault(r["context"], r.get("us"))
            t = ", ".join(f"{k}={v}" for k, v in r["tiles"].items()) or "default"
            us = f"{r['us']:.1f}" if "us" in r else r.get("error", "")[:60]
            rel = f"{r['us'] / base:.3f}" if "us" in r and base else ""
            lines.append(f"| {b['batch']} | {r['context']} | {t} | {us} | {rel} |")
    return "\n".join(lines) + "\n"


def device_table(res: dict) -> dict:
    """`decode_tiles`' table: each swept batch's winner (MHA, so one query head a KV head); an
    entry without tiles keeps that batch on the defaults."""
    key = pa.tiles_key(1, res["head_dim"], KV_BLOCK, torch.bfloat16)
    return {key: [dict(b["best"], max_batch=b["batch"]) for b in res["batches"]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=150, help="wall time for the sweep")
    ap.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None)
    ap.add_argument("--family", choices=("all", "splits"), default="all",
                    help="splits: the device table's entries at 1, 2 and 4 context splits only")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke runs the kernels under TRITON_INTERPRET=1")
    device = "cpu" if smoke else "cuda"
    import triton
    name = "smoke" if smoke else torch.cuda.get_device_name()
    res = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "heads": 2 if smoke else HEADS, "head_dim": 32 if smoke else HEAD_DIM,
           "command": "python benchmarks/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "copy_bw_gbs": copy_bandwidth_gbs(device, smoke), "batches": []}
    batches = args.batches or ([1, 2] if smoke else list(BATCHES))
    deadline = time.monotonic() + args.budget_s
    for batch in batches:  # past the deadline a batch gets its default timed, no sweep
        res["batches"].append(sweep_batch(batch, device, res["copy_bw_gbs"], smoke, deadline,
                                          args.family))
        if not smoke:
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "attention_raw.json", "w") as f:
        json.dump(res, f, indent=1)
    (args.out / "attention.md").write_text(table_md(res) + (tried_md(res) if args.family != "all" else ""))
    if args.family == "all":  # a family's sweep is a comparison, never a table
        with open(args.out / pa.tiles_file(name).name, "w") as f:
            json.dump(device_table(res), f, indent=1)
    return res


if __name__ == "__main__":
    main()
