"""The degradation ladder on the simulator: off / predictive (rungs 1-2) / ladder (rungs 1-4),
TTFT admission on, from the committed H200 step-cost profile. Every figure is SIMULATED.

Workloads:
  conv-2x, conv-3x  the GPU headline run 15 setup (Azure conversation trace window at 70% of
                    capacity, 128 sequences, 1024-token steps, calibrated SLOs, admission
                    F = 1), with the trace played 2x / 3x faster from 20 s to 40 s
  prefill-heavy     log-normal prompts (mean PREFILL_MEAN_PROMPT tokens), log-normal outputs
                    (mean PREFILL_MEAN_OUTPUT), gamma arrivals of burstiness 0.5 at 70% of the
                    profile's prefill capacity, same server flags and SLOs; also `fixed` at
                    tau REFERENCE_TAU, what dimming at its fullest serves there
Rung 5 (priority classes) on conv-3x with the priority scheduling policy: a share (each of
PRIORITY_SHARES) of requests gets priority 0, the rest 1, ladder policy, without
`dim_exempt_priority`, with it per token (the engine's way: priority-0 tokens keep their
experts inside dimmed steps; the profile has no term for it, so a step's experts are the
union of the two routings, `brownout.sim.profile.mixed_experts`) and per step (a step
holding a priority-0 request runs undimmed); the cost of the exemption is the difference.

  python benchmarks/sim_ladder.py --trace /path/to/azure_llm_2023_conv.csv \
      --out benchmarks/results/sim [--seeds 0,1]
writes ladder_sim.md and raw/ladder_sim.jsonl.gz under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_headline import headline_setup  # noqa: E402

from brownout.bench.report import compute_report  # noqa: E402
from brownout.bench.runs import load_run  # noqa: E402
from brownout.control.base import register_policy  # noqa: E402
from brownout.control.ladder import LadderController  # noqa: E402
from brownout.control.prices import PriceTable  # noqa: E402
from brownout.sim.engine import SimRequest, SimSetup  # noqa: E402
from brownout.sim.profile import StepShape, load_profile  # noqa: E402
from brownout.sim.run import PROMPT_EXTRA_TOKENS, sim_requests, simulate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRICES = ROOT / "brownout" / "assets" / "demo" / "ladder-prices.json"
HEADLINE_RUN = 15  # the conversation-trace headline run whose setup the trace workloads reuse
POLICIES = ("off", "predictive", "ladder", "ladder_partial")
# the prefill-heavy load also runs every step at this tau (the `fixed` policy), admission
# on: what dimming serves there at the most accuracy spent, a reference for the policies
REFERENCE_TAU = 0.0
LABELS = {"off": "off", "predictive": "predictive (rungs 1-2)", "ladder": "ladder (rungs 1-4)",
          "ladder_partial": "ladder, partial budget cut",
          "fixed": f"fixed tau {REFERENCE_TAU:g} (reference: every step at the lowest tau)"}


@register_policy
class PartialCutLadder(LadderController):
    """The ladder that also cuts the step budget where the cut does not suffice."""

    name = "ladder_partial"
    partial_cut = True
# the prefill-heavy workload
PREFILL_MEAN_PROMPT = 2000
PREFILL_PROMPT_SIGMA = 0.5  # of log(prompt tokens)
PREFILL_MEAN_OUTPUT = 30
PREFILL_OUTPUT_SIGMA = 0.5
PREFILL_BURSTINESS = 0.5
PREFILL_LOAD = 0.7  # share of the profile's prefill capacity
PREFILL_DURATION_S = 60.0
# a prompt is at most this many tokens (the headline server's context is 4096)
PREFILL_MAX_PROMPT = 4000
# the decodes beside a full chunk when the capacity is priced: a step of the prefill-heavy load
CAPACITY_DECODES = 16
# rung 5: shares of requests in the important class (priority 0; the rest are 1)
PRIORITY_SHARES = (0.2, 0.05)


def prefill_heavy_requests(setup: SimSetup, seed: int) -> tuple[list[SimRequest], float]:
    """The prefill-heavy requests and their offered rate (req/s)."""
    budget = setup.scheduler.max_num_batched_tokens
    ctx = budget + CAPACITY_DECODES * PREFILL_MEAN_PROMPT
    step = setup.profile.step_latency_s(StepShape(budget, CAPACITY_DECODES + 1, ctx, True), 1.0)
    per_request = PREFILL_MEAN_PROMPT + PREFILL_MEAN_OUTPUT  # step tokens a request costs
    rate = PREFILL_LOAD * budget / step / per_request
    rng = np.random.default_rng(seed)
    n = int(rate * PREFILL_DURATION_S * 1.5) + 16
    gaps = rng.gamma(PREFILL_BURSTINESS, 1.0 / (rate * PREFILL_BURSTINESS), size=n)
    times = np.cumsum(gaps)
    times = times[times < PREFILL_DURATION_S]

    def lognormal(mean: float, sigma: float, size: int) -> np.ndarray:
        return rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, size=size)

    prompts = np.clip(np.round(lognormal(PREFILL_MEAN_PROMPT, PREFILL_PROMPT_SIGMA, times.size)),
                      1, PREFILL_MAX_PROMPT).astype(int)
    outputs = np.maximum(1, np.round(lognormal(PREFILL_MEAN_OUTPUT, PREFILL_OUTPUT_SIGMA, times.size))).astype(int)
    reqs = [SimRequest(i, float(t), int(p) + PROMPT_EXTRA_TOKENS, int(o), int(p))
            for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]
    return reqs, rate


def with_priorities(reqs: list[SimRequest], seed: int, share: float) -> list[SimRequest]:
    rng = np.random.default_rng(seed + 7)
    return [dataclasses.replace(r, priority=0 if rng.random() < share else 1) for r in reqs]


def summarise(report: dict[str, Any], run_dir: Path, recs: list[dict]) -> dict[str, Any]:
    """The row of one run: violation windows, missed requests, goodput, accuracy, rungs."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]["brownout"]
    slo = report["slo"]
    past = sum(1 for r in recs if r["status"] == 200 and not _meets(r, slo))
    budgets = [m["brownout"]["brownout_step_token_budget"] for m in metrics]
    caps = [m["brownout"]["brownout_running_cap"] for m in metrics]
    by_class: dict[int, dict[str, int]] = {}
    for r in recs:
        c = by_class.setdefault(int(r.get("priority", 0)), {"n": 0, "refused": 0, "missed": 0})
        c["n"] += 1
        c["refused"] += bool(r["rejected"])
        c["missed"] += bool(r["rejected"] or r["status"] != 200 or not _meets(r, slo))
    return {
        "requests": report["num_requests"],
        "violation_windows": report["violations"]["any"]["count"],
        "windows": report["violations"]["any"]["total"],
        "ttft_windows": report["violations"].get("ttft", {}).get("count"),
        "tpot_windows": report["violations"].get("tpot", {}).get("count"),
        "refused": report["num_rejected"],
        "errored": report["num_failed"] - report["num_rejected"],
        "past_slo": past,
        "missed": report["num_failed"] + past,
        "goodput_req_s": report["goodput_req_s"],
        "p90_ttft_s": report["latency"]["ttft"]["p90"],
        "p90_tpot_s": report["latency"]["tpot"]["p90"],
        "mean_tau": report["tau"]["mean"],
        "accuracy_spent_time": last.get("brownout_accuracy_spent,weighting=time", 0.0),
        "accuracy_spent_token": last.get("brownout_accuracy_spent,weighting=token", 0.0),
        "mean_step_token_budget": float(np.mean(budgets)),
        "min_step_token_budget": float(np.min(budgets)),
        "share_scrapes_budget_cut": float(np.mean([b < budgets[0] for b in budgets])) if budgets else 0.0,
        "min_running_cap": float(np.min(caps)),
        "exempt_steps": last.get("brownout_exempt_steps_total", 0.0),
        "by_priority": by_class,
    }


