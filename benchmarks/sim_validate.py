"""Simulated vs measured: the GPU headline runs replayed by `brownout simulate`.

For each committed headline run (its workload, SLOs and server flags from its
headline.json) and each policy it ran, the run is simulated with several
seeds (the seed draws the step-latency noise) and its violation windows, goodput, refusals
and mean tau are set beside the measured ones. A figure is within target when the mean of
the simulations is within 20% of the measurement, or within 2 for window counts. Every
simulated figure is a simulation from the committed profile, not a measurement.

  python benchmarks/sim_validate.py --trace ../shared/data/traces/azure_llm_2023_conv.csv \
      --out benchmarks/results/sim
  # runs that replayed another trace name it per run, e.g. the prefill-heavy one:
  python benchmarks/prefill_heavy_trace.py --out /tmp/ph.csv
  python benchmarks/sim_validate.py --runs 20,21 --run-trace 21=/tmp/ph.csv --name ladder ...
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from sim_headline import headline_setup, measured_rows

from brownout.sim.profile import load_profile
from brownout.sim.run import sim_requests, simulate

POLICIES = ("off", "aimd", "predictive", "ladder")
# figure -> (comparison-row key, report getter, absolute slack)
FIGURES = {
    "violation windows": ("violations", lambda r: r["violations"]["any"]["count"], 2.0),
    "goodput req/s": ("goodput_req_s", lambda r: r["goodput_req_s"], 0.0),
    "refused (429)": ("rejected", lambda r: r["num_rejected"], 0.0),
    "mean tau": ("mean_tau", lambda r: r["tau"]["mean"], 0.0),
}
# figures set beside the measurement without a target: they explain a miss, not judge one
INFO_FIGURES = {
    "P90 TTFT s": ("p90_ttft_s", lambda r: r["latency"]["ttft"]["p90"]),
}
# a simulated figure within this share of the measured one meets the target
REL_TARGET = 0.2


def within(sim: float, meas: float, slack: float) -> bool:
    return abs(sim - meas) <= max(REL_TARGET * abs(meas), slack)


def validate(gpu: str, runs: list[int], seeds: int, trace: str, profile_name: str,
             run_traces: dict[int, str] | None = None) -> dict:
    profile = load_profile(profile_name)
    out = {"profile": {"machine": profile.machine, "date": profile.date, "name": profile_name},
           "seeds": seeds, "runs": runs, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            measured = measured_rows(gpu, run)
            path = (run_traces or {}).get(run, trace)
            workload, _ = headline_setup(gpu, run, "off", profile, path)
            requests = sim_requests(workload)
            for policy in (p for p in POLICIES if p in measured):
                sims = []
                for seed in range(seeds):
                    _, setup = headline_setup(gpu, run, policy, profile, path, seed)
                    sims.append(simulate(workload, Path(tmp) / f"{run}-{policy}-{seed}", setup,
                                         label=policy, plots=False, requests=requests))
                row = {"run": run, "policy": policy}
                for name, (key, get, _) in FIGURES.items():
                    row[name] = {"measured": measured[policy][key],
                                 "simulated": [get(r) for r in sims]}
                for name, (key, get) in INFO_FIGURES.items():
                    if measured[policy].get(key) is not None:
                        row[name] = {"measured": measured[policy][key],
                                     "simulated": [get(r) for r in sims]}
                out["rows"].append(row)
                logging.info("run %d %s: %s", run, policy,
                             {k: (v["measured"], v["simulated"]) for k, v in row.items()
                              if isinstance(v, dict)})
    return out


def summary(result: dict) -> list[dict]:
    """Per policy and figure: measured and simulated means over the runs, and the verdict."""
    rows = []
    for policy in POLICIES:
        mine = [r for r in result["rows"] if r["policy"] == policy]
        if not mine:
            continue
        for name, (_, _, slack) in FIGURES.items():
            meas = [r[name]["measured"] for r in mine]
            sim = [statistics.fmean(r[name]["simulated"]) for r in mine]
            draws = [x for r in mine for x in r[name]["simulated"]]  # every run and seed
            m, s = statistics.fmean(meas), statistics.fmean(sim)
            rows.append({"policy": policy, "figure": name, "measured": m,
                         "measured_range": [min(meas), max(meas)], "simulated": s,
                         "simulated_range": [min(draws), max(draws)], "within_target": within(s, m, slack),
                         "runs_within": sum(within(a, b, slack) for a, b in zip(sim, meas))})
        for name in INFO_FIGURES:
            if not all(name in r for r in mine):
                continue  # a validation made before the figure was recorded
            meas = [r[name]["measured"] for r in mine]
            sim = [statistics.fmean(r[name]["simulated"]) for r in mine]
            draws = [x for r in mine for x in r[name]["simulated"]]
            rows.append({"policy": policy, "figure": name, "measured": statistics.fmean(meas),
                         "measured_range": [min(meas), max(meas)], "simulated": statistics.fmean(sim),
                         "simulated_range": [min(draws), max(draws)], "within_target": None,
                         "runs_within": None})
    return rows


def markdown(result: dict, rows: list[dict]) -> str:
    p = result["profile"]
    lines = [f"# Simulated vs measured: {p['machine']} headline runs {result['runs']}", "",
             f"All simulated figures are simulations (`brownout simulate`, profile `{p['name']}` "
             f"of the {p['machine']}, fitted {p['date']}), {result['seeds']} seeds per run; "
             "measured figures are the GPU runs' reports (mean and range over the runs; the "
             "simulated range is over every run and seed). Target: the simulated mean within "
             "20% of the measured mean (window counts: or within 2); P90 TTFT has no target.", "",
             "| policy | figure | measured mean (min-max) | simulated mean (min-max) | within target | runs within |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        f = (lambda x: f"{x:.2f}") if isinstance(r["measured"], float) and r["figure"] != "refused (429)" \
            else (lambda x: f"{x:.1f}")
        if r["figure"] in INFO_FIGURES:
            f = lambda x: f"{x:.4f}"  # noqa: E731
        verdict = "-" if r["within_target"] is None else "yes" if r["within_target"] else "**no**"
        runs_within = "-" if r["runs_within"] is None else f"{r['runs_within']} of {len(result['runs'])}"
        lines.append(f"| {r['policy']} | {r['figure']} | {f(r['measured'])} ({f(r['measured_range'][0])}-"
                     f"{f(r['measured_range'][1])}) | {f(r['simulated'])} ({f(r['simulated_range'][0])}-"
                     f"{f(r['simulated_range'][1])}) | {verdict} | {runs_within} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--runs", default="15,16,17")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--trace", help="the Azure conversation trace CSV (needed unless --summarize)")
    ap.add_argument("--run-trace", action="append", default=[], metavar="RUN=CSV",
                    help="the trace a run replayed, where it is not --trace (repeatable)")
    ap.add_argument("--name", default=None, help="output file stem suffix: validation_<gpu>_<name>")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize", action="store_true",
                    help="rewrite the tables from --out's existing validation JSON, simulating nothing")
    args = ap.parse_args()
    stem = f"validation_{args.gpu}" + (f"_{args.name}" if args.name else "")
    if args.summarize:
        result = json.loads((args.out / f"{stem}.json").read_text())
        _write(result, args.out, stem)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("brownout.control").setLevel(logging.WARNING)
    logging.getLogger("brownout.sim").setLevel(logging.WARNING)
    run_traces = {int(k): v for k, _, v in (x.partition("=") for x in args.run_trace)}
    result = validate(args.gpu, [int(x) for x in args.runs.split(",")], args.seeds, args.trace,
                      args.profile, run_traces)
    _write(result, args.out, stem)


def _write(result: dict, out: Path, stem: str) -> None:
    rows = summary(result)
    result["summary"] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result, rows))
    print(markdown(result, rows))


if __name__ == "__main__":
    main()
