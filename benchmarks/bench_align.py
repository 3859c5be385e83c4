"""The fused MoE's align step on a GPU: the atomics kernel against the register-only one
(`fused_moe.moe_align(..., method="small")`) at decode sizes, and against the sorted one
(`method="sorted"`: a histogram and a sort in registers) from 8 to 128 tokens.

Shapes: Qwen1.5-MoE-A2.7B serving (94 slots: 60 experts, 30 united, 4 folded shared; 8
assignments a token) and Qwen3-MoE (160 slots: 128 experts, 32 united; 8 a token). The small
kernel runs at 1-16 tokens where its tiles fit, the sorted one at 8-128 tokens (up to its
bound); the atomics kernel at every size, as the baseline. Each variant's grouping is checked
first (every assignment once, in its slot's blocks). Timings: per call inside a captured CUDA
graph of 10 calls, replays between CUDA events, median; the per-layer saving times the model's
MoE layers is what a decode step would gain. The `default` column names the kernel
`moe_align` picks at that size.
Writes align.json and align.md under --out.
Usage: python benchmarks/bench_align.py --out DIR   (CUDA GPU with triton required)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {"qwen1.5-moe (94 slots, 8 a token)": (94, 8), "qwen3-moe (160 slots, 8 a token)": (160, 8)}
SMALL_TOKENS = (1, 2, 4, 8, 16)  # decode sizes: the small kernel where its tiles fit
SORTED_TOKENS = (8, 16, 32, 64, 128)  # from where the small kernel stops to the sorted one's bound
BLOCK_M = 16  # the decode tiles' row block
GRAPH_CALLS = 10  # calls per captured graph: replay overhead spread over several launches
METHODS = ("atomics", "small", "sorted")


def grouped_ok(ids, sorted_ids, block_slot, bm: int) -> bool:
    flat = ids.reshape(-1).cpu()
    n = flat.numel()
    used = int((block_slot >= 0).sum())
    rows = sorted_ids[:used * bm].cpu().view(used, bm)
    if sorted(rows[rows < n].tolist()) != [i for i in range(n) if flat[i] >= 0]:
        return False
    return all((flat[rows[b][rows[b] < n].long()] == int(block_slot[b])).all() for b in range(used))


def methods_at(fm, tokens: int, n_assign: int, slots: int) -> list[str]:
    """The kernels timed at this size: the atomics baseline, then each other one in its range."""
    out = ["atomics"]
    if tokens in SMALL_TOKENS and fm._small_align_fits(n_assign, slots, BLOCK_M):
        out.append("small")
    if tokens in SORTED_TOKENS and fm._sorted_align_fits(n_assign):
        out.append("sorted")
    return out


def _us(r: dict, name: str) -> str:
    v = r.get(f"{name}_graph_us")
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch  # after parsing: nothing below runs without a GPU

    if not torch.cuda.is_available():
        sys.exit("bench_align.py needs a CUDA GPU")
    from gpu_timing import graph_call_us

    from brownout.kernels import fused_moe as fm

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape, (S, k) in SHAPES.items():
        for T in sorted(set(SMALL_TOKENS) | set(SORTED_TOKENS)):
            methods = methods_at(fm, T, T * k, S)
            if len(methods) < 2:
                continue
            g = torch.Generator().manual_seed(T * 100 + S)
            ids = torch.randint(0, S, (T, k), generator=g, dtype=torch.int32).cuda()
            touched = torch.empty((), dtype=torch.int64, device="cuda")
            row = dict(shape=shape, slots=S, tokens=T, assignments=T * k,
                       default=fm.align_method(T * k, S, BLOCK_M))
            for name in METHODS:
                if name not in methods:
                    row[f"{name}_grouped_ok"], row[f"{name}_graph_us"] = None, None
                    continue
                call = lambda name=name: fm.moe_align(ids, S, BLOCK_M, touched, method=name)  # noqa: E731
                row[f"{name}_grouped_ok"] = grouped_ok(ids, *call(), BLOCK_M)
                row[f"{name}_graph_us"] = graph_call_us(lambda i, call=call: call(), GRAPH_CALLS)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, script="benchmarks/bench_align.py",
                command=" ".join(sys.argv))
    (args.out / "align.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# The fused MoE's align: atomics kernel vs register-only and sorted ({meta['device']})", "",
             f"Made by `python {' '.join(sys.argv)}` (benchmarks/bench_align.py); torch {meta['torch']}. "
             f"Per call in a captured graph of {GRAPH_CALLS} calls, median of CUDA-event timings; "
             "'-': that kernel is not timed at this size.", "",
             "| shape | tokens | assignments | atomics us | small us | sorted us | default | grouping ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = all(r[f"{m}_grouped_ok"] is not False for m in METHODS)
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['assignments']} | {_us(r, 'atomics')} | "
                     f"{_us(r, 'small')} | {_us(r, 'sorted')} | {r['default']} | {ok} |")
    (args.out / "align.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