def _meets(r: dict, slo: dict) -> bool:
    ft = r.get("first_token")
    if ft is None:
        return False
    if slo["ttft_s"] is not None and ft - r["sent"] > slo["ttft_s"]:
        return False
    times = r.get("token_times") or []
    if slo["tpot_s"] is not None and len(times) > 1:
        return (times[-1] - times[0]) / (len(times) - 1) <= slo["tpot_s"]
    return True


def run_one(name: str, policy: str, setup: SimSetup, workload: str, requests: list[SimRequest],
            tmp: Path, variant: str = "") -> dict[str, Any]:
    out = tmp / re.sub(r"\W+", "_", f"{name}-{policy}{variant}-{setup.seed}")
    report = simulate(workload, out, setup, label=policy, plots=False, requests=requests)
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    prio = {r.index: r.priority for r in requests}
    for rec in recs:
        rec["priority"] = prio.get(rec["index"], 0)
    row = summarise(report, out, recs)
    meta = json.loads((out / "meta.json").read_text())
    row.update(workload=name, policy=policy, variant=variant or None, seed=setup.seed,
               cpu_s=meta["sim"]["cpu_s"])
    print(f"{name:14s} {policy + variant:22s} seed {setup.seed}: {row['violation_windows']:3d} windows, "
          f"missed {row['missed']:4d} (refused {row['refused']}), goodput {row['goodput_req_s']:.2f}, "
          f"acc {row['accuracy_spent_time']:.3f}, budget mean {row['mean_step_token_budget']:.0f}, "
          f"cap min {row['min_running_cap']:.0f} ({row['cpu_s']:.1f} s CPU)", flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True, help="Azure conversation trace CSV")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim"),
                    help="output directory (default: benchmarks/results/sim)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    profile = load_profile("h200")
    prices = PriceTable.load(PRICES)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for seed in seeds:
            for burst in (2, 3):
                name = f"conv-{burst}x"
                for policy in POLICIES:
                    workload, setup = headline_setup("h200", HEADLINE_RUN, policy, profile, args.trace, seed)
                    workload = workload.replace("burst=2.0", f"burst={burst:.1f}")
                    setup = dataclasses.replace(setup, prices=prices)
                    rows.append(run_one(name, policy, setup, workload, sim_requests(workload), tmp))
            for policy in (*POLICIES, "fixed"):
                _, setup = headline_setup("h200", HEADLINE_RUN, policy, profile, args.trace, seed)
                setup = dataclasses.replace(setup, prices=prices, fixed_tau=REFERENCE_TAU)
                reqs, rate = prefill_heavy_requests(setup, seed)
                workload = (f"prefill-heavy:rate={rate:.2f},burstiness={PREFILL_BURSTINESS},"
                            f"duration={PREFILL_DURATION_S:g}")
                rows.append(run_one("prefill-heavy", policy, setup, workload, reqs, tmp))
            # rung 5: priority classes on the 3x burst, ladder, with and without the exemption
            workload, setup = headline_setup("h200", HEADLINE_RUN, "ladder", profile, args.trace, seed)
            workload = workload.replace("burst=2.0", "burst=3.0")
            sched = dataclasses.replace(setup.scheduler, policy="priority")
            for share in PRIORITY_SHARES:
                reqs = with_priorities(sim_requests(workload), seed, share)
                for exempt, per_token in ((None, True), (0, True), (0, False)):
                    variant = f" +priority ({share:.0%} class 0)" + (
                        "" if exempt is None else
                        f", class 0 exempt per {'token' if per_token else 'step'}")
                    slo = dataclasses.replace(setup.slo, dim_exempt_priority=exempt)
                    s = dataclasses.replace(setup, scheduler=sched, slo=slo, prices=prices,
                                            exempt_per_token=per_token)
                    rows.append(run_one("conv-3x", "ladder", s, workload, reqs, tmp, variant))
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "raw" / "ladder_sim.jsonl.gz", "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "ladder_sim_table.md").write_text(table(rows, seeds))
    print(f"wrote {out / 'raw' / 'ladder_sim.jsonl.gz'} and {out / 'ladder_sim_table.md'}")
    return 0


