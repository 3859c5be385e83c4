"""`brownout demo`: the main job. A simulated GPU headline, then a bursty-load comparison
on the embedded demo model.

0. Simulate the H200 headline (`brownout simulate`, from the committed H200 step-cost
   profile): off / aimd / predictive under a 60-s conversation load with a 2x burst from
   20 s to 40 s, with the headline's SLOs and server flags. It replays the Azure
   conversation trace when ../shared/data has it (or --trace names it), else Poisson
   arrivals at the trace window's rates with its mean prompt and output lengths. It prints
   a table that fits 80 columns and one conclusion drawn from the numbers, labelled as
   simulation throughout.
1. Calibrate to this machine: measure the unloaded latency, and the TPOT of full batches
   with brownout off and at tau = 0; the TPOT SLO sits between the two (met with brownout,
   missed without), the base rate is a fraction of the measured throughput, so the effect
   shows the same way on a laptop or a 2-core CI box.
2. Run one step-burst workload (base rate, then `factor` times more for a while, then
   back) against the server with brownout off, with the paper's `aimd` controller and with
   the `predictive` controller, each on a fresh server with the way-4 united experts.
3. Print the side-by-side table and write reports and plots under --out.
By default the real run is on random weights of the `cpu-moe` preset, whose experts are too
large for a CPU's caches, so a step's time is bound by expert reads as on a GPU and brownout's
effect on the SLOs shows; `--parts embedded,cpu-moe` adds the embedded demo model first (its
accuracy cost is real, but on a CPU its experts sit in cache, so brownout saves little time
there).
The controller checks every second over a 2 s window (the paper: every 5 s) because the
whole demo lasts a few minutes; the flags are the same a production server takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from brownout.bench.cli import run_bench
from brownout.bench.experiment import ServerConfig, run_configs, server_process
from brownout.bench.html_report import write_html_report
from brownout.bench.report import load_eval_table
from brownout.cliutil import resolve_model, resolve_united
from brownout.control.prices import PRICE_FILE
from brownout.defaults import ASSETS, default_model_dir, default_united_dir
from brownout.types import ValidationError

log = logging.getLogger(__name__)

OUTPUT_TOKENS = 24  # per request; with synthetic prompts of ~48 tokens
MAX_NUM_SEQS = 16
# one real part keeps the main job within 5 minutes on 2 cores; cpu-moe is the one whose
# steps, like a GPU's, are bound by expert reads, so the controller's effect shows
DEFAULT_PARTS = "cpu-moe"
PART_PRESETS = {"embedded": None, "cpu-moe": "cpu-moe"}
PROMPTS = "synthetic:prompt_len=48"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or a directory holding one in model/ (default: the "
                        "embedded demo model)")
    p.add_argument("--united-experts", default=None,
                   help="united experts (default: the embedded way-4 set of the demo model)")
    p.add_argument("--dummy-preset", default=None, metavar="NAME",
                   help="run only on random weights of this preset (default: the embedded model, then "
                        "cpu-moe, whose experts are too large for a CPU's caches, so brownout's saving "
                        "of expert reads shows on a CPU too; its accuracy is meaningless)")
    p.add_argument("--parts", default=DEFAULT_PARTS,
                   help="real CPU runs after the simulation, comma-separated: 'cpu-moe' (random "
                        "weights whose expert reads bound a CPU step, so brownout's effect on the "
                        "SLOs shows) and/or 'embedded' (the demo model: real accuracy prices, but its "
                        "experts fit a CPU's caches, so dimming saves little time there)")
    p.add_argument("--duration", type=float, default=27.0,
                   help="seconds of load per run (the burst is its middle third)")
    p.add_argument("--burst-factor", type=float, default=2.5,
                   help="rate multiplier during the burst (requests/s over the base rate's)")
    p.add_argument("--base-load", type=float, default=0.35,
                   help="base rate (requests/s) as a fraction of the measured capacity with brownout off; with "
                        "the default burst the load peaks near full batches, where brownout's "
                        "cheaper steps decide whether TPOT meets its SLO")
    p.add_argument("--slo-policy", dest="policies", default="off,aimd,predictive",
                   help="SLO policies to compare, comma-separated, each on a fresh server")
    p.add_argument("--policies", dest="policies", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # former name
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the servers run")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bars")
    p.add_argument("--trace", default=None,
                   help="Azure conversation trace CSV for the simulated headline (default: "
                        "../shared/data/traces/azure_llm_2023_conv.csv when present)")
    p.add_argument("--no-simulation", action="store_true", help="skip the simulated H200 headline")
    p.add_argument("--simulation-only", action="store_true", help="only the simulated H200 headline")


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
    if args.model is not None and args.dummy_preset is None:
        args.model = resolve_model(args.model)
    if args.united_experts is not None:  # checked here, not first in a server's log
        resolve_united(args.united_experts, args.model or default_model_dir())
    if not args.no_simulation:
        simulated_headline(args, out / "simulated-h200")
        if args.simulation_only:
            return 0
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PART_PRESETS))
    if unknown or not names:
        raise ValidationError("--parts", f"expected a comma-separated subset of "
                                         f"{', '.join(PART_PRESETS)}, got {args.parts!r}")
    parts = [(n, PART_PRESETS[n]) for n in names]
    if args.model:
        parts = [("embedded", None)]
    if args.dummy_preset:
        parts = [(args.dummy_preset, args.dummy_preset)]
    for name, preset in parts:
        part_args = argparse.Namespace(**{**vars(args), "dummy_preset": preset})
        result, workload, cal = run_part(part_args, out / name)
        title = ("the embedded demo model" if preset is None else
                 f"dummy '{preset}' weights: expert reads bound its steps, accuracy is meaningless")
        table = _eval_table() if preset is None else None
        _print_table(result, f"{title}\n{workload}",
                     load_eval_table(table)[-1][1] if table else None)
        speed = cal["full_batch_tpot_s"] / cal["full_batch_tpot_tau0_s"]
        Console().print(f"full-batch TPOT: {cal['full_batch_tpot_s'] * 1e3:.1f} ms at tau 1, "
              f"{cal['full_batch_tpot_tau0_s'] * 1e3:.1f} ms at tau 0 ({speed:.2f}x); "
              f"reports and plots: {out / name}/")
    write_html_report(out, "brownout demo")  # every part's charts in one offline page
    return 0


# -- the simulated H200 headline ----------------------------------------------------------
# the GPU headline's server flags and calibrated SLOs, so the simulation replays its setup
SIM_FLAGS = ["--max-num-seqs", "128", "--max-num-batched-tokens", "1024", "--max-model-len", "4096",
             "--max-waiting-requests", "1024", "--admission-ttft-factor", "1.0",
             "--slo-ttft", "0.1054", "--slo-tpot", "0.0199", "--slo-decode-step", "0.0134",
             "--slo-prefill-step", "0.0242", "--slo-window", "2", "--slo-check-interval", "1"]
SIM_TRACE_WINDOW = ("start=600.0,speedup=2.7206,duration=60.0,max_prompt=1024,max_output=1024,"
                    "burst=2.0,burst_at=20.0,burst_until=40.0")
# without the trace: its window's base arrival rate (req/s), doubled from 20 s to 40 s, and its
# mean prompt and output lengths (tokens)
SIM_STAND_IN = "step:rate=14.3,factor=2,at=20,until=40,duration=60"
SIM_STAND_IN_PROMPTS = "synthetic:prompt_len=1008,output_len=247"
DEFAULT_TRACE = Path("../shared/data/traces/azure_llm_2023_conv.csv")
# two runs differ by more than this many violation windows before the demo calls it a difference
# (the spread of the simulated headline over seeds and of the GPU runs it reproduces)
NOISE_WINDOWS = 2
# the demo's printed tables and text fit a terminal of 80 columns
TABLE_WIDTH = 78


def simulated_headline(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run `brownout simulate` on the headline's load and print its table and conclusion."""
    trace = Path(args.trace) if args.trace else DEFAULT_TRACE
    if trace.is_file():
        workload, prompts, what = f"trace:path={trace},{SIM_TRACE_WINDOW}", "synthetic", \
            "the Azure conversation trace, 60 s at 70% of capacity, 2x from 20 s to 40 s"
    else:
        workload, prompts, what = SIM_STAND_IN, SIM_STAND_IN_PROMPTS, \
            "Poisson stand-in for the conversation trace (absent here), 2x from 20 s to 40 s"
    Console().print(f"[bold]Part 1: SIMULATED H200 headline[/bold] (committed H200 step-cost "
                    f"profile; no GPU used): {what}")
    cmd = [sys.executable, "-m", "brownout.cli", "simulate", "--workload", workload,
           "--prompts", prompts, "--slo-policy", SIM_POLICIES, "--out", str(out), *SIM_FLAGS,
           "--prices", str(demo_price_file())]
    subprocess.run(cmd, check=True)  # a separate process: it prints each policy as it ends
    result = json.loads((out / "comparison.json").read_text())
    lines = sim_table(result["rows"]) + textwrap.wrap(sim_conclusion(result["rows"]), TABLE_WIDTH)
    for line in lines:
        Console().print(line, soft_wrap=True, highlight=False, markup=False)
    Console().print(f"simulated reports and plots: {out}/")
    return result


