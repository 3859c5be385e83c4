"""Router top-k on a GPU: `select_experts` (torch ops) against `select_experts_triton`.

Router shapes: Qwen1.5-MoE-A2.7B (60 experts, top-4, no renormalisation) and Qwen3-MoE
(128 experts, top-8, renormalised); bf16 logits [T, E] (the router GEMM's output) for T in
{1, 8, 64, 128, 256}; with and without shedding (active_k a 0-d device tensor holding k,
as a routed CUDA graph passes it). Variants: the torch reference, the Triton kernel at one
row per program (the default) and at 4 rows per program. Each is checked against the torch
version first (ids equal, weights to 1e-6). Timings: per call inside a captured CUDA graph
of 10 calls, replays between CUDA events, median (device time and node gaps only, as a
serving step's graph runs it); "eager" = one call as issued from Python, for reference.
Then the router GEMM with its top-k (hidden size ROUTER_HIDDEN, T in FUSED_TOKENS, up to
`routing_triton.ROUTER_MAX_ROWS`): `skinny_linear` then `select_experts_triton` (two
launches, the reference) against `router_topk` (one launch), Qwen1.5-MoE with its folded,
gated shared expert and Qwen3-MoE.
Writes routing_topk.json and routing_topk.md under --out, committed as
benchmarks/results/routing/routing_topk_<gpu>.{json,md}.
Usage: python benchmarks/bench_routing_topk.py --out DIR   (CUDA GPU with triton required)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {  # name: (experts, top_k, renormalize)
    "qwen1.5-moe": (60, 4, False),
    "qwen3-moe": (128, 8, True),
}
TOKENS = (1, 8, 64, 128, 256)
GRAPH_CALLS = 10  # calls per captured graph: replay overhead spread over several launches
ROUTER_HIDDEN = 2048  # both families' hidden size: the router weight is [E (+1), 2048]
FUSED_TOKENS = (1, 4, 8, 16)  # decode steps up to routing_triton.ROUTER_MAX_ROWS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                    help="comma-separated token counts")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]

    import torch  # after parsing: nothing below runs without a GPU

    if not torch.cuda.is_available():
        sys.exit("bench_routing_topk.py needs a CUDA GPU")
    import triton
    from gpu_timing import cuda_time_ms

    from brownout.kernels import routing
    from brownout.kernels import routing_triton as rt

    def eager_us(fn, iters: int = 50) -> float:
        return cuda_time_ms(fn, iters=iters, warmup=5) * 1e3

    def graph_us(fn, iters: int = 30) -> float:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        return eager_us(graph.replay, iters) / GRAPH_CALLS

    def record(row: dict, name: str, call, ref_w, ref_ids) -> None:
        """One variant's agreement with the reference and its timings into `row`."""
        try:  # one failing variant must not lose the others' numbers
            w, ids = call()
            # bf16 logits may tie; tied positions share weights, ids may swap
            row[f"{name}_ids_equal"] = bool(torch.equal(ids, ref_ids))
            row[f"{name}_max_w_diff"] = float((w - ref_w).abs().max())
            row[f"{name}_graph_us"] = graph_us(call)
            row[f"{name}_eager_us"] = eager_us(call)
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON
            row[f"{name}_error"] = repr(exc)[:500]

    args.out.mkdir(parents=True, exist_ok=True)
    variants = {
        "torch": routing.select_experts,
        "triton": rt.select_experts_triton,
        "triton_4rows": lambda *a: rt.select_experts_triton(*a, block_t=4),
    }
    rows = []
    for shape, (E, k, renorm) in SHAPES.items():
        for T in tokens:
            g = torch.Generator().manual_seed(T * 1000 + E)
            logits = torch.randn(T, E, generator=g).to(torch.bfloat16).cuda()
            for shed in (False, True):
                active = torch.tensor(k, dtype=torch.int32, device="cuda") if shed else None
                ref_w, ref_ids = variants["torch"](logits, k, renorm, active)
                row = dict(shape=shape, experts=E, top_k=k, renormalize=renorm, tokens=T,
                           active_k_tensor=shed,
                           dispatched_to_triton=T <= routing.TRITON_MAX_TOKENS)
                for name, fn in variants.items():
                    record(row, name, lambda fn=fn: fn(logits, k, renorm, active), ref_w, ref_ids)
                rows.append(row)
                print(json.dumps(row), flush=True)
    # the serving layer's whole routing launch with a folded, gated shared expert (4 slots,
    # Qwen1.5-MoE) and CUDA-graph padding rows: torch ops (top-k, padding, shared columns)
    # against the one kernel
    E, k, renorm = SHAPES["qwen1.5-moe"]
    shared = routing.SharedSlots(first=E + 30, count=4, gated=True)
    for T in tokens:
        g = torch.Generator().manual_seed(T * 1000 + E + 1)
        logits = torch.randn(T, E + 1, generator=g).to(torch.bfloat16).cuda()
        valid = torch.arange(T, device="cuda") < max(1, T - 1)
        routes = {
            "torch": lambda: routing.append_shared(
                *(lambda w, i: (w, torch.where(valid.unsqueeze(1), i, -1)))(
                    *routing.select_experts(logits[:, :E], k, renorm)), logits, E, shared, valid),
            "triton": lambda: rt.select_experts_triton(logits, k, renorm, num_experts=E, shared=shared,
                                                       valid=valid),
        }
        ref_w, ref_ids = routes["torch"]()
        row = dict(shape="qwen1.5-moe+shared", experts=E, top_k=k, renormalize=renorm, tokens=T,
                   active_k_tensor=False, dispatched_to_triton=T <= routing.TRITON_MAX_TOKENS)
        for name, fn in routes.items():
            record(row, name, fn, ref_w, ref_ids)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the router GEMM and its top-k: two launches (skinny GEMM, top-k) against one
    from brownout.kernels import skinny_gemm as sk

    router_rows = []
    router_shapes = {  # name: (experts, top_k, renormalize, folded shared expert)
        "qwen1.5-moe+shared": (60, 4, False, routing.SharedSlots(first=90, count=4, gated=True)),
        "qwen3-moe": (128, 8, True, None),
    }
    for shape, (E, k, renorm, shared) in router_shapes.items():
        N = E + int(shared is not None and shared.gated)
        g = torch.Generator().manual_seed(N)
        weight = (torch.randn(N, ROUTER_HIDDEN, generator=g) / ROUTER_HIDDEN ** 0.5).to(torch.bfloat16).cuda()
        for T in FUSED_TOKENS:
            x = torch.randn(T, ROUTER_HIDDEN, generator=g).to(torch.bfloat16).cuda()
            valid = torch.arange(T, device="cuda") < max(1, T - 1)
            with torch.inference_mode():
                routes = {
                    "two_launches": lambda: rt.select_experts_triton(
                        sk.skinny_linear(x, weight), k, renorm, num_experts=E, shared=shared, valid=valid),
                    "fused": lambda: rt.router_topk(x, weight, k, renorm, num_experts=E, shared=shared,
                                                    valid=valid)[:2],
                }
                ref_w, ref_ids = routes["two_launches"]()
                row = dict(shape=shape, experts=E, top_k=k, renormalize=renorm, tokens=T, hidden=ROUTER_HIDDEN,
                           fused_usable=rt.router_topk_usable(x, weight, k, shared.count if shared else 0,
                                                              num_experts=E))
                for name, fn in routes.items():
                    record(row, name, fn, ref_w, ref_ids)
            router_rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, script="benchmarks/bench_routing_topk.py",
                command=" ".join(sys.argv), timing=f"CUDA events, median; graph = per call in a "
                f"captured graph of {GRAPH_CALLS} calls; logits bf16 randn")
    (args.out / "routing_topk.json").write_text(json.dumps(dict(meta=meta, rows=rows, router_rows=router_rows),
                                                           indent=1))
    names = list(variants)
    lines = [f"# Router top-k: torch ops vs one Triton launch ({meta['device']})", "",
             f"Made by `python {' '.join(sys.argv)}` (benchmarks/bench_routing_topk.py); "
             f"torch {meta['torch']}, triton {meta['triton']}. {meta['timing']}.", "",
             "| shape | T | shed | " + " | ".join(f"{n} graph us" for n in names)
             + " | " + " | ".join(f"{n} eager us" for n in names) + " | ids equal | max w diff |",
             "|" + "---|" * (3 + 2 * len(names) + 2)]
    for r in rows:
        g = " | ".join(f"{r.get(n + '_graph_us', float('nan')):.2f}" for n in names)
        e = " | ".join(f"{r.get(n + '_eager_us', float('nan')):.2f}" for n in names)
        eq = all(v for key, v in r.items() if key.endswith("_ids_equal")) \
            and not any(key.endswith("_error") for key in r)
        dw = max((v for key, v in r.items() if key.endswith("_max_w_diff")), default=float("inf"))
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['active_k_tensor']} | {g} | {e} | "
                     f"{eq} | {dw:.1e} |")
    lines += ["", f"## The router GEMM and its top-k: two launches vs `router_topk` (hidden {ROUTER_HIDDEN}, "
              "bf16)", "",
              "| shape | T | two launches graph us | fused graph us | two launches eager us | fused eager us "
              "| ids equal | max w diff |", "|" + "---|" * 8]
    for r in router_rows:
        us = " | ".join(f"{r.get(f'{n}_{kind}_us', float('nan')):.2f}" for kind in ("graph", "eager")
                        for n in ("two_launches", "fused"))
        lines.append(f"| {r['shape']} | {r['tokens']} | {us} | {r.get('fused_ids_equal', False)} | "
                     f"{r.get('fused_max_w_diff', float('inf')):.1e} |")
    (args.out / "routing_topk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
