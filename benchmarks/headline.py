"""Headline experiment: SLOs under a burst of real arrivals, brownout off vs aimd vs predictive.

Server: dummy Qwen1.5-MoE-A2.7B weights (random, bf16) with uncalibrated way-4 united
experts (`average:4`), the demo model's tokenizer for text prompts, one GPU. Client: the
bench client over loopback on the same machine. Steps:
  1. calibrate with brownout off: unloaded latency, served throughput under overload
     (capacity), then a probe at the base load; the SLOs are a margin (1.5x) over the P90
     TTFT/TPOT and the mean step latencies at the base load, as an operator would set them
     (they hold in normal operation, a burst breaks them);
  2. a window of the Azure LLM 2023 conversation trace, sped up so its base load is about
     70% of the measured capacity, with the trace playing 2x faster in the middle third
     (a 2x step burst of real arrivals); one run per policy, each on a fresh server;
  3. a rate sweep (the same trace replayed sped up to each fraction of the capacity) with
     brownout off and predictive: the largest rate whose P90 TTFT and P90 TPOT meet the SLOs.
Run: python benchmarks/headline.py --out $OUT  (needs fastapi/uvicorn installed)
At the end the output directory is compacted in place (`compact_raw.py`: gzipped request
records without per-token times, gzipped metrics scrapes and logs), which is the form
committed as benchmarks/results/headline/raw/<name>/; its headline.json becomes
benchmarks/results/headline/<name>.json (see benchmarks/results/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from compact_raw import compact_tree

from brownout.bench.cli import run_bench
from brownout.bench.experiment import ServerConfig, run_configs, server_process
from brownout.bench.report import load_run, meets_slo, request_latencies
from brownout.bench.workloads import read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / ".." / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
TOKENIZER = ROOT / "brownout" / "assets" / "demo" / "model"
log = logging.getLogger("headline")


def base_flags(args) -> list[str]:
    model = ["--model", args.model] if args.model else \
        ["--load-format", "dummy", "--model", "qwen1.5-moe-a2.7b", "--tokenizer", str(TOKENIZER)]
    return [*model, "--united-experts", "average:4", "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", "4096",
            "--max-waiting-requests", "1024"] + \
        (["--gpu-memory-utilization", "0.9"] if args.device == "cuda" else []) + \
        (["--admission-ttft-factor", str(args.admission_ttft_factor)] if args.admission_ttft_factor else []) + \
        (["--rung-prices", str(args.rung_prices)] if args.rung_prices else [])


def trace_spec(args, speedup: float, duration: float, extra: str = "") -> str:
    return (f"trace:path={args.trace},start={args.trace_start},speedup={speedup:.4f},"
            f"duration={duration},max_prompt={args.max_prompt},max_output={args.max_output}{extra}")


def read_trace_rate(path: Path, t0: float, t1: float) -> float:
    """Requests per trace second in [t0, t1)."""
    return sum(t0 <= t < t1 for t, _, _ in read_trace(path)) / (t1 - t0)


def step_means(metrics: list[dict]) -> dict:
    """Mean engine step latency by phase over a run, from the server's scraped counters."""
    first, last = metrics[0]["brownout"], metrics[-1]["brownout"]
    out = {}
    for phase in ("prefill", "decode"):
        key = f"brownout_step_latency_seconds_{{}},phase={phase}"
        n = last[key.format("count")] - first[key.format("count")]
        out[phase] = (last[key.format("sum")] - first[key.format("sum")]) / max(1.0, n)
    return out


