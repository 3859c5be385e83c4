"""Side-by-side table of two `bench_engine.py` runs (decode and prefill stages), as ratios.

Used to check that a change leaves the GPU figures where they were: each row is one step
shape, measured before and after on the same kind of GPU, with the after/before ratio.

Run: python benchmarks/compare_engine.py BEFORE_DIR AFTER_DIR --out FILE.md [--title T]
     python benchmarks/compare_engine.py --shed RUN_DIR --out FILE.md (the `shed` stage alone)
     python benchmarks/compare_engine.py BEFORE AFTER --brownout AFTER --out FILE.md (the
         comparison, then the `brownout` stage of AFTER: decode steps by way at tau 1 and 0)
     --profiles b1,b8 adds the kernel tables of those profiled steps, before and after
(each DIR holds the `decode.json`, `prefill.json` and `meta.json` that bench_engine writes)
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from make_tables import routing_overhead_table

# Eager steps are host-bound on a GPU box; graphed steps are what serving runs.
GRAPHED_ONLY = True


def _load(path: Path):
    """A JSON file, or its gzipped form (compacted raw folders gzip the larger files)."""
    if path.exists():
        return json.loads(path.read_text())
    return json.loads(gzip.open(f"{path}.gz", "rt").read())


def _exists(path: Path) -> bool:
    return path.exists() or Path(f"{path}.gz").exists()


def _rows(run_dir: Path) -> dict[tuple, dict]:
    rows = {}
    for stage in ("decode", "prefill"):
        path = run_dir / f"{stage}.json"
        if not _exists(path):
            continue
        for r in _load(path):
            if GRAPHED_ONLY and not r["cuda_graph"]:
                continue
            if stage == "decode":
                key = ("decode", f"batch {r['batch']}, context {r['ctx']}", 1.0)
            else:
                key = (r["kind"], f"{r['tokens']} tokens, {r['seqs']} sequences", r["tau"])
            rows[key] = r
    return rows


def render(before: Path, after: Path, title: str) -> str:
    old, new = _rows(before), _rows(after)
    meta_old = json.loads((before / "meta.json").read_text())
    meta_new = json.loads((after / "meta.json").read_text())
    lines = [f"# {title}", "",
             f"Before: {before}, {meta_old['device']}, torch {meta_old['torch']}. "
             f"After: {after}, {meta_new['device']}, torch {meta_new['torch']}. "
             f"Weights: {meta_new['weights']} ({meta_new['preset']}). CUDA-graphed steps only; "
             "step = `ModelRunner.execute` wall time; roofline as in `bench_engine.py`.", "",
             "| kind | step | tau | before ms | after ms | after / before | before / roofline | after / roofline |",
             "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for key in sorted(set(old) & set(new), key=str):
        o, n = old[key], new[key]
        ratio = n["step_ms"] / o["step_ms"]
        ratios.append(ratio)
        roof_o = o["step_ms"] / o["roofline_ms"]
        roof_n = n["step_ms"] / n["roofline_ms"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {o['step_ms']:.2f} | {n['step_ms']:.2f} "
                     f"| {ratio:.3f} | {roof_o:.2f} | {roof_n:.2f} |")
    if ratios:
        lines += ["", f"after / before over {len(ratios)} graphed step shapes: "
                      f"min {min(ratios):.3f}, max {max(ratios):.3f}, "
                      f"geometric mean {_geomean(ratios):.3f}."]
    return "\n".join(lines) + "\n"


def render_shed(run_dir: Path) -> str:
    """The `shed` stage of one run: steps at each k' x tau against k' = k, tau 1."""
    meta = json.loads((run_dir / "meta.json").read_text())
    lines = [f"# Expert shedding (k' < k) and brownout on the {meta['device']}", "",
             f"{run_dir}, torch {meta['torch']}, {meta['weights']} ({meta['preset']}), way-4 "
             "uncalibrated united experts, CUDA-graphed steps (`bench_engine.py --stages shed`). "
             "`vs full`: against the same step at k' = k (4) and tau 1.", "",
             "| kind | tokens | k' | tau | graph | step ms | / roofline | vs full | experts / layer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in json.loads((run_dir / "shed.json").read_text()):
        lines.append(f"| {r['kind']} | {r['tokens']} | {r['top_k']} | {r['tau']:g} | `{r['graph']}` "
                     f"| {r['step_ms']:.2f} | {r['ratio_roofline']:.2f} | {r['vs_full']:.3f} "
                     f"| {r['experts_touched_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def _geomean(values: list[float]) -> float:
    product = 1.0
    for v in values:
        product *= v
    return product ** (1.0 / len(values))


def render_brownout(run_dir: Path) -> str:
    """The `brownout` stage's decode steps by way and batch at tau 1 and 0, and the routing
    path's cost at tau 1 inside one MoE layer."""
    d = _load(run_dir / "brownout.json")
    by = {(r["way"], r["batch"], r["tau"]): r for r in d["decode"]}
    lines = ["## Brownout decode steps by way (context 512, CUDA-graphed, uncalibrated united experts)", "",
             "`vs tau 1`: the same step at tau 1 in the same run; `/ roofline`: bytes read (dense weights, "
             "the expert slots touched, KV) over the measured copy bandwidth.", "",
             "| way | batch | tau 1 ms | tau 0 ms | tau 0 vs tau 1 | tau 0 / roofline | slots / layer at tau 0 |",
             "|---|---|---|---|---|---|---|"]
    for way, batch in sorted({(w, b) for w, b, _ in by}):
        a, z = by.get((way, batch, 1.0)), by.get((way, batch, 0.0))
        if a and z:
            lines.append(f"| {way} | {batch} | {a['step_ms']:.2f} | {z['step_ms']:.2f} | {z['vs_tau1']:.3f} | "
                         f"{z['ratio_roofline']:.2f} | {z['experts_touched_mean']:.1f} |")
    lines += ["", "Routing at tau 1 inside one MoE layer (the graphed layer with the routing path vs without):", ""]
    lines += routing_overhead_table(d["routing_overhead"])
    return "\n".join(lines) + "\n"


