"""Rate sweeps on the H200, brownout off vs ladder, servers without admission control: one row
per load fraction (P90 TTFT and TPOT against the SLOs, refused requests, goodput, mean tau) and
per workload the largest fraction of calibrated capacity whose point meets the SLOs (P90 TTFT
and P90 TPOT within them, nothing refused), from the committed raw sweeps and the calibration
each sweep reused.
  python benchmarks/sweep_table.py   (writes benchmarks/results/headline/sweep_h200.md)
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ROOT / "benchmarks" / "results" / "headline"
OUT = HEADLINE / "sweep_h200.md"
# the policy every ratio is taken against
BASELINE = "off"

CONV_FLAGS = ("--rung-prices brownout/assets/demo/ladder-prices.json --max-output 1024 --sweep-s 15 "
              "--sweep-stop-after 2")
PH_FLAGS = ("--rung-prices brownout/assets/demo/ladder-prices.json --trace .gpu_data/prefill_heavy.csv "
            "--trace-start 0 --max-prompt 4000 --max-output 128 --sweep-s 15 --sweep-stop-after 2")
# workload -> (calibration reused, {policy: [(raw folder, device_run.sh arguments), ...]}); a
# policy's later sweeps extend its first (higher fractions, another server of the same flags)
WORKLOADS = {
    "conversation": ("headline_h200_run13.json", {
        "off": [("sweep_h200_conv/swc_off",
                 f"swc_off sweep --sweep-policies off --sweep 0.7,0.8,0.9,1.0,1.1 {CONV_FLAGS}"),
                ("sweep_h200_conv/swc_off2",
                 f"swc_off2 sweep --sweep-policies off --sweep 1.2,1.3 {CONV_FLAGS}")],
        "ladder": [("sweep_h200_conv/swc_lad",
                    f"swc_lad sweep --sweep-policies ladder --sweep 0.9,1.0,1.2,1.4,1.6,1.9 {CONV_FLAGS}")],
    }),
    "prefill-heavy": ("headline_h200_run21.json", {
        "off": [("sweep_h200_ph/swp_off",
                 f"swp_off sweep --sweep-policies off --sweep 0.6,0.7,0.8,0.9,1.0,1.1 {PH_FLAGS}")],
        "ladder": [("sweep_h200_ph/swp_lad",
                    f"swp_lad sweep --sweep-policies ladder --sweep 0.8,1.0,1.2,1.4,1.6 {PH_FLAGS}")],
    }),
}


def requested(cmd: str) -> list[float]:
    return [float(x) for x in re.search(r"--sweep ([\d.,]+)", cmd).group(1).split(",")]


def points(raw: Path, cal: dict) -> list[dict]:
    """The sweep's rows with the refused and failed counts of each point's report; `meets` is
    recomputed from the row and must agree with what the sweep decided."""
    out = []
    for row in json.loads((raw / "sweep.json").read_text()):
        rep = json.loads((raw / f"sweep-{row['policy']}-{row['load_fraction']}" / "report.json").read_text())
        row = dict(row, refused=rep["num_rejected"], failed=rep["num_failed"],
                   goodput_fraction=rep["goodput_fraction"])
        meets = (row["p90_ttft_s"] or 1e9) <= cal["slo_ttft_s"] and \
            (row["p90_tpot_s"] or 1e9) <= cal["slo_tpot_s"] and row["refused"] == 0
        if meets != row["meets_slo"]:
            raise ValueError(f"{raw}: meets_slo disagrees at {row['load_fraction']}")
        out.append(row)
    return out


def largest_met(rows: list[dict], asked: list[float]) -> tuple:
    """(largest met fraction or None, the next measured fraction above it or None, text saying
    how far the measurement bounds the true value)."""
    run = [r["load_fraction"] for r in rows]
    met = [r["load_fraction"] for r in rows if r["meets_slo"]]
    skipped = [f for f in asked if f not in run]
    skip = f"; {', '.join(f'{f:g}' for f in skipped)} not run (skipped after two misses in a row)" if skipped else ""
    if not met:
        return None, None, f"no point met the SLOs (lowest measured {min(run):g}){skip}"
    best = max(met)
    above = [f for f in run if f > best]
    if not above:
        note = f"the highest point measured: the true value is at least {best:g}"
    else:
        note = f"next measured point {min(above):g} missed: the true value is in [{best:g}, {min(above):g})"
    if best == min(run):
        note += "; also the lowest point measured"
    return best, min(above) if above else None, note + skip


def ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    raw = HEADLINE / "raw"
    first = next(iter(WORKLOADS.values()))[1][BASELINE][0][0]
    gpu = (raw / first / "gpu.txt").read_text().splitlines()
    lines = ["# Rate sweeps on the H200: largest load meeting the SLOs, brownout off vs ladder", "",
             f"Made by `python benchmarks/sweep_table.py` from the raw sweeps in "
             f"`benchmarks/results/headline/raw/sweep_h200_conv/` and `.../sweep_h200_ph/`.", "",
             f"- Machine: {gpu[1].split(',')[0]} (from the raw `gpu.txt`; torch / triton {gpu[2]}); server and "
             "bench client on the same machine over loopback.",
             "- Model: dummy Qwen1.5-MoE-A2.7B weights (random, bf16), united experts `average:4`, 128 "
             "sequences / 1024-token steps, the embedded model's rung prices.",
             "- Servers without admission control; one server per policy, its points played one after the "
             "other; 15 s of trace per point, one run per point (no repeats).",
             "- A point meets the SLOs when its P90 TTFT and P90 TPOT are within them and nothing was refused. "
             "Load fraction: of the calibrated capacity; the offered rate is that of the 15-s window played.",
             "- Goodput: requests served within both SLOs per second of the point's duration (sending plus "
             "draining); its fraction: of the point's requests. `--sweep-stop-after 2` ends a policy's sweep "
             "after two misses in a row, so higher fractions of its command may be missing.",
             "- Traces: conversation, the Azure LLM 2023 conversation trace from 600 s, outputs capped at "
             "1024 tokens; prefill-heavy, `.gpu_data/prefill_heavy.csv`, the output of "
             "`python benchmarks/prefill_heavy_trace.py` (prompts up to 4000 tokens, outputs capped at 128).",
             "- Each sweep reuses an earlier run's calibration (SLOs, capacity, trace rate), so its SLOs and "
             "offered load match that run's.", "",
             "Commands (`benchmarks/device_run.sh` on the GPU machine, `SWEEP_S=250`, 170 for swc_off2; its sweep part runs "
             "`benchmarks/headline.py --sweep-only`):", ""]
    for name, (calfile, runs) in WORKLOADS.items():
        for policy, sweeps in runs.items():
            for _, cmd in sweeps:
                lines.append(f"- {name}, {policy}: `CALIBRATION=benchmarks/results/headline/{calfile} "
                             f"bash benchmarks/device_run.sh {cmd}`")
    lines += ["", "Each call's tarball `TAG.tgz` became its raw folder by `python benchmarks/compact_raw.py TAG.tgz "
              "benchmarks/results/headline/raw/sweep_h200_<conv|ph>/TAG --part sweep`."]
    lines += ["", "| workload | policy | load fraction | offered req/s | P90 TTFT ms / SLO | P90 TPOT ms / SLO | "
              "refused / failed | goodput req/s (fraction) | mean tau | meets |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    summary = ["", "## Largest load fraction meeting the SLOs", ""]
    for name, (calfile, runs) in WORKLOADS.items():
        cal = json.loads((HEADLINE / calfile).read_text())["calibration"]
        best = {}
        for policy, sweeps in runs.items():
            rows = sorted((r for folder, _ in sweeps for r in points(raw / folder, cal)),
                          key=lambda r: r["load_fraction"])
            for r in rows:
                lines.append(
                    f"| {name} | {policy} | {r['load_fraction']:g} | {r['offered_req_s']:.1f} | "
                    f"{ms(r['p90_ttft_s'])} / {cal['slo_ttft_s'] * 1e3:.1f} | "
                    f"{ms(r['p90_tpot_s'])} / {cal['slo_tpot_s'] * 1e3:.1f} | {r['refused']} / {r['failed']} | "
                    f"{r['goodput_req_s']:.1f} ({r['goodput_fraction']:.2f}) | {r['mean_tau']:.2f} | "
                    f"{'yes' if r['meets_slo'] else 'no'} |")
            best[policy] = largest_met(rows, [f for _, cmd in sweeps for f in requested(cmd)])
        summary.append(f"- {name} (calibration `{calfile}`: capacity {cal['capacity_req_s']:.1f} req/s, "
                       f"SLO TTFT {cal['slo_ttft_s'] * 1e3:.1f} ms, TPOT {cal['slo_tpot_s'] * 1e3:.1f} ms):")
        for policy, (frac, _, note) in best.items():
            summary.append(f"  - {policy}: {'none' if frac is None else f'{frac:g}'} ({note})")
        base, base_above, _ = best[BASELINE]
        for policy, (frac, above, _) in best.items():
            if policy == BASELINE or frac is None or base is None:
                continue
            # each true value lies in [largest met, next measured point) when meeting the SLOs
            # falls with load; a largest met point that is the highest measured leaves that end open
            bounds = []
            if above:
                bounds.append(f"below {above / base:.2f}x ({policy} < {above:g}, {BASELINE} >= {base:g})")
            if base_above:
                bounds.append(f"above {frac / base_above:.2f}x ({policy} >= {frac:g}, {BASELINE} < {base_above:g})")
            else:
                bounds.append(f"no lower bound ({BASELINE} met the SLOs at every point up to its highest)")
            summary.append(f"  - {policy} / {BASELINE}: {frac / base:.2f}x at the measured points; the true "
                           f"ratio is {'; '.join(bounds)}")
    text = "\n".join(lines + summary) + "\n"
    args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