def calibrate(args, out: Path) -> dict:
    flags = base_flags(args) + ["--slo-policy", "off"]
    quiet = dict(slo_ttft=None, slo_tpot=None, progress=False, plots=False)
    with server_process(flags, out / "server-calibration.log") as url:
        # not measured: compiles anything the engine's own warm-up did not reach
        run_bench(url, trace_spec(args, 2.0, 5), "synthetic", out / "calib-warmup", **quiet)
        idle = run_bench(url, trace_spec(args, 0.2, 8), "synthetic", out / "calib-idle", **quiet)
        # overload for a few seconds: the engine stays saturated while the queue drains
        busy = run_bench(url, trace_spec(args, 20.0, min(args.probe_s, 5.0)), "synthetic", out / "calib-busy",
                         **quiet)
        busy_run = load_run(out / "calib-busy")
        served = [r for r in busy_run.requests if r.get("done") is not None and not r.get("rejected")]
        mean_out = sum(int(r.get("output_tokens") or 0) for r in served) / max(1, len(served))
        capacity_req_s = busy["throughput_tok_s"] / max(1.0, mean_out)
        trace_rate = read_trace_rate(args.trace, args.trace_start, args.trace_start + 600)
        time.sleep(5)  # drain the overload probe
        # the operator's view: SLOs a little above what the base load gets with brownout off,
        # so they hold in normal operation and only a burst breaks them
        speedup = args.base_load * capacity_req_s / trace_rate
        base = run_bench(url, trace_spec(args, speedup, args.probe_s), "synthetic", out / "calib-base",
                         **quiet)
    steps = step_means(load_run(out / "calib-base").metrics)
    m = args.slo_margin
    cal = dict(unloaded_tpot_s=idle["latency"]["tpot"]["p50"], unloaded_ttft_s=idle["latency"]["ttft"]["p50"],
               saturated_tpot_s=busy["latency"]["tpot"]["p50"], capacity_req_s=capacity_req_s,
               mean_output_tokens=mean_out, trace_rate_req_s=trace_rate, speedup=speedup,
               base_p90_ttft_s=base["latency"]["ttft"]["p90"], base_p90_tpot_s=base["latency"]["tpot"]["p90"],
               base_mean_step_s=steps, slo_margin=m)
    cal["slo_ttft_s"] = round(m * cal["base_p90_ttft_s"], 4)
    cal["slo_tpot_s"] = round(m * cal["base_p90_tpot_s"], 4)
    cal["slo_decode_step_s"] = round(m * steps["decode"], 4)
    cal["slo_prefill_step_s"] = round(m * steps["prefill"], 4)
    (out / "calibration.json").write_text(json.dumps(cal, indent=2))
    log.info("calibration %s", cal)
    return cal


# a policy run labelled with this suffix (e.g. off-sync) serves with async scheduling off: the
# same policy's A/B against the engine's default loop in one call
SYNC_SUFFIX = "-sync"


def policy_flags(label: str, cal: dict, args) -> list[str]:
    policy = label.removesuffix(SYNC_SUFFIX)
    loop = ["--no-async-scheduling"] if label.endswith(SYNC_SUFFIX) else []
    return loop + ["--slo-policy", policy, "--slo-ttft", str(cal["slo_ttft_s"]), "--slo-tpot", str(cal["slo_tpot_s"]),
            "--slo-decode-step", str(cal["slo_decode_step_s"]),
            "--slo-prefill-step", str(cal["slo_prefill_step_s"]),
            "--slo-window", "2", "--slo-check-interval", str(args.check_interval)]


def burst_goodput(run_dir: Path, slo: dict, t0: float, t1: float) -> float:
    """Requests sent during [t0, t1) (run time) that met every SLO, per second."""
    run = load_run(run_dir)
    start = min(r.get("first_sent", r.get("sent")) for r in run.requests)
    good = 0
    for rec in run.requests:
        sent = rec.get("first_sent", rec.get("sent")) - start
        if t0 <= sent < t1 and meets_slo(request_latencies(rec), slo):
            good += 1
    return good / (t1 - t0)


def sweep(args, cal: dict, out: Path) -> list[dict]:
    rows = []
    slo = {"ttft": cal["slo_ttft_s"], "tpot": cal["slo_tpot_s"], "e2e": None}
    for policy in args.sweep_policies:
        flags = base_flags(args) + policy_flags(policy, cal, args)
        misses = 0
        with server_process(flags, out / f"server-sweep-{policy}.log") as url:
            for frac in args.sweep:
                if args.sweep_stop_after and misses >= args.sweep_stop_after:
                    log.info("sweep %s: %d rates in a row missed, higher rates skipped", policy, misses)
                    break
                speed = frac * cal["capacity_req_s"] / cal["trace_rate_req_s"]
                rep = run_bench(url, trace_spec(args, speed, args.sweep_s), "synthetic",
                                out / f"sweep-{policy}-{frac}", slo_ttft=slo["ttft"], slo_tpot=slo["tpot"],
                                progress=False, plots=False, policy=policy)
                ok = (rep["latency"]["ttft"]["p90"] or 1e9) <= slo["ttft"] and \
                     (rep["latency"]["tpot"]["p90"] or 1e9) <= slo["tpot"] and rep["num_rejected"] == 0
                rows.append(dict(policy=policy, load_fraction=frac, offered_req_s=rep["meta"]["offered_rate"],
                                 p90_ttft_s=rep["latency"]["ttft"]["p90"], p90_tpot_s=rep["latency"]["tpot"]["p90"],
                                 goodput_req_s=rep["goodput_req_s"], mean_tau=rep["tau"]["mean"], meets_slo=ok))
                misses = 0 if ok else misses + 1
                log.info("sweep %s", rows[-1])
                # written after every rate so a run cut short by its time limit keeps its rows
                (out / "sweep.json").write_text(json.dumps(rows, indent=2))
                time.sleep(3)  # let the queue drain and the controller settle
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    return rows


