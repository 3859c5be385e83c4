"""`brownout demo`: the main job. A bursty-load comparison on the embedded demo model.

1. Calibrate to this machine: measure the unloaded latency, and the TPOT of full batches
   with brownout off and at tau = 0; the TPOT SLO sits between the two (met with brownout,
   missed without), the base rate is a fraction of the measured throughput, so the effect
   shows the same way on a laptop or a 2-core CI box.
2. Run one step-burst workload (base rate, then `factor` times more for a while, then
   back) against the server with brownout off, with the paper's `aimd` controller and with
   the `predictive` controller, each on a fresh server with the way-4 united experts.
3. Print the side-by-side table and write reports and plots under --out.
Both parts run by default: first the embedded demo model (its accuracy cost is real, but on a
CPU its experts sit in cache, so brownout saves little time there), then random weights of
the `cpu-moe` preset, whose experts are too large for a CPU's caches, so a step's time is
bound by expert reads as on a GPU and brownout's effect on the SLOs shows.
The controller checks every second over a 2 s window (the paper: every 5 s) because the
whole demo lasts a few minutes; the flags are the same a production server takes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from brownout.bench.cli import run_bench
from brownout.bench.experiment import ServerConfig, run_configs, server_process
from brownout.bench.html_report import write_html_report
from brownout.defaults import ASSETS, default_model_dir, default_united_dir

log = logging.getLogger(__name__)

OUTPUT_TOKENS = 24  # per request; with synthetic prompts of ~48 tokens
MAX_NUM_SEQS = 16
PROMPTS = "synthetic:prompt_len=48"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded demo model)")
    p.add_argument("--united-experts", default=None,
                   help="united experts (default: the embedded way-4 set of the demo model)")
    p.add_argument("--dummy-preset", default=None, metavar="NAME",
                   help="run only on random weights of this preset (default: the embedded model, then "
                        "cpu-moe, whose experts are too large for a CPU's caches, so brownout's saving "
                        "of expert reads shows on a CPU too; its accuracy is meaningless)")
    p.add_argument("--duration", type=float, default=27.0,
                   help="seconds of load per run (the burst is its middle third)")
    p.add_argument("--burst-factor", type=float, default=2.5, help="rate multiplier during the burst")
    p.add_argument("--base-load", type=float, default=0.35,
                   help="base rate as a fraction of the measured capacity with brownout off; with "
                        "the default burst the load peaks near full batches, where brownout's "
                        "cheaper steps decide whether TPOT meets its SLO")
    p.add_argument("--policies", default="off,aimd,predictive")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--no-progress", action="store_true")


def _base_flags(args) -> list[str]:
    if args.dummy_preset:
        return ["--load-format", "dummy", "--model", args.dummy_preset, "--tokenizer", default_model_dir(),
                "--device", args.device, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", "256",
                "--united-experts", args.united_experts or "average:4"]
    model = args.model or default_model_dir()
    # the shipped calibrated set, else uncalibrated averages built at load time
    united = args.united_experts or (default_united_dir(4) if args.model is None else None) or "average:4"
    flags = ["--model", model, "--device", args.device, "--max-num-seqs", str(MAX_NUM_SEQS),
             "--max-waiting-requests", "256"]
    if united:
        flags += ["--united-experts", united]
    return flags


def calibrate(args, out: Path, flags: list[str]) -> dict[str, Any]:
    """Unloaded latency, and TPOT with full batches with brownout off and at tau = 0."""
    progress = not args.no_progress
    quiet = dict(slo_ttft=None, slo_tpot=None, progress=progress, plots=False, max_tokens=OUTPUT_TOKENS)
    # three full batches at once: served throughput and TPOT at saturation, in bounded time
    burst = f"constant:rate=1000,duration=1,max_requests={3 * MAX_NUM_SEQS}"
    with server_process(flags + ["--slo-policy", "off"], out / "server-calibration.log") as url:
        idle = run_bench(url, "constant:rate=1,duration=4", PROMPTS, out / "calib-idle", **quiet)
        busy = run_bench(url, burst, PROMPTS, out / "calib-busy", **quiet)
    with server_process(flags + ["--fixed-tau", "0"], out / "server-calibration-tau0.log") as url:
        dimmed = run_bench(url, burst, PROMPTS, out / "calib-busy-tau0", **quiet)
    tpot_full, tpot_dimmed = busy["latency"]["tpot"]["p50"], dimmed["latency"]["tpot"]["p50"]
    if tpot_dimmed < tpot_full:
        tpot_slo = (tpot_full + tpot_dimmed) / 2  # met with brownout at full batch, not without
    else:
        log.warning("brownout does not make full-batch steps faster on this machine "
                    "(TPOT %.1f ms at tau 0 vs %.1f ms at tau 1)", tpot_dimmed * 1e3, tpot_full * 1e3)
        tpot_slo = 0.95 * tpot_full
    capacity_req_s = busy["throughput_tok_s"] / OUTPUT_TOKENS
    ttft0 = idle["latency"]["ttft"]["p50"]
    cal = dict(unloaded_tpot_s=idle["latency"]["tpot"]["p50"], unloaded_ttft_s=ttft0,
               full_batch_tpot_s=tpot_full, full_batch_tpot_tau0_s=tpot_dimmed,
               capacity_req_s=capacity_req_s, slo_tpot_s=round(tpot_slo, 4),
               slo_ttft_s=round(max(1.0, 20 * ttft0), 3), slo_decode_step_s=round(tpot_slo, 4),
               slo_prefill_step_s=round(3 * tpot_slo, 4),
               base_rate=round(args.base_load * capacity_req_s, 3))
    (out / "calibration.json").write_text(json.dumps(cal, indent=2))
    return cal


def policy_flags(policy: str, cal: dict[str, Any]) -> list[str]:
    return ["--slo-policy", policy, "--slo-ttft", str(cal["slo_ttft_s"]),
            "--slo-tpot", str(cal["slo_tpot_s"]), "--slo-decode-step", str(cal["slo_decode_step_s"]),
            "--slo-prefill-step", str(cal["slo_prefill_step_s"]), "--slo-window", "2",
            "--slo-check-interval", "1"]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    parts = [("embedded", None)] if args.model or args.dummy_preset is not None else \
        [("embedded", None), ("cpu-moe", "cpu-moe")]
    if args.dummy_preset:
        parts = [(args.dummy_preset, args.dummy_preset)]
    for name, preset in parts:
        part_args = argparse.Namespace(**{**vars(args), "dummy_preset": preset})
        result, workload, cal = run_part(part_args, out / name)
        title = ("the embedded demo model" if preset is None else
                 f"dummy '{preset}' weights: expert reads bound its steps, accuracy is meaningless")
        _print_table(result, f"{title}\n{workload}")
        speed = cal["full_batch_tpot_s"] / cal["full_batch_tpot_tau0_s"]
        Console().print(f"full-batch TPOT: {cal['full_batch_tpot_s'] * 1e3:.1f} ms at tau 1, "
              f"{cal['full_batch_tpot_tau0_s'] * 1e3:.1f} ms at tau 0 ({speed:.2f}x); "
              f"reports and plots: {out / name}/")
    write_html_report(out, "brownout demo")  # every part's charts in one offline page
    return 0


def run_part(args: argparse.Namespace, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    flags = _base_flags(args)
    cal = calibrate(args, out, flags)
    log.info("calibrated: capacity %.2f req/s, SLO TPOT %.0f ms, TTFT %.2f s, base rate %.2f req/s",
             cal["capacity_req_s"], cal["slo_tpot_s"] * 1e3, cal["slo_ttft_s"], cal["base_rate"])
    d = args.duration
    workload = (f"step:rate={cal['base_rate']},factor={args.burst_factor},at={d / 3:.1f},"
                f"until={2 * d / 3:.1f},duration={d}")
    configs = [ServerConfig(p, flags + policy_flags(p, cal)) for p in args.policies.split(",")]
    result = run_configs(configs, workload, out, prompts=PROMPTS,
                         slo_ttft=cal["slo_ttft_s"], slo_tpot=cal["slo_tpot_s"],
                         eval_table=None if args.dummy_preset else _eval_table(),
                         progress=not args.no_progress,
                         bench_kw=dict(max_tokens=OUTPUT_TOKENS))
    return result, workload, cal


def _eval_table() -> Optional[Path]:
    path = ASSETS / "demo" / "perplexity-way4.json"
    return path if path.is_file() else None


def _print_table(result: dict[str, Any], workload: str) -> None:
    from rich.table import Table

    table = Table(title=f"brownout demo: {workload}")
    cols = [("label", "policy"), ("violations", "viol. windows"), ("reduction", "vs off"),
            ("goodput_req_s", "goodput/s"), ("throughput_tok_s", "tok/s"), ("p90_ttft_s", "P90 TTFT"),
            ("p90_tpot_s", "P90 TPOT"), ("mean_tau", "mean tau"), ("perplexity", "ppl")]
    for _, name in cols:
        table.add_column(name, justify="right")
    for row in result["rows"]:
        table.add_row(*[_fmt(row.get(k)) for k, _ in cols])
    Console().print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
