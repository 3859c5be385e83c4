"""Replicas on the CPU: one bursty workload against 1 replica, 2 replicas with Ray's default
router (power of two choices), 2 replicas with the SLO-aware router, and an autoscaled
fleet (1 -> 2 replicas on brownout), all Ray Serve replicas of the embedded demo model.

  PYTHONPATH=. python benchmarks/bench_replicas.py [--out runs/replicas] [--duration 40]

Steps: calibrate on one replica with brownout off (unloaded TTFT; served throughput of a
burst of full batches), set the SLOs from it as `brownout demo` does (TTFT: 20 x unloaded,
at least 1 s; TPOT: the full-batch TPOT), and run a step burst whose peak is `--peak` times
one replica's measured capacity against each configuration with the predictive controller.
Each run is `brownout bench`'s (same client, /metrics scrapes, report: violation windows,
goodput, mean tau); /metrics is the fleet's aggregate (tau averaged over the replicas). For
the autoscaled fleet, Serve's replica states are polled every 0.5 s: the time from the burst
to the second replica serving is what brownout has to cover.

Writes benchmarks/results/replicas/<name>.md (the table and what it can and cannot show)
and raw/<name>/<config>/ (compact: gzipped JSONL, see compact_raw.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brownout.bench.cli import run_bench  # noqa: E402
from brownout.bench.demo import MAX_NUM_SEQS, OUTPUT_TOKENS, PROMPTS  # noqa: E402
from brownout.defaults import default_model_dir, default_united_dir  # noqa: E402

log = logging.getLogger("bench_replicas")

# Each replica gets this many Ray CPUs and one torch thread: two replicas fill a 2-core box.
REPLICA_CPUS = 1.0
# Seconds a configuration may take to come up (engines load on busy cores).
READY_TIMEOUT_S = 600.0
# How often the autoscaled run polls Serve's replica states (seconds).
POLL_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_states() -> dict:
    from ray import serve

    from brownout.replicas.deployment import APP_NAME, REPLICA_DEPLOYMENT

    app = serve.status().applications.get(APP_NAME)
    if app is None or REPLICA_DEPLOYMENT not in app.deployments:
        return {}
    return dict(app.deployments[REPLICA_DEPLOYMENT].replica_states)


def deploy(port: int, flags: dict, settings) -> str:
    import httpx

    from brownout.replicas.cli import _prepare, parse_flags
    from brownout.replicas.deployment import deploy as serve_deploy

    args = parse_flags({**flags, "replicas": settings.num_replicas, "port": port})
    engine_config, server_config, options, _ = _prepare(args)
    serve_deploy(engine_config, server_config, options, settings)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url + "/metrics/replicas", timeout=5).text
            if replica_states().get("RUNNING") == settings.num_replicas and \
                    text.count('brownout_tau{phase="prefill"') == settings.num_replicas:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError("replicas not ready")


class StatePoller(threading.Thread):
    """Serve's replica states every POLL_S seconds, with wall-clock times."""

    def __init__(self):
        super().__init__(daemon=True)
        self.rows: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.rows.append({"t": time.time(), **replica_states()})
            self.stop.wait(POLL_S)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/replicas", help="run directory (default runs/replicas)")
    p.add_argument("--name", default="cpu_embedded", help="result name (default cpu_embedded)")
    p.add_argument("--duration", type=float, default=40.0, help="workload seconds (default 40)")
    p.add_argument("--peak", type=float, default=1.6,
                   help="burst peak in units of one replica's measured capacity (default 1.6)")
    p.add_argument("--dummy-preset", default=None,
                   help="random weights of this preset (e.g. cpu-moe, whose expert reads bound a CPU "
                        "step as on a GPU, so dimming shows) instead of the embedded model")
    p.add_argument("--configs", default="one,pow2,slo,autoscale",
                   help="comma-separated subset of one,pow2,slo,autoscale")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from brownout.replicas.deployment import ReplicaSettings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = {"device": "cpu", "max_num_seqs": MAX_NUM_SEQS, "max_waiting_requests": 256,
            "united_experts": str(default_united_dir(4))}
    if args.dummy_preset:  # as `brownout demo --dummy-preset`
        base.update(load_format="dummy", model=args.dummy_preset, tokenizer=str(default_model_dir()),
                    united_experts="average:4")
    quiet = dict(progress=False, plots=False, max_tokens=OUTPUT_TOKENS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, dict] = {}
    try:
        # calibration: one replica, brownout off
        url = deploy(port, {**base, "slo_policy": "off"}, ReplicaSettings(num_replicas=1, num_cpus=REPLICA_CPUS))
        idle = run_bench(url, "constant:rate=1,duration=4", PROMPTS, out / "calib-idle",
                         slo_ttft=None, slo_tpot=None, **quiet)
        busy = run_bench(url, f"constant:rate=1000,duration=1,max_requests={3 * MAX_NUM_SEQS}", PROMPTS,
                         out / "calib-busy", slo_ttft=None, slo_tpot=None, **quiet)
        capacity = busy["throughput_tok_s"] / OUTPUT_TOKENS
        cal = {"unloaded_ttft_s": idle["latency"]["ttft"]["p50"],
               "full_batch_tpot_s": busy["latency"]["tpot"]["p50"], "capacity_req_s": capacity}
        cal["slo_ttft_s"] = round(max(1.0, 20 * cal["unloaded_ttft_s"]), 3)
        cal["slo_tpot_s"] = round(cal["full_batch_tpot_s"], 4)
        base_rate = round(args.peak * capacity / 2, 3)  # the step doubles it to the peak
        workload = (f"step:rate={base_rate},factor=2,at={args.duration / 4:g},"
                    f"until={3 * args.duration / 4:g},duration={args.duration:g}")
        cal["workload"] = workload
        (out / "calibration.json").write_text(json.dumps(cal, indent=2))
        log.info("calibration %s", cal)
        slo_flags = {**base, "slo_policy": "predictive", "slo_ttft": cal["slo_ttft_s"],
                     "slo_tpot": cal["slo_tpot_s"], "slo_decode_step": cal["slo_tpot_s"],
                     "slo_prefill_step": round(3 * cal["slo_tpot_s"], 4), "slo_window": 2,
                     "slo_check_interval": 1}
        configs = {
            "one": ReplicaSettings(num_replicas=1, num_cpus=REPLICA_CPUS),
            "pow2": ReplicaSettings(num_replicas=2, num_cpus=REPLICA_CPUS, router="pow2"),
            "slo": ReplicaSettings(num_replicas=2, num_cpus=REPLICA_CPUS, router="slo"),
            "autoscale": ReplicaSettings(num_replicas=1, max_replicas=2, num_cpus=REPLICA_CPUS,
                                         upscale_delay_s=2.0, downscale_delay_s=60.0,
                                         look_back_period_s=2.0),
        }
        for name in args.configs.split(","):
            serve.delete("brownout")  # a fresh fleet: no state carried between configurations
            url = deploy(port, slo_flags, configs[name])
            poller = StatePoller()
            poller.start()
            t0 = time.time()
            report = run_bench(url, workload, PROMPTS, out / name, slo_ttft=cal["slo_ttft_s"],
                               slo_tpot=cal["slo_tpot_s"], label=name, policy="predictive", **quiet)
            poller.stop.set()
            poller.join()
            with open(out / name / "replica_states.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in poller.rows)
            results[name] = summarize(report, poller.rows, t0, t0 + args.duration / 4)
            log.info("%s: %s", name, results[name])
    finally:
        serve.shutdown()
        ray.shutdown()
    write_results(args, cal, results, out)
    return 0


def summarize(report: dict, states: list[dict], t_start: float, t_burst: float) -> dict:
    v = report["violations"]["any"]
    row = {"violation_windows": v["count"], "windows": v["total"],
           "goodput_req_s": report["goodput_req_s"], "goodput_fraction": report["goodput_fraction"],
           "mean_tau": report["tau"]["mean"], "num_requests": report["num_requests"],
           "num_rejected": report["num_rejected"], "num_failed": report["num_failed"],
           "ttft_p90_s": report["latency"]["ttft"]["p90"], "tpot_p90_s": report["latency"]["tpot"]["p90"]}
    starting = [r["t"] for r in states if r.get("STARTING") or r.get("PENDING_MIGRATION")]
    two = [r["t"] for r in states if r.get("RUNNING", 0) >= 2]
    if starting and two and min(two) > states[0]["t"] + POLL_S:  # it scaled during the run
        row["scale_up_decided_after_burst_s"] = round(min(starting) - t_burst, 1)
        row["second_replica_start_s"] = round(min(two) - min(starting), 1)
        row["second_replica_serving_after_burst_s"] = round(min(two) - t_burst, 1)
    return row


def _f(x, digits=3) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def write_results(args, cal: dict, results: dict, out: Path) -> None:
    dest = REPO / "benchmarks" / "results" / "replicas"
    raw = dest / "raw" / args.name
    raw.mkdir(parents=True, exist_ok=True)
    for name in results:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "compact_raw.py"), str(out / name),
                        str(raw / name)], check=True)
    (raw / "calibration.json").write_text(json.dumps(cal, indent=2))
    (raw / "summary.json").write_text(json.dumps(results, indent=2))
    rows = ["| configuration | violation windows (any SLO) | goodput req/s (fraction) | mean tau | "
            "TTFT P90 s | TPOT P90 s | refused | failed |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['violation_windows']}/{r['windows']} | {_f(r['goodput_req_s'])} "
                    f"({_f(r['goodput_fraction'])}) | {_f(r['mean_tau'])} | {_f(r['ttft_p90_s'])} | "
                    f"{_f(r['tpot_p90_s'])} | {r['num_rejected']} | {r['num_failed']} |")
    scale = results.get("autoscale", {})
    scale_text = ("The autoscaled fleet did not scale during the run." if "second_replica_start_s" not in scale
                  else f"Autoscaled fleet: the policy's scale-up began {scale['scale_up_decided_after_burst_s']} s "
                       f"after the burst started (the upscale delay and the look-back window included); the "
                       f"second replica took {scale['second_replica_start_s']} s from being started to "
                       f"serving, so it served {scale['second_replica_serving_after_burst_s']} s into the burst; "
                       f"until then the first replica's controller covered the burst by dimming.")
    model = (f"random weights of the `{args.dummy_preset}` preset (uncalibrated united experts, "
             "average of 4)" if args.dummy_preset else
             "the embedded demo model (calibrated united experts, way 4)")
    text = f"""# Replicas on the CPU ({args.name})

Made by `benchmarks/bench_replicas.py` (`--duration {args.duration:g} --peak {args.peak:g}`) at
commit {_commit()} on {platform.machine()} with {os.cpu_count()} CPU cores shared with other work,
Ray {_ray_version()}.
Ray Serve replicas of {model}, one torch
thread and {REPLICA_CPUS:g} Ray CPU each, predictive controller; workload `{cal['workload']}`
(synthetic prompts of ~48 tokens, {OUTPUT_TOKENS} output tokens), its peak {args.peak:g} x one
replica's measured capacity ({cal['capacity_req_s']:.2f} req/s); SLOs calibrated on one
replica with brownout off: TTFT {cal['slo_ttft_s']} s, TPOT {cal['slo_tpot_s']} s.

{chr(10).join(rows)}

{scale_text}

What this CPU run can show: that the replicas, the router and the autoscaler work end to end
under a burst, and how a second replica and the choice of router move violation windows,
goodput and the accuracy spent (mean tau) on this machine. What it cannot show: GPU-scale
numbers (the embedded model's experts fit a CPU's caches, so dimming saves little step time
with it; `cpu-moe`'s do not; and a replica's start takes seconds here, not the minutes of a
large model), two replicas' worth of compute (the two cores are shared with other jobs, so a
second replica adds less than a core), or
the routers' difference at many replicas: with two, power-of-two choices already compares
both replicas on every request (by Ray's queue length), so the SLO-aware router can differ
only in what it compares (predicted first-token wait and tau instead of queue length). The
cores are shared with other jobs, so a rerun moves these figures; one run per configuration.
Raw data: `raw/{args.name}/` (requests without per-token times, /metrics scrapes, Serve's
replica states every {POLL_S} s, calibration, summary).
"""
    (dest / f"{args.name}.md").write_text(text)
    log.info("wrote %s", dest / f"{args.name}.md")


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    sys.exit(main())