def run_policies(args, cal: dict) -> None:
    """One run per policy on the burst workload, then the rate sweep unless skipped."""
    d = args.duration
    t0, t1 = round(d / 3, 1), round(2 * d / 3, 1)
    workload = trace_spec(args, cal["speedup"], d, f",burst={args.burst},burst_at={t0},burst_until={t1}")
    configs = [ServerConfig(p, base_flags(args) + policy_flags(p, cal, args))
               for p in args.policies.split(",")]
    result = run_configs(configs, workload, args.out, prompts="synthetic",
                         slo_ttft=cal["slo_ttft_s"], slo_tpot=cal["slo_tpot_s"], progress=False)
    slo = {"ttft": cal["slo_ttft_s"], "tpot": cal["slo_tpot_s"], "e2e": None}
    for row in result["rows"]:
        row["burst_goodput_req_s"] = burst_goodput(args.out / row["label"], slo, t0, t1)
    base = next(r for r in result["rows"] if r["label"] == "off")
    for row in result["rows"]:  # no ratio when off met no SLO during the burst
        off_goodput = base["burst_goodput_req_s"]
        row["burst_goodput_vs_off"] = row["burst_goodput_req_s"] / off_goodput if off_goodput > 0 else None
    summary = dict(workload=workload, calibration=cal, burst_window_s=[t0, t1], rows=result["rows"],
                   server_flags=base_flags(args))
    (args.out / "headline.json").write_text(json.dumps(summary, indent=2))
    for row in result["rows"]:
        log.info("%s", row)
    if not args.skip_sweep:
        summary["sweep"] = sweep(args, cal, args.out)
        (args.out / "headline.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="a checkpoint instead of dummy Qwen1.5-MoE (dry runs)")
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--trace-start", type=float, default=600.0, help="offset into the trace, seconds")
    ap.add_argument("--duration", type=float, default=75.0, help="seconds per policy run")
    ap.add_argument("--base-load", type=float, default=0.7)
    ap.add_argument("--burst", type=float, default=2.0)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    # a step budget that keeps steps with prefill work memory-bound, where brownout's
    # savings apply: at 2048 tokens a step is bound by arithmetic, which the united experts
    # do not remove (they cut the bytes of expert weights read, not the flops per token)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--probe-s", type=float, default=15.0)
    ap.add_argument("--check-interval", type=float, default=1.0)
    ap.add_argument("--slo-margin", type=float, default=1.5,
                    help="SLOs = this x the P90 (steps: mean) measured at the base load, brownout off")
    ap.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")], default=[0.8, 1.1, 1.4])
    ap.add_argument("--sweep-s", type=float, default=20.0)
    ap.add_argument("--sweep-stop-after", type=int, default=0,
                    help="stop a policy's sweep after this many rates in a row missed the SLOs (the "
                         "largest rate meeting them is below; 0: run every rate)")
    ap.add_argument("--sweep-policies", type=lambda s: s.split(","), default=["off", "predictive"],
                    help="policies the rate sweep runs, comma-separated (e.g. off,ladder)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="only the rate sweep (with --calibration)")
    ap.add_argument("--admission-ttft-factor", type=float, default=None,
                    help="every policy's server refuses requests whose predicted wait for the first "
                         "token exceeds this many TTFT SLOs (default: no such admission control)")
    ap.add_argument("--full-raw", action="store_true",
                    help="leave the output directory as the runs wrote it (per-token times, plots, "
                         "access logs) instead of compacting it at the end")
    ap.add_argument("--rung-prices", type=Path, default=None,
                    help="the rungs' accuracy prices every server uses (shedding, accuracy spent); the "
                         "dummy weights have none of their own")
    ap.add_argument("--policies", default="off,aimd,predictive",
                    help=f"policy runs, comma-separated (off first); a policy with the suffix {SYNC_SUFFIX} "
                         "runs with async scheduling off")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="calibration.json (or the headline.json / committed result) of an earlier "
                         "run instead of calibrating again: the same SLOs and offered load, so two "
                         "code versions compare on one workload")
    args = ap.parse_args()
    if "off" not in args.policies.split(","):
        ap.error("--policies must include off (the baseline every ratio is taken against)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.calibration:
        cal = json.loads(args.calibration.read_text())
        cal = cal.get("calibration", cal)  # a headline summary carries its calibration
        cal["reused_from"] = str(args.calibration)
        log.info("calibration from %s: %s", args.calibration, cal)
    else:
        cal = calibrate(args, args.out)
    if args.sweep_only:
        (args.out / "headline.json").write_text(json.dumps(dict(calibration=cal, sweep=sweep(args, cal, args.out)),
                                                           indent=2))
    else:
        run_policies(args, cal)
    if not args.full_raw:
        compact_tree(args.out, args.out)


if __name__ == "__main__":
    main()
