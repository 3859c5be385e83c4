"""Render the markdown tables of benchmarks/results from their raw JSON files.

Run: python benchmarks/make_tables.py [--demo-dir DIR]
(rewrites engine_decode_h100.md, headline_h100_run1.md, demo_cpu.md; with --demo-dir,
first collects demo_cpu.json from the output directory of `brownout demo`)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _f(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def engine_decode() -> None:
    data = json.loads((RESULTS / "engine_decode_h100.json").read_text())
    meta = data["meta"]
    lines = [f"# Decode step, dummy {meta['preset']} ({meta['weights']})", "",
             f"{meta['device']}, torch {meta['torch']}, copy bandwidth "
             f"{meta['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write), measured in the same run by "
             "`benchmarks/bench_engine.py --stages decode`. Step = `ModelRunner.execute` end to end "
             "(input prep, forward, sampling, host copy of the tokens). Roofline = (all non-expert "
             "weights + distinct expert slots touched x expert bytes + KV read) / bandwidth.", "",
             "Measured before three later changes, so it is an upper bound of today's step: the "
             "captured graphs then ran brownout routing at tau = 1 as ~25 torch ops per layer "
             "(about 0.1 ms per layer inside a graph, see routing_h100.md; now a routing-free graph "
             "is replayed at tau = 1), the fused MoE ran default tiles (no tuned table yet), and "
             "the routing kernel was not fused. Not yet re-measured.", "",
             "| context | batch | CUDA graph | step ms | roofline ms | step / roofline | experts touched / layer |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['ctx']} | {r['batch']} | {'yes' if r['cuda_graph'] else 'no'} | {r['step_ms']:.2f} | "
                     f"{r['roofline_ms']:.2f} | {r['ratio']:.2f} | {r['experts_touched_mean']:.1f} |")
    (RESULTS / "engine_decode_h100.md").write_text("\n".join(lines) + "\n")


def headline(name: str) -> None:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    cal = data["calibration"]
    lines = [f"# {name}", "", f"Workload: `{data['workload']}`", "",
             "Calibration (brownout off): " + ", ".join(f"{k} {_f(v, 4)}" for k, v in cal.items()), "",
             "| policy | violation windows | fraction | reduction vs off | goodput req/s | burst goodput req/s "
             "| burst goodput vs off | tok/s | P90 TTFT s | P90 TPOT s | mean tau |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['label']} | {r['violations']} | {_f(r['violation_fraction'])} | {_f(r['reduction'])} | "
                     f"{_f(r['goodput_req_s'])} | {_f(r['burst_goodput_req_s'])} | {_f(r['burst_goodput_vs_off'])} | "
                     f"{_f(r['throughput_tok_s'], 0)} | {_f(r['p90_ttft_s'])} | {_f(r['p90_tpot_s'], 4)} | "
                     f"{_f(r['mean_tau'])} |")
    if data.get("sweep"):
        lines += ["", "Rate sweep (Poisson-free trace replay at a fraction of the calibrated capacity):", "",
                  "| policy | load fraction | offered req/s | P90 TTFT s | P90 TPOT s | goodput req/s | mean tau | meets SLO |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in data["sweep"]:
            lines.append(f"| {r['policy']} | {r['load_fraction']} | {_f(r['offered_req_s'])} | {_f(r['p90_ttft_s'])} | "
                         f"{_f(r['p90_tpot_s'], 4)} | {_f(r['goodput_req_s'])} | {_f(r['mean_tau'])} | {r['meets_slo']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def collect_demo(demo_dir: Path, machine: str, name: str = "demo_cpu") -> None:
    out = {"machine": machine, "command": "brownout demo --out demo-out --no-progress", "parts": {}}
    for part in sorted(p.name for p in demo_dir.iterdir() if (p / "comparison.json").is_file()):
        meta = json.loads((demo_dir / part / "off" / "meta.json").read_text())
        out["parts"][part] = {"calibration": json.loads((demo_dir / part / "calibration.json").read_text()),
                              "workload": meta["workload"],
                              "comparison": json.loads((demo_dir / part / "comparison.json").read_text())}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))


def demo_cpu(name: str = "demo_cpu") -> None:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    md = ["# The main job on the CPU (`brownout demo`)", "",
          f"Machine: {data['machine']}. Command: `{data['command']}`; raw per-request logs, metrics "
          f"scrapes, reports and plots in `raw/{name}.tgz`. Timings on a CPU say nothing of GPU "
          "performance; they show the control loop at work.", ""]
    for part, d in data["parts"].items():
        cal = d["calibration"]
        md += [f"## {part}", "", f"Workload `{d['workload']}`; SLOs TTFT {cal['slo_ttft_s']} s, TPOT "
               f"{cal['slo_tpot_s'] * 1e3:.1f} ms; full-batch TPOT {cal['full_batch_tpot_s'] * 1e3:.1f} ms "
               f"at tau 1 vs {cal['full_batch_tpot_tau0_s'] * 1e3:.1f} ms at tau 0.", "",
               "| policy | violation windows | reduction vs off | goodput req/s | tok/s | P90 TTFT s "
               "| P90 TPOT s | mean tau |", "|---|---|---|---|---|---|---|---|"]
        for r in d["comparison"]["rows"]:
            md.append(f"| {r['label']} | {r['violations']} | {_f(r['reduction'])} | {_f(r['goodput_req_s'])} | "
                      f"{_f(r['throughput_tok_s'], 0)} | {_f(r['p90_ttft_s'])} | {_f(r['p90_tpot_s'], 4)} | "
                      f"{_f(r['mean_tau'])} |")
        md.append("")
    if data.get("note"):
        md += [data["note"], ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--machine", default="development box: 2-core x86-64 VM, no GPU, CPU-only torch "
                                         "2.13.0 (busy with other jobs at times)")
    args = ap.parse_args()
    if args.demo_dir:
        collect_demo(args.demo_dir, args.machine)
    engine_decode()
    headline("headline_h100_run1")
    demo_cpu()
    demo_cpu("demo_cpu_run1")
