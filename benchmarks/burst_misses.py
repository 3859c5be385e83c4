"""Where a headline run's missed requests come from: per policy, the requests that arrived in
the burst, how many were refused, served, served within both SLOs, and the served ones late
on TTFT or TPOT (with the late TTFTs' median), from the committed raw requests files; and
the running cap the /metrics scrapes read during the burst (min-max).
  python benchmarks/burst_misses.py 26 27 28 --out benchmarks/results/headline/burst_misses_h200.md
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

HEADLINE = Path(__file__).resolve().parent / "results" / "headline"


def rows(run: int, gpu: str = "h200") -> list[list[str]]:
    summary = json.loads((HEADLINE / f"headline_{gpu}_run{run}.json").read_text())
    cal, (t0, t1) = summary["calibration"], summary["burst_window_s"]
    out = []
    for row in summary["rows"]:
        path = HEADLINE / "raw" / f"headline_{gpu}_run{run}" / row["label"] / "requests.jsonl.gz"
        reqs = [json.loads(line) for line in gzip.open(path, "rt")]
        burst = [r for r in reqs if t0 <= r["scheduled"] < t1]
        served = [r for r in burst if r["status"] == 200 and not r["rejected"]]
        ttft = [r["first_token"] - r["sent"] for r in served]
        tpot = [(r["done"] - r["first_token"]) / max(r["output_tokens"] - 1, 1) for r in served]
        late_ttft = [t for t in ttft if t > cal["slo_ttft_s"]]
        late_tpot = sum(t > cal["slo_tpot_s"] for t in tpot)
        good = sum(a <= cal["slo_ttft_s"] and b <= cal["slo_tpot_s"] for a, b in zip(ttft, tpot))
        scrapes = [json.loads(line) for line in gzip.open(path.with_name("metrics.jsonl.gz"), "rt")]
        caps = [s["brownout"]["brownout_running_cap"] for s in scrapes
                if t0 <= s["t"] < t1 and "brownout_running_cap" in s.get("brownout", {})]
        out.append([str(run), row["label"], str(len(burst)), str(len(burst) - len(served)), str(len(served)),
                    f"{good} ({good / (t1 - t0):.1f}/s)", str(len(late_ttft)),
                    f"{statistics.median(late_ttft) * 1e3:.0f}" if late_ttft else "-", str(late_tpot),
                    f"{cal['slo_ttft_s'] * 1e3:.0f} / {cal['slo_tpot_s'] * 1e3:.1f}",
                    f"{min(caps):.0f}-{max(caps):.0f}" if caps else "-"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=int, nargs="+")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    lines = ["# Missed requests of the burst, by cause", "",
             f"Made by `python benchmarks/burst_misses.py {' '.join(map(str, args.runs))} --out {args.out}` "
             "from the runs' raw requests files (requests scheduled inside the burst window).", "",
             "| run | policy | burst arrivals | refused or failed | served | within both SLOs | "
             "late TTFT | late TTFT median ms | late TPOT | SLO TTFT ms / TPOT ms | running cap in the burst |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in args.runs:
        lines += ["| " + " | ".join(r) + " |" for r in rows(run, args.gpu)]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