def table(rows: list[dict], seeds: list[int]) -> str:
    """Mean over seeds per (workload, policy, variant)."""
    keys = ("violation_windows", "refused", "errored", "past_slo", "missed", "goodput_req_s",
            "p90_ttft_s", "p90_tpot_s", "accuracy_spent_time", "mean_tau", "mean_step_token_budget",
            "min_step_token_budget", "min_running_cap", "exempt_steps")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["policy"], r["variant"] or ""), []).append(r)
    lines = [f"SIMULATED (committed H200 profile), mean over seeds {','.join(map(str, seeds))}", "",
             "| workload | policy | violation windows (1 s) | refused | errored | past SLO | missed "
             "| goodput req/s | P90 TTFT s | P90 TPOT s | accuracy spent (ppl incr., time-wt) | mean tau "
             "| mean step budget | min step budget | min running cap | exempt steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (wl, pol, var), rs in groups.items():
        m = {k: float(np.mean([r[k] for r in rs if r[k] is not None])) if any(r[k] is not None for r in rs)
             else None for k in keys}
        fmt = {k: (f"{v:.3f}" if k in ("goodput_req_s", "p90_ttft_s", "p90_tpot_s", "accuracy_spent_time", "mean_tau")
                   else f"{v:.1f}") if v is not None else "-" for k, v in m.items()}
        lines.append(f"| {wl} | {LABELS.get(pol, pol)}{var} | " + " | ".join(fmt[k] for k in keys) + " |")
    prio = [r for r in rows if r["variant"]]
    if prio:
        lines += ["", "Rung 5 by class (conv-3x, ladder, priority scheduling; summed over seeds; "
                  "missed = refused + errored + past an SLO):", "",
                  "| variant | class | requests | refused | missed |", "|---|---|---|---|---|"]
        for var in dict.fromkeys(r["variant"] for r in prio):
            tot: dict[str, dict[str, int]] = {}
            for r in prio:
                if r["variant"] != var:
                    continue
                for c, v in r["by_priority"].items():
                    t = tot.setdefault(str(c), {"n": 0, "refused": 0, "missed": 0})
                    for k in t:
                        t[k] += v[k]
            for c in sorted(tot):
                t = tot[c]
                lines.append(f"| {var} | {c} | {t['n']} | {t['refused']} | {t['missed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
