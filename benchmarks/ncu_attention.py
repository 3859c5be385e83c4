"""Decode attention under Nsight Compute: the workload and the table of what ncu read.

`run` makes the decode attention calls of one case (batch, context; Qwen1.5-MoE-A2.7B's
attention as `bench_attention.py` builds it, the device table's tiles) for ncu to capture;
`table` turns ncu's CSV of each case into one markdown table of the metrics in METRICS.

On the GPU machine (ncu reads the hardware counters on the Firecracker runtime only):
  ncu --clock-control none --kernel-name regex:'_attn_kernel|_merge_kernel' \
      --launch-skip 4 --launch-count 2 --metrics $(python3 benchmarks/ncu_attention.py metrics) \
      --csv --page raw python3 benchmarks/ncu_attention.py run --batch 64 --ctx 512 > b64_512.csv
  python benchmarks/ncu_attention.py table b64_512.csv ... --out attention_ncu.md
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what each kernel launch is asked for: time, the DRAM's share of its peak, occupancy and
# resources, and the average warp's stall reasons per issued instruction (the reasons a
# memory-bound loop stalls on: long scoreboard = global loads, barrier, wait = fixed
# latencies, the selected / not selected pair = issuing)
METRICS = {
    "gpu__time_duration.sum": "duration (ns)",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM throughput (% of peak)",
    "dram__bytes_read.sum": "DRAM bytes read",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM throughput (% of peak)",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy (%)",
    "launch__registers_per_thread": "registers / thread",
    "launch__shared_mem_per_block_dynamic": "dynamic shared memory / block (B)",
    "launch__occupancy_limit_shared_mem": "blocks / SM by shared memory",
    "launch__grid_size": "programs",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "stall: long scoreboard",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "stall: barrier",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": "stall: wait",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio": "stall: short scoreboard",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio": "stall: math pipe throttle",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio": "stall: MIO throttle",
    "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio": "stall: LG throttle",
    "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio": "stall: not selected",
    "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio": "selected",
    "smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio": "stall: no instruction",
    "smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio": "stall: dispatch",
}
WARMUP_CALLS = 4  # compile and first-touch calls; the ncu command skips this many launches
CAPTURED_CALLS = 2  # then captures this many (of each kernel the regex names)


def run(batch: int, ctx: int) -> None:
    import torch

    from bench_attention import HEAD_DIM, HEADS, Case

    case = Case(batch, ctx, HEADS, HEAD_DIM, "cuda", smoke=False)
    for i in range(WARMUP_CALLS + CAPTURED_CALLS):
        case.call(None, i % case.layers)  # tiles None: the device table's, as the engine takes them
    torch.cuda.synchronize()


def parse(text: str) -> list[dict]:
    """ncu's CSV -> one dict per launch (metric name -> value string). `--page raw` gives a
    row a launch (its second row the units); `--page details` a row a metric, pivoted here
    by launch ID onto the metrics' display names."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]  # drop ncu's own log lines
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 2:
        return []
    head = rows[0]
    if "Metric Name" not in head:
        return [dict(zip(head, r)) for r in rows[2:]]
    launches: dict[str, dict] = {}
    for r in rows[1:]:
        d = dict(zip(head, r))
        one = launches.setdefault(d["ID"], {"Kernel Name": d.get("Kernel Name", "?")})
        one[f"{d['Metric Name']} ({d.get('Metric Unit', '')})"] = d["Metric Value"]
    return list(launches.values())


def table(paths: list[Path], out: Path) -> None:
    lines = ["# Decode attention under Nsight Compute", "",
             "Made by `python benchmarks/ncu_attention.py table ...` from ncu's CSV of each case "
             "(the command in benchmarks/ncu_attention.py): the device table's tiles, bf16, "
             "Hq = Hkv = 16, head dim 128, cache block 16; ncu flushes the caches before each "
             "launch it measures, so every launch reads the KV from HBM. Stall rows: the average "
             "warp's cycles in that state per issued instruction.", ""]
    cols, names = [], []
    for path in paths:
        for n, launch in enumerate(parse(path.read_text())):
            cols.append(launch)
            names.append(f"{path.stem} {launch.get('Kernel Name', '?')[:14]} #{n}")
    lines.append("| metric | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    raw = any(k in c for c in cols for k in METRICS)
    keys = dict(METRICS) if raw else \
        {k: k for k in dict.fromkeys(k for c in cols for k in c if k != "Kernel Name")}
    for key, label in keys.items():
        lines.append(f"| {label} | " + " | ".join(c.get(key, "-") for c in cols) + " |")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--ctx", type=int, required=True)
    sub.add_parser("metrics")
    t = sub.add_parser("table")
    t.add_argument("csv", nargs="+", type=Path)
    t.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.batch, args.ctx)
    elif args.cmd == "metrics":
        print(",".join(METRICS))
    else:
        table(args.csv, args.out)


if __name__ == "__main__":
    main()
