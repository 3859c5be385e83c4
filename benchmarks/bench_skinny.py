"""Decode-size linear layers on a GPU: the skinny Triton GEMM (`skinny_gemm.skinny_linear`)
against cuBLAS (`F.linear`), at 1-64 rows.

Shapes: the dense linears of a decode step of Qwen1.5-MoE-A2.7B (QKV with bias, output
projection, router with the folded shared gate's row, the unfolded shared expert's gate/up
and down) and Qwen3-30B-A3B (QKV, output projection, router). Each case is checked against
F.linear first (bf16 rounding). Timings: per call inside a captured CUDA graph that cycles
through copies of the weight (128 MB of them, 10-512 calls: `gpu_timing.graph_call_us`), so
each call reads HBM as a model's layers do; replays between CUDA events, median; GB/s is the weight's bytes over that
time.
Writes skinny.json and skinny.md under --out.
Usage: python benchmarks/bench_skinny.py --out DIR   (CUDA GPU with triton required)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# name: (N, K, bias)
SHAPES = {
    "qwen1.5-moe qkv": (6144, 2048, True),
    "qwen1.5-moe o_proj": (2048, 2048, False),
    "qwen1.5-moe router+shared gate": (61, 2048, False),
    "qwen1.5-moe shared gate_up": (11264, 2048, False),
    "qwen1.5-moe shared down": (2048, 5632, False),
    "qwen3-moe qkv": (5120, 2048, False),
    "qwen3-moe o_proj": (2048, 4096, False),
    "qwen3-moe router": (128, 2048, False),
}
ROWS = (1, 4, 8, 16, 32, 64)
SWEEP_ROWS = (1, 64)  # the tile sweep's row counts (16 and 64-row tiles)
SWEEP = [dict(block_n=bn, block_k=bk, num_stages=3) for bn in (16, 32, 64) for bk in (128, 256)]
GRAPH_CALLS = 10  # calls per captured graph at least: replay overhead spread over several launches
COLD_BYTES = 128 << 20  # weights a graph cycles through: beyond a 50 MB L2, so each call reads HBM
MAX_CALLS = 512  # calls per graph at most (the smallest weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch  # after parsing: nothing below runs without a GPU
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("bench_skinny.py needs a CUDA GPU")
    from gpu_timing import graph_call_us

    from brownout.kernels import skinny_gemm as sk

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for shape, (N, K, bias) in SHAPES.items():
            w = 0.02 * torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
            nbytes = w.numel() * 2
            copies = max(GRAPH_CALLS, min(MAX_CALLS, -(-COLD_BYTES // nbytes)))
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            for M in ROWS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.float(), w.float(), None if b is None else b.float())
                out = sk.skinny_linear(x, w, b)
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                split = sk.choose_split_k(-(-N // sk.BLOCK_N), K, x.device, sk.BLOCK_N, sk.row_block(M))
                cublas = graph_call_us(lambda i: F.linear(x, ws[i], b), copies, iters=20, warmup=3)
                skinny = graph_call_us(lambda i: sk.skinny_linear(x, ws[i], b), copies, iters=20, warmup=3)
                row = dict(shape=shape, N=N, K=K, rows=M, split_k=split, max_rel_err=err,
                           cublas_us=cublas, skinny_us=skinny, cublas_GBps=nbytes / cublas / 1e3,
                           skinny_GBps=nbytes / skinny / 1e3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, script="benchmarks/bench_skinny.py",
                command=" ".join(sys.argv))
    sweep = []
    with torch.inference_mode():  # tile variants at a few row counts: the table's next defaults
        for shape, (N, K, bias) in SHAPES.items():
            if N > sk.SKINNY_MAX_N:  # layers the engine leaves to cuBLAS
                continue
            w = 0.02 * torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
            copies = max(GRAPH_CALLS, min(MAX_CALLS, -(-COLD_BYTES // (w.numel() * 2))))
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            for M in SWEEP_ROWS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.float(), w.float(), None if b is None else b.float())
                for cfg in SWEEP:
                    auto = sk.choose_split_k(-(-N // cfg["block_n"]), K, x.device, cfg["block_n"], sk.row_block(M))
                    for split in sorted({1, max(1, auto // 2), auto, min(sk.MAX_SPLIT_K, 2 * auto)}):
                        if split > 1 and K // split < cfg["block_k"]:
                            continue
                        if not sk.fits_workspace(split, -(-N // cfg["block_n"]), cfg["block_n"], sk.row_block(M)):
                            continue
                        call = lambda i, cfg=cfg, split=split: sk.skinny_linear(x, ws[i], b, split_k=split, **cfg)  # noqa: E731
                        out = call(0)
                        ok = float((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2
                        us = graph_call_us(call, copies, iters=20, warmup=3)
                        sweep.append(dict(shape=shape, rows=M, split_k=split, ok=ok, us=us, **cfg))
                best = min((r for r in sweep if r["shape"] == shape and r["rows"] == M and r["ok"]),
                           key=lambda r: r["us"])
                print("best", json.dumps(best), flush=True)
    (args.out / "skinny.json").write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweep), indent=1))
    lines = [f"# Decode-size linears: skinny Triton GEMM vs cuBLAS ({meta['device']})", "",
             f"Made by `python {' '.join(sys.argv)}` (benchmarks/bench_skinny.py); torch {meta['torch']}, bf16. "
             "Per call in a captured graph cycling through 128 MB of weight copies (HBM reads, not L2), "
             "median of CUDA-event timings; GB/s = weight bytes / time.", "",
             "| shape | N x K | rows | split K | cuBLAS us | skinny us | skinny / cuBLAS | cuBLAS GB/s | skinny GB/s | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['N']} x {r['K']} | {r['rows']} | {r['split_k']} | {r['cublas_us']:.2f} | "
                     f"{r['skinny_us']:.2f} | {r['skinny_us'] / r['cublas_us']:.2f} | {r['cublas_GBps']:.0f} | "
                     f"{r['skinny_GBps']:.0f} | {r['max_rel_err']:.1e} |")
    lines += ["", "Tile sweep: the fastest correct variant per shape and row count (all in skinny.json).", "",
              "| shape | rows | block_n | block_k | stages | split K | us | default us |", "|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        for M in SWEEP_ROWS:
            if SHAPES[shape][0] > sk.SKINNY_MAX_N:
                continue
            cands = [r for r in sweep if r["shape"] == shape and r["rows"] == M and r["ok"]]
            best = min(cands, key=lambda r: r["us"])
            default = next(r["skinny_us"] for r in rows if r["shape"] == shape and r["rows"] == M)
            lines.append(f"| {shape} | {M} | {best['block_n']} | {best['block_k']} | {best['num_stages']} | "
                         f"{best['split_k']} | {best['us']:.2f} | {default:.2f} |")
    (args.out / "skinny.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
