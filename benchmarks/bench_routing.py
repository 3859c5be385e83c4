"""Brownout routing on a GPU: Triton kernels against the torch-ops version.

Qwen1.5-MoE-A2.7B router shape (60 experts, top-4, way 4 contiguous groups), skewed
random router output, tau = 0.5 in a device tensor, no valid mask (as in
bench_prefill_moe.py), T tokens in {64, 512, 2048}. Variants: `brownout_route_torch`,
the Triton path as dispatched (one launch up to FUSED_MAX_ASSIGNMENTS, else two), and
both Triton launch plans forced. Each is checked against the torch version first.
Timings (CUDA events, medians): "eager" = one call as a serving step issues it (host
launch cost included), "graph" = per call inside a
captured CUDA graph of 10 calls (device time and node gaps only).
Bytes moved are ~16 B per assignment (ids + weights in and out): T = 2048, k = 4 is
131 KB, ~0.05 us at 3 TB/s, so the floor is launch latency, not bandwidth.
Writes routing.json under --out, committed as benchmarks/results/routing/routing_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from gpu_timing import cuda_time_ms

from brownout.kernels import brownout_routing_triton as bt
from brownout.kernels.brownout_routing import brownout_route, brownout_route_torch, contiguous_groups

E, K, WAY, TAU = 60, 4, 4, 0.5


def eager_us(fn, iters: int = 50) -> float:
    return cuda_time_ms(fn, iters=iters, warmup=5) * 1e3


def graph_us(fn, calls: int = 10, iters: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return eager_us(graph.replay, iters) / calls


def make_inputs(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + 1.5 * torch.randn(E, generator=g)  # [T, E] skewed
    w, ids = torch.topk(torch.softmax(logits, -1), K)
    return ids.to(torch.int32).cuda(), w.float().cuda()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    group_of = contiguous_groups(E, WAY, device="cuda")
    tau = torch.tensor(TAU, device="cuda")
    variants = {
        "torch": lambda i, w: brownout_route_torch(i, w, tau, group_of, E),
        "triton": lambda i, w: brownout_route(i, w, tau, group_of, E),
        "triton_one_launch": lambda i, w: bt.brownout_route_triton(i, w, tau, group_of, E, fused=True),
        "triton_two_launches": lambda i, w: bt.brownout_route_triton(i, w, tau, group_of, E, fused=False),
    }
    rows = []
    for T in (64, 512, 2048):
        ids, w = make_inputs(T, T)
        ref_ids, ref_w = variants["torch"](ids, w)
        row = dict(tokens=T, experts=E, top_k=K, way=WAY, tau=TAU,
                   redirected=int((ref_ids >= E).sum()), merged=int((ref_ids < 0).sum()),
                   default_one_launch=T * K <= bt.FUSED_MAX_ASSIGNMENTS)
        for name, fn in variants.items():
            try:  # one failing variant must not lose the others' numbers
                out_ids, out_w = fn(ids, w)
                row[f"{name}_ids_equal"] = bool(torch.equal(out_ids, ref_ids))
                row[f"{name}_max_w_diff"] = float((out_w - ref_w).abs().max())
                row[f"{name}_eager_us"] = eager_us(lambda: fn(ids, w))
                row[f"{name}_graph_us"] = graph_us(lambda: fn(ids, w))
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON
                row[f"{name}_error"] = repr(exc)[:500]
        rows.append(row)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, timing="CUDA events, median; graph = per call "
                "in a captured graph of 10 calls")
    (args.out / "routing.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    names = list(variants)
    print("T     " + "  ".join(f"{n:>22}" for n in names) + "   (eager us / graph us)")
    for r in rows:
        cells = [f"{r.get(n + '_eager_us', -1):9.1f} / {r.get(n + '_graph_us', -1):8.1f}"
                 for n in names]
        ok = all(r.get(n + "_ids_equal") and r[n + "_max_w_diff"] <= 1e-6 for n in names)
        print(f"{r['tokens']:<5} " + "  ".join(f"{c:>22}" for c in cells) + f"   ok={ok}")


if __name__ == "__main__":
    main()
