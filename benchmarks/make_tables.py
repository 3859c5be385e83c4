"""Render the markdown tables of benchmarks/results from their JSON files.

Each experiment has its folder under benchmarks/results (headline/, engine/, kernels/,
demo/); a table NAME.md is rendered from NAME.json beside it (and, for a headline run,
NAME_steps.json from `headline_steps.py`).

Run: python benchmarks/make_tables.py [--demo-dir DIR [--demo-name NAME]]
(rewrites every table it renders; with --demo-dir, first collects demo/NAME.json from the
output directory of `brownout demo` and its compact raw data into demo/raw/NAME/)
"""

from __future__ import annotations

import json
from pathlib import Path

from compact_raw import compact_tree

RESULTS = Path(__file__).resolve().parent / "results"
HEADLINE, ENGINE, KERNELS, DEMO = (RESULTS / d for d in ("headline", "engine", "kernels", "demo"))


def _f(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def routing_overhead_table(rows: list[dict]) -> list[str]:
    """The `brownout` stage's routing-overhead rows (bench_engine.py) as a markdown table."""
    return ["| batch | plain ms | routed at tau 1 ms | overhead |", "|---|---|---|---|"] + [
        f"| {r['batch']} | {r['plain_ms']:.4f} | {r['routed_tau1_ms']:.4f} | {100 * r['overhead']:.1f}% |"
        for r in rows]


def engine(name: str) -> None:
    """Tables of a `bench_engine.py` run collected into engine/NAME.json (any of its stages)."""
    data = json.loads((ENGINE / f"{name}.json").read_text())
    meta = data["meta"]
    md = [f"# Engine on the GPU: {name}", "",
          f"{meta['device']}, torch {meta['torch']}, dummy {meta['preset']} ({meta['weights']}); copy bandwidth "
          f"{meta['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write) measured in the same run. Command: "
          f"`{data['command']}`. " + data.get("note", ""), ""]
    if data.get("decode"):
        md += ["## Decode step vs its roofline", "",
               "Step = `ModelRunner.execute` end to end (input prep, forward, sampling, host copy of the "
               "tokens), tau = 1. Roofline = (non-expert weights + distinct expert slots touched x expert "
               "bytes + KV read) / copy bandwidth.", "",
               "| context | batch | CUDA graph | step ms | roofline ms | step / roofline | experts touched / layer |",
               "|---|---|---|---|---|---|---|"]
        for r in data["decode"]:
            md.append(f"| {r['ctx']} | {r['batch']} | {'yes' if r['cuda_graph'] else 'no'} | {r['step_ms']:.2f} | "
                      f"{r['roofline_ms']:.2f} | {r['ratio']:.2f} | {r['experts_touched_mean']:.1f} |")
        md.append("")
    b = data.get("brownout")
    if b:
        md += ["## Brownout: one MoE layer (CUDA graph) vs tau", "",
               "Way-4 / way-2 uniform-average united experts of contiguous groups; random router weights "
               "route almost uniformly, so the slots kept at a given tau are a lower bound of a trained "
               "model's savings. `vs tau 1` is against the routing-free layer of the same batch.", "",
               "| way | batch | tau | ms | slots touched | / roofline | vs brownout off |", "|---|---|---|---|---|---|---|"]
        for r in b["moe_layer"]:
            md.append(f"| {r['way']} | {r['batch']} | {r['tau']} | {r['ms']:.4f} | {r['slots_touched']} | "
                      f"{r['ratio_roofline']:.2f} | {r['vs_no_brownout']:.3f} |")
        md += ["", "Routing overhead at tau = 1 (routed graph vs routing-free graph, MoE layer):", ""]
        md += routing_overhead_table(b["routing_overhead"])
        md += ["", "## Brownout: full decode step (CUDA graph, context 512) vs tau", "",
               "| way | batch | tau | step ms | vs tau 1 | / roofline | experts touched / layer |",
               "|---|---|---|---|---|---|---|"]
        for r in b["decode"]:
            md.append(f"| {r['way']} | {r['batch']} | {r['tau']} | {r['step_ms']:.2f} | {r['vs_tau1']:.3f} | "
                      f"{r['ratio_roofline']:.2f} | {r['experts_touched_mean']:.1f} |")
        md.append("")
    if data.get("prefill") and "kernel_ms" in data["prefill"][0]:
        md += ["## Eager prefill steps (4 prompts per step) at tau 1 and 0", "",
               "| tokens | tau | step ms (wall) | GPU kernel ms |", "|---|---|---|---|"]
        for r in data["prefill"]:
            md.append(f"| {r['tokens']} | {r['tau']} | {r['step_ms']:.2f} | {r['kernel_ms']:.2f} |")
        md.append("")
    elif data.get("prefill"):
        md += ["## Steps with prefill work: eager vs CUDA graph, tau 1 vs 0", "",
               "`prefill`: 4 fresh prompts sharing the tokens; `mixed`: one fresh prompt chunk (512 or 1024 "
               "tokens) beside 63 decodes at context 512. Step = `ModelRunner.execute` wall time. Roofline = "
               "max(bytes: non-expert weights + slots touched x expert bytes + KV, over copy bandwidth; "
               "matmul flops over the measured bf16 matmul rate). `vs tau 1`: against the same step and mode "
               "at tau 1.", "",
               "| kind | tokens | sequences | CUDA graph | tau | step ms | roofline ms (bytes / flops) "
               "| / roofline | vs tau 1 | experts / layer |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["prefill"]:
            md.append(f"| {r['kind']} | {r['tokens']} | {r['seqs']} | {'yes' if r['cuda_graph'] else 'no'} | "
                      f"{r['tau']} | {r['step_ms']:.2f} | {r['roofline_ms']:.2f} ({r['bytes_ms']:.2f} / "
                      f"{r['flops_ms']:.2f}) | {r['ratio_roofline']:.2f} | {r['vs_tau1']:.3f} | "
                      f"{r['experts_touched_mean']:.1f} |")
        md.append("")
    if data.get("prefill_moe"):
        md += ["## One MoE layer at prefill sizes, eager (ms)", "",
               "| tokens | " + " | ".join(k for k in data["prefill_moe"][0] if k != "tokens") + " |",
               "|---" * len(data["prefill_moe"][0]) + "|"]
        for r in data["prefill_moe"]:
            md.append("| " + " | ".join(_f(v) for v in r.values()) + " |")
        md.append("")
    if data.get("prefill_default_tiles"):
        default = {(r["kind"], r["tokens"], r["cuda_graph"], r["tau"]): r for r in data["prefill_default_tiles"]}
        md += ["## Fused-MoE tiles: the H200 table vs default tiles, CUDA-graph steps", "",
               "`default`: the same stage one call earlier, before the table reached the engine.", "",
               "| kind | tokens | tau | default tiles ms | H200 table ms | table / default |", "|---|---|---|---|---|---|"]
        for r in data["prefill"]:
            d = default.get((r["kind"], r["tokens"], r["cuda_graph"], r["tau"]))
            if r["cuda_graph"] and d:
                md.append(f"| {r['kind']} | {r['tokens']} | {r['tau']} | {d['step_ms']:.2f} | {r['step_ms']:.2f} | "
                          f"{r['step_ms'] / d['step_ms']:.3f} |")
        md.append("")
    for key in sorted(k for k in data if k.startswith("profile_")):
        prof = data[key]
        what = (f"decode step, batch {prof['batch']}, context {prof['ctx']}" if "batch" in prof else
                f"step `{prof['tag']}`: {prof['tokens']} tokens, {prof['seqs']} sequences, tau {prof['tau']}")
        md += [f"## Kernel time per {what}, "
               f"{'CUDA graph' if prof.get('cuda_graph', True) else 'eager'} (torch.profiler, top 12)", "",
               f"Kernels in all: {prof['total_device_us_per_step'] / 1e3:.2f} ms per step"
               + (f"; wall {prof['profiled_wall_ms_per_step']:.2f} ms per profiled step" if "profiled_wall_ms_per_step" in prof else "")
               + ".", "", "| kernel | calls / step | us / step |", "|---|---|---|"]
        for r in prof["kernels"][:12]:
            md.append(f"| `{r['name'][:70]}` | {r['calls']} | {r['device_us_per_step']:.0f} |")
        md.append("")
    if data.get("offline"):
        o = data["offline"]
        md += ["## Offline throughput vs transformers `generate`", "",
               f"{o['n_prompts']} prompts of {o['prompt_len']} random tokens, {o['out_len']} greedy output tokens each, "
               "same weights (ours copied from the transformers model), bf16, same GPU, one call each after a warm-up.", "",
               "| engine | seconds | output tok/s |", "|---|---|---|",
               f"| transformers `generate` | {o['transformers_s']:.2f} | {o['transformers_tok_s']:.0f} |",
               f"| brownout-serve `LLM.generate` | {o['ours_s']:.2f} | {o['ours_tok_s']:.0f} |", "",
               f"Speed-up {o['speedup']:.2f}x. First 16 greedy tokens identical for {o['first16_tokens_equal']} "
               "prompts (random bf16 weights give near-tied logits; the two implementations round differently).", ""]
    if data.get("gpu_tests"):
        md += [f"GPU tests in the same run: {data['gpu_tests']}.", ""]
    (ENGINE / f"{name}.md").write_text("\n".join(md))


def headline(name: str) -> None:
    data = json.loads((HEADLINE / f"{name}.json").read_text())
    cal = data["calibration"]
    lines = [f"# {name}", "", f"Workload: `{data['workload']}`", ""]
    if data.get("server_flags"):
        lines += ["Server (every policy): `" + " ".join(data["server_flags"]) + "`", ""]
    lines += [
             "Calibration (brownout off): " + ", ".join(f"{k} {_f(v, 4)}" for k, v in cal.items()), "",
             "| policy | violation windows | fraction | reduction vs off | goodput req/s | burst goodput req/s "
             "| burst goodput vs off | tok/s | P90 TTFT s | P90 TPOT s | mean tau | refused (429) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['label']} | {r['violations']} | {_f(r['violation_fraction'])} | {_f(r['reduction'])} | "
                     f"{_f(r['goodput_req_s'])} | {_f(r['burst_goodput_req_s'])} | {_f(r['burst_goodput_vs_off'])} | "
                     f"{_f(r['throughput_tok_s'], 0)} | {_f(r['p90_ttft_s'])} | {_f(r['p90_tpot_s'], 4)} | "
                     f"{_f(r['mean_tau'])} | {r.get('rejected', '-')} |")
    if data.get("sweep"):
        lines += ["", "Rate sweep (the trace replayed sped up to each fraction of the calibrated capacity):", "",
                  "| policy | load fraction | offered req/s | P90 TTFT s | P90 TPOT s | goodput req/s | mean tau | meets SLO |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in data["sweep"]:
            lines.append(f"| {r['policy']} | {r['load_fraction']} | {_f(r['offered_req_s'])} | {_f(r['p90_ttft_s'])} | "
                         f"{_f(r['p90_tpot_s'], 4)} | {_f(r['goodput_req_s'])} | {_f(r['mean_tau'])} | {r['meets_slo']} |")
    if data.get("note"):
        lines += ["", data["note"]]
    steps = HEADLINE / f"{name}_steps.json"
    if steps.is_file():
        lines += ["", "Engine time by step phase (`benchmarks/headline_steps.py`, from the /metrics scrapes):", "",
                  "| run | prefill steps | mean prefill step ms | share of busy time | decode steps | mean decode step ms "
                  "| burst: engine busy | burst: host ms between steps | burst: mean prefill / decode step ms "
                  "| burst: mean scraped tau prefill / decode |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run, v in json.loads(steps.read_text()).items():
            p, d, b = v["summary"]["prefill"], v["summary"]["decode"], v.get("burst") or {}
            busy = f"{100 * b['busy_fraction']:.0f}%" if b else "-"
            lines.append(f"| {run} | {p['steps']:.0f} | {_f(p['mean_ms'], 1)} | {100 * p['share_of_busy']:.0f}% | "
                         f"{d['steps']:.0f} | {_f(d['mean_ms'], 1)} | {busy} | {_f(b.get('host_ms_between_steps'), 1)} | "
                         f"{_f(b.get('prefill_mean_ms'), 1)} / {_f(b.get('decode_mean_ms'), 1)} | "
                         f"{_f(b.get('tau_prefill_mean'), 2)} / {_f(b.get('tau_decode_mean'), 2)} |")
        step_runs = {run: v["step_violation_windows"] for run, v in json.loads(steps.read_text()).items()
                     if "step_violation_windows" in v}
        if step_runs:
            base = len(step_runs.get("off", [])) or None
            lines += ["", "Step-latency violation windows, the paper's definition (1-s windows where more than 10% of "
                      "one phase's steps exceed that phase's step SLO, i.e. P90 step latency over it; step SLOs "
                      "from the calibration above). The user-facing TTFT / TPOT windows of the first table are "
                      "the stricter measure:", "",
                      "| policy | step windows | reduction vs off | seconds |", "|---|---|---|---|"]
            for run, w in sorted(step_runs.items(), key=lambda kv: kv[0] != "off"):
                red = "-" if run == "off" or not base else f"{1 - len(w) / base:.3f}"
                lines.append(f"| {run} | {len(w)} | {red} | {', '.join(map(str, w)) or '-'} |")
        lines += timeline(json.loads(steps.read_text()))
    (HEADLINE / f"{name}.md").write_text("\n".join(lines) + "\n")


def kernels(name: str) -> None:
    """Fused-MoE tile sweep of `bench_kernels.py` (kernels/NAME.json)."""
    data = json.loads((KERNELS / f"{name}.json").read_text())
    md = [f"# Fused MoE kernel: {name}", "", f"{data['device']}, torch {data['torch']}, triton {data['triton']}, "
          f"{data['dtype']}; copy bandwidth {data['copy_bw_gbs']:.0f} GB/s measured in the run. Command: "
          f"`{data['command']}`. " + data.get("note", ""), "",
          "| scenario | tokens | slots touched | bytes roofline us | tuned us | tuned / roofline | default us "
          "| tuned / default | TFLOP/s (tuned) | tuned tiles (gate/up) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["moe"]["rows"] if "moe" in data else []:
        c = r["config"]
        tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
        md.append(f"| {r['scenario']} | {r['tokens']} | {r['slots_touched']:.1f} | {r['roofline_us']:.1f} | "
                  f"{r['tuned_us']:.1f} | {r['ratio']:.2f} | {r['default_us']:.1f} | {r['tuned_us'] / r['default_us']:.3f} | "
                  f"{_f(r.get('tflops_achieved'), 0)} | {tiles} |")
    if "moe_crowded" in data:
        md[-2:] = ["| tokens | rows per busy slot | slots touched | bytes roofline us | tuned us | tuned / roofline "
                   "| default us | tuned / default | TFLOP/s (tuned) | tuned tiles (gate/up) |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["moe_crowded"]["rows"]:
            c = r["config"]
            tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
            md.append(f"| {r['tokens']} | {r['rows_per_busy_slot']:.0f} | {r['slots_touched']:.1f} | "
                      f"{r['roofline_us']:.1f} | {r['tuned_us']:.1f} | {r['ratio']:.2f} | {r['default_us']:.1f} | "
                      f"{r['tuned_us'] / r['default_us']:.3f} | {_f(r.get('tflops_achieved'), 0)} | {tiles} |")
    if "moe_folded" in data:
        md[-2:] = ["| tokens | slots touched | bytes roofline us | tuned us | tuned / roofline | before us "
                   "| tuned / before | tuned tiles (gate/up; down) |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(data["moe_folded"]["rows"], key=lambda r: r["tokens"]):
            c = r["config"]
            dn = {**c, **c.get("down", {})}
            tiles = (f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}; "
                     f"{dn['BLOCK_N']}x{dn['BLOCK_K']} s{dn['num_stages']}")
            md.append(f"| {r['tokens']} | {r['slots_touched']:.1f} | {r['roofline_us']:.1f} | {r['tuned_us']:.1f} | "
                      f"{r['ratio']:.2f} | {r['before_us']:.1f} | {r['tuned_us'] / r['before_us']:.3f} | {tiles} |")
    (KERNELS / f"{name}.md").write_text("\n".join(md) + "\n")


def timeline(steps: dict, policies=("off", "aimd", "predictive")) -> list[str]:
    """Queue and tau of each policy run, one row per step window (about 3 s)."""
    runs = [p for p in policies if p in steps]
    if not runs:
        return []
    lines = ["", "Queue and tau over the run (3-scrape rows of the same file; waiting requests, "
             "tau_prefill / tau_decode):", "",
             "| t s | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for i, row in enumerate(steps[runs[0]]["windows"]):
        cells = []
        for p in runs:
            w = steps[p]["windows"]
            if i >= len(w):
                cells.append("-")
                continue
            cells.append(f"{w[i]['waiting']:.0f} waiting, {w[i]['tau_prefill']:.2f} / {w[i]['tau_decode']:.2f}")
        lines.append(f"| {row['t']:.0f} | " + " | ".join(cells) + " |")
    return lines


def collect_demo(demo_dir: Path, machine: str, name: str = "demo_cpu") -> None:
    """demo/NAME.json from the output directory of `brownout demo`, and its compact raw data."""
    out = {"machine": machine, "command": "brownout demo --out demo-out --no-progress", "parts": {}}
    for part in sorted(p.name for p in demo_dir.iterdir() if (p / "comparison.json").is_file()):
        meta = json.loads((demo_dir / part / "off" / "meta.json").read_text())
        out["parts"][part] = {"calibration": json.loads((demo_dir / part / "calibration.json").read_text()),
                              "workload": meta["workload"],
                              "comparison": json.loads((demo_dir / part / "comparison.json").read_text())}
    (DEMO / f"{name}.json").write_text(json.dumps(out, indent=1))
    compact_tree(demo_dir, DEMO / "raw" / name)


def demo_cpu(name: str = "demo_cpu") -> None:
    data = json.loads((DEMO / f"{name}.json").read_text())
    md = ["# The main job on the CPU (`brownout demo`)", "",
          f"Machine: {data['machine']}. Command: `{data['command']}`; raw per-request logs, metrics "
          f"scrapes and reports in `raw/{name}/`. Timings on a CPU say nothing of GPU "
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
    (DEMO / f"{name}.md").write_text("\n".join(md))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--demo-name", default="demo_cpu", help="demo/NAME.json for --demo-dir")
    ap.add_argument("--machine", default="development box: 2-core x86-64 VM, no GPU, CPU-only torch "
                                         "2.13.0 (busy with other jobs at times)")
    args = ap.parse_args()
    if args.demo_dir:
        collect_demo(args.demo_dir, args.machine, args.demo_name)
    for p in sorted(ENGINE.glob("engine_*.json")):
        engine(p.stem)
    for p in sorted(KERNELS.glob("kernels_h200*.json")):
        kernels(p.stem)
    for p in sorted(HEADLINE.glob("headline_*.json")):
        if not p.stem.endswith("_steps"):
            headline(p.stem)
    for p in sorted(DEMO.glob("demo_*.json")):
        demo_cpu(p.stem)