def render_profiles(before: Path, after: Path, tags: list[str], top: int = 12) -> str:
    """Kernel launches and kernel time per profiled step (`bench_engine.py --stages profile`)
    of the two runs, then each run's `top` kernels by time, for every tag both runs have."""
    lines = []
    for tag in tags:
        runs = {name: d / f"profile_{tag}.json" for name, d in (("before", before), ("after", after))}
        if not all(_exists(p) for p in runs.values()):
            continue
        prof = {name: _load(p) for name, p in runs.items()}
        b, a = prof["before"], prof["after"]
        lines += [f"## Kernels of the step `{tag}` ({a['tokens']} tokens, {a['seqs']} sequences, tau "
                  f"{a['tau']:g}, CUDA graph; torch.profiler over 5 replays)", "",
                  "| run | kernel launches / step | kernel time us / step |", "|---|---|---|"]
        for name, d in prof.items():
            lines.append(f"| {name} | {sum(k['calls'] for k in d['kernels'])} | "
                         f"{d['total_device_us_per_step']:.0f} |")
        if all("timeline" in d for d in prof.values()):
            lines += ["", "The profiled step's GPU timeline (last of the 5): span from its first kernel's "
                      "start to its last kernel's end, kernel time in it, and the idle time inside the "
                      "graph (gaps under 10 us) vs outside it (the host's share).", "",
                      "| run | span us | kernels us | idle in graph us | idle waiting for the host us |",
                      "|---|---|---|---|---|"]
            for name, d in prof.items():
                in_graph, host = _idle_split(d["timeline"]["kernels"])
                lines.append(f"| {name} | {d['timeline']['span_us']:.0f} | {d['timeline']['busy_us']:.0f} | "
                             f"{in_graph:.0f} | {host:.0f} |")
        for name, d in prof.items():
            lines += ["", f"{name}: top {top} kernels", "", "| kernel | calls / step | us / step |", "|---|---|---|"]
            for k in d["kernels"][:top]:
                lines.append(f"| `{k['name'][:70]}` | {k['calls']} | {k['device_us_per_step']:.0f} |")
        lines.append("")
    return "\n".join(lines)


