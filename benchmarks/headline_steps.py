"""Where a headline run's engine time went: step counts and mean step latency by phase
(steps with prefill work vs decode-only steps), per window, from the server's /metrics
scrapes that the bench client saved (metrics.jsonl, or its compact metrics.jsonl.gz, of each
policy run); for the policy runs also the share of the burst's wall time spent inside steps,
the host time between them, the mean tau the scrapes found in the burst, and the paper's
step-latency violation windows.

Run: python benchmarks/headline_steps.py HEADLINE_DIR [--window 3] [--out FILE.json]
HEADLINE_DIR is headline.py's output directory or its compact copy
(benchmarks/results/headline/raw/<name>/); the table is committed as
benchmarks/results/headline/<name>_steps.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from compact_raw import jsonl_file, read_jsonl

PHASES = ("prefill", "decode")


def _key(kind: str, phase: str) -> str:
    return f"brownout_step_latency_seconds_{kind},phase={phase}"


def _delta(prev: dict, cur: dict, key: str) -> float:
    """How far a scraped counter moved between two scrapes."""
    return cur["brownout"].get(key, 0.0) - prev["brownout"].get(key, 0.0)


def step_table(metrics: list[dict], window: int) -> list[dict]:
    """One row per `window` scrapes: steps, mean step seconds and busy seconds per phase."""
    rows = []
    for prev, cur in zip(metrics[::window], metrics[window::window]):
        row = dict(t=round(cur["t"], 1), running=cur["running"], waiting=cur["waiting"],
                   tau_prefill=cur["tau_prefill"], tau_decode=cur["tau_decode"])
        for phase in PHASES:
            n, s = _delta(prev, cur, _key("count", phase)), _delta(prev, cur, _key("sum", phase))
            row[f"{phase}_steps"], row[f"{phase}_busy_s"] = n, s
            row[f"{phase}_mean_ms"] = 1e3 * s / n if n else None
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    busy = {p: sum(r[f"{p}_busy_s"] for r in rows) for p in PHASES}
    steps = {p: sum(r[f"{p}_steps"] for r in rows) for p in PHASES}
    total = sum(busy.values()) or 1.0
    return {p: dict(steps=steps[p], busy_s=busy[p], share_of_busy=busy[p] / total,
                    mean_ms=1e3 * busy[p] / steps[p] if steps[p] else None) for p in PHASES}


def busy_between(metrics: list[dict], t0: float, t1: float) -> Optional[dict]:
    """Share of the wall time in [t0, t1] the engine spent inside steps, and the host time
    per step between them (scrapes nearest to t0 and t1)."""
    inside = [m for m in metrics if t0 <= m["t"] <= t1]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    busy = sum(_delta(a, b, _key("sum", p)) for p in PHASES)
    steps = sum(_delta(a, b, _key("count", p)) for p in PHASES)
    wall = b["t"] - a["t"]
    out = dict(t0=a["t"], t1=b["t"], busy_fraction=busy / wall, steps_per_s=steps / wall,
               host_ms_between_steps=1e3 * (wall - busy) / steps if steps else None)
    for p in PHASES:  # mean step latency by phase inside the window
        n, s = _delta(a, b, _key("count", p)), _delta(a, b, _key("sum", p))
        out[f"{p}_mean_ms"] = 1e3 * s / n if n else None
        # the tau each scrape found the controller at (its last choice), averaged over the window
        out[f"tau_{p}_mean"] = sum(m[f"tau_{p}"] for m in inside) / len(inside)
    return out


def step_violation_windows(metrics: list[dict]) -> list[int]:
    """The paper's SLO-violation periods: seconds (scrape to scrape) in which more than 10% of
    either phase's steps exceeded that phase's step SLO, i.e. the window's P90 step latency is
    over the SLO (the server counts steps over its SLO in brownout_slo_violations_total)."""
    out = []
    for prev, cur in zip(metrics, metrics[1:]):
        for phase in PHASES:
            n = _delta(prev, cur, _key("count", phase))
            over = _delta(prev, cur, f"brownout_slo_violations_total,kind={phase}_step")
            if n > 0 and over > 0.1 * n:
                out.append(int(round(cur["t"])))
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("headline_dir", type=Path)
    ap.add_argument("--window", type=int, default=3, help="scrapes (about seconds) per row")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {}
    # the burst window and policy runs of headline.py's summary, when there is one
    summary_file = args.headline_dir / "headline.json"
    head = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    burst = head.get("burst_window_s")
    policies = {r["label"] for r in head.get("rows", [])}
    for run in sorted(p for p in args.headline_dir.iterdir() if p.is_dir() and jsonl_file(p, "metrics")):
        metrics = read_jsonl(jsonl_file(run, "metrics"))
        rows = step_table(metrics, args.window)
        result[run.name] = dict(summary=summarize(rows), windows=rows)
        if burst is not None and run.name in policies:
            result[run.name]["burst"] = busy_between(metrics, *burst)
            result[run.name]["step_violation_windows"] = step_violation_windows(metrics)
        s = result[run.name]["summary"]
        print(f"{run.name:24s} " + "  ".join(
            f"{p}: {s[p]['steps']:.0f} steps, mean {s[p]['mean_ms'] or 0:.1f} ms, "
            f"{100 * s[p]['share_of_busy']:.0f}% of busy time" for p in PHASES))
        if result[run.name].get("burst"):
            bb = result[run.name]["burst"]
            print(f"{'':24s} burst: engine busy {100 * bb['busy_fraction']:.0f}% of wall time, "
                  f"{bb['host_ms_between_steps']:.1f} ms of host time between steps, steps with "
                  f"prefill {bb['prefill_mean_ms'] or 0:.1f} ms, decode {bb['decode_mean_ms'] or 0:.1f} ms")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