# the simulated headline compares brownout off, the two tau controllers and the full ladder
SIM_POLICIES = "off,aimd,predictive,ladder"
SIM_COLUMNS = ("policy    windows  vs off  goodput/s  refused  P90 TTFT  P90 TPOT tau  acc.",
               "", "(SIMULATED; windows: 1-s windows whose P90 TTFT or TPOT missed its SLO;",
               " goodput: requests/s meeting both SLOs; refused: 429s of TTFT admission;",
               " tau: time-weighted brownout threshold, 1 = exact model; acc.: accuracy",
               " spent, the time-weighted perplexity increase of the rungs used, at the",
               " embedded model's prices)")


def demo_price_file() -> Path:
    """The embedded model's measured rung prices (ladder-prices.json beside its checkpoint)."""
    return Path(default_model_dir()).parent / PRICE_FILE


def sim_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [SIM_COLUMNS[0]]
    for r in rows:
        red = "-" if r["reduction"] is None else f"{100 * r['reduction']:.0f}%"
        spent = r.get("accuracy_spent")
        acc = "-" if spent is None else f"+{100 * spent:.0f}%"
        lines.append(f"{r['label']:<10}{r['violations']:>5}  {red:>6}  {r['goodput_req_s']:>9.1f}"
                     f"  {r['rejected']:>7}  {1e3 * r['p90_ttft_s']:>5.0f} ms  "
                     f"{1e3 * r['p90_tpot_s']:>5.1f} ms  {r['mean_tau']:.2f}  {acc:>4}")
    return lines + list(SIM_COLUMNS[2:])