GRAPH_GAP_US = 10.0  # kernels of one graph follow each other within this; longer gaps wait on the host


def _idle_split(kernels: list[dict]) -> tuple[float, float]:
    """Idle GPU time between consecutive kernels, split into gaps shorter than GRAPH_GAP_US
    (launch latency inside a graph) and longer ones (the GPU waiting for the host)."""
    short = long = 0.0
    for prev, k in zip(kernels, kernels[1:]):
        gap = max(0.0, k["start_us"] - prev["start_us"] - prev["dur_us"])
        if gap < GRAPH_GAP_US:
            short += gap
        else:
            long += gap
    return short, long


def render_host(before: Path, after: Path) -> str:
    """Where a graphed decode step's time goes besides the graph (`bench_engine.py` decode
    stage: `replay_ms`, `host_ms`), before and after."""
    old, new = _rows(before), _rows(after)
    keys = [k for k in sorted(set(old) & set(new), key=str)
            if "replay_ms" in old[k] and "replay_ms" in new[k]]
    if not keys:
        return ""
    lines = ["## A graphed decode step: the graph replayed alone, and the rest", "",
             "`replay`: the step's CUDA graph replayed alone (CUDA events); `rest` = step - replay: the "
             "host's preparation before the replay, the LM head and sampler after it, the copies back.",
             ""]
    with_host = all("host_ms" in old[k] and "host_ms" in new[k] for k in keys)
    head = "| step | before step ms | before replay ms | before rest ms | after step ms | after replay ms | after rest ms |"
    if with_host:
        head += " before prepare ms (host) | after prepare ms (host) | before launch ms (host) | after launch ms (host) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for k in keys:
        o, n = old[k], new[k]
        row = (f"| {k[1]} | {o['step_ms']:.3f} | {o['replay_ms']:.3f} | {o['step_ms'] - o['replay_ms']:.3f} | "
               f"{n['step_ms']:.3f} | {n['replay_ms']:.3f} | {n['step_ms'] - n['replay_ms']:.3f} |")
        if with_host:
            row += (f" {o['host_ms']['prepare']:.3f} | {n['host_ms']['prepare']:.3f} | "
                    f"{o['host_ms']['launch']:.3f} | {n['host_ms']['launch']:.3f} |")
        lines.append(row)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, nargs="?")
    ap.add_argument("after", type=Path, nargs="?")
    ap.add_argument("--shed", type=Path, help="render the shed stage of this run instead")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Engine steps before and after a change")
    ap.add_argument("--brownout", type=Path, nargs="+", default=[],
                    help="append the brownout stage of these runs, each under its folder's name")
    ap.add_argument("--profiles", default="", help="comma-separated profile tags to compare (e.g. b1,b8)")
    ap.add_argument("--note", default="", help="a paragraph set between the two tables")
    args = ap.parse_args()
    if args.shed:
        args.out.write_text(render_shed(args.shed))
        return
    text = render(args.before, args.after, args.title)
    if args.note:
        text = text.rstrip("\n") + "\n\n" + args.note + "\n"
    for run in args.brownout:
        part = render_brownout(run)
        if len(args.brownout) > 1:
            part = part.replace("## Brownout decode steps", f"## {run.name}: brownout decode steps", 1)
        text = text.rstrip("\n") + "\n\n" + part
    host = render_host(args.before, args.after)
    if host:
        text = text.rstrip("\n") + "\n\n" + host
    if args.profiles:
        text = text.rstrip("\n") + "\n\n" + render_profiles(args.before, args.after, args.profiles.split(","))
    args.out.write_text(text)


if __name__ == "__main__":
    main()