def sim_conclusion(rows: list[dict[str, Any]]) -> str:
    """One sentence that follows from the simulated numbers."""
    return conclusion(rows, simulated=True)


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
    """The way-4 set's quoted price table, only where it was measured on the model's own kinds
    of text away from its calibration; a table from other text (e.g. WikiText, which the demo
    model never saw and where dimming can even lower perplexity) would mislead, so none."""
    path = ASSETS / "demo" / "perplexity-way4.json"
    if not path.is_file():
        return None
    if "quoted" not in json.loads(path.read_text()):
        log.info("%s holds no quoted in-domain price: the demo shows no accuracy column", path)
        return None
    return path


# a run that stays this close to tau 1 (time-weighted) used brownout too little to credit it
# with any difference in windows
UNDIMMED_TAU = 0.98


def run_table(rows: list[dict[str, Any]], price_at_tau1: Optional[float]) -> list[str]:
    """The real run's table in 80 columns, with its legend."""
    accuracy = price_at_tau1 is not None
    head = "policy    windows  vs off  goodput/s  refused  P90 TTFT  P90 TPOT  tau"
    lines = [head + ("   ppl" if accuracy else "")]
    for r in rows:
        red = "-" if r["reduction"] is None else f"{100 * r['reduction']:.0f}%"
        line = (f"{r['label']:<10}{r['violations']:>5}  {red:>6}  {r['goodput_req_s']:>9.2f}"
                f"  {r['rejected']:>7}  {_ms(r['p90_ttft_s']):>8}  {_ms(r['p90_tpot_s']):>8}"
                f"  {_fmt(r['mean_tau'], 2):>4}")
        if accuracy:
            ppl = r.get("perplexity")
            pct = "-" if ppl is None else f"{100 * (ppl / price_at_tau1 - 1):+.0f}%"
            line += f"  {pct:>4}"
        lines.append(line)
    lines += ["", "(windows: 1-s windows whose P90 TTFT or TPOT missed its SLO; goodput:",
              " requests/s meeting both SLOs; refused: 429s; tau: time-weighted brownout",
              " threshold, 1 = exact model" + (";" if accuracy else ")")]
    if accuracy:
        lines += [" ppl: perplexity increase at the mean tau, measured on held-out text of",
                  " the model's own kinds)"]
    return lines


def conclusion(rows: list[dict[str, Any]], simulated: bool) -> str:
    """One sentence that follows from the numbers; 'no difference beyond noise' when that is
    the truth, including when the controller barely dimmed."""
    tag = "Conclusion (simulated)" if simulated else "Conclusion"
    by = {r["label"]: r for r in rows}
    off = by.get("off")
    best = min((r for r in rows if r["label"] != "off"), key=lambda r: r["violations"], default=None)
    if off is None or best is None:
        return f"{tag}: nothing to compare."
    diff = off["violations"] - best["violations"]
    tau = best["mean_tau"]
    if abs(diff) <= NOISE_WINDOWS:
        return (f"{tag}: no difference beyond noise between off and "
                f"{best['label']} ({off['violations']} vs {best['violations']} windows).")
    if tau is not None and tau >= UNDIMMED_TAU:
        return (f"{tag}: {best['label']} barely dimmed (mean tau {tau:.2f}), so the gap to off "
                f"({best['violations']} vs {off['violations']} windows) is noise, not brownout.")
    verb = "fewer" if diff > 0 else "more"
    return (f"{tag}: {best['label']} had {abs(diff)} {verb} violation windows "
            f"than off ({best['violations']} vs {off['violations']}) at mean tau "
            f"{_fmt(tau, 2)}, refusing {best['rejected']} requests to off's {off['rejected']}.")


def _print_table(result: dict[str, Any], title: str, price_at_tau1: Optional[float]) -> None:
    lines = [*title.splitlines(), ""] + run_table(result["rows"], price_at_tau1) + [""]
    lines += textwrap.wrap(conclusion(result["rows"], simulated=False), TABLE_WIDTH)
    for line in lines:
        Console().print(line, soft_wrap=True, highlight=False, markup=False)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{1e3 * v:.0f} ms" if v >= 0.1 else f"{1e3 * v:.1f} ms"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
