"""Benchmark report from a run's requests.jsonl and metrics.jsonl (SPEC section 4).

Per request latencies (TTFT, TPOT, e2e, ITL; see brownout.bench.runs) each get
mean/P50/P90/P99. Throughput = output tokens of successful requests / run time;
goodput = requests per second that succeeded and met every SLO given (vLLM's
definition; a request with one output token has no TPOT and passes that check).
SLO-violation periods: the run is cut into 1-second windows; a window violates a latency
when the P90 of that latency over the requests whose first token (TTFT) or completion
(TPOT, e2e) falls in it exceeds the SLO. The fraction is over all windows of the run;
`reduction` = 1 - violations / baseline violations. Mean tau is time-weighted over the
/metrics scrapes within the run. `compare_runs` tabulates runs side by side, with an
optional eval table (tau -> perplexity) interpolated at each run's mean tau.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from brownout.bench.runs import (WINDOW_S, Run, bin_by_window, load_run, num_windows,
                                 request_latencies, stamp, succeeded)

logger = logging.getLogger(__name__)

WATCHED = ("ttft", "tpot", "e2e")
# a window violates an SLO when this percentile of its latencies exceeds it (the paper's P90)
VIOLATION_PERCENTILE = 90.0


def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"n": int(v.size), "mean": float(v.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99)}


def meets_slo(lat: dict[str, Any], slo: dict[str, Optional[float]]) -> bool:
    if lat["ttft"] is None:
        return False
    for key in WATCHED:
        limit = slo.get(key)
        if limit is not None and lat[key] is not None and lat[key] > limit:
            return False
    return True


# -- over time -------------------------------------------------------------------------
def violation_windows(times: Sequence[float], values: Sequence[float], slo: float,
                      start: float, end: float, window_s: float = WINDOW_S,
                      q: float = VIOLATION_PERCENTILE) -> dict[str, Any]:
    """Windows [start + i*w, start + (i+1)*w) whose q-th percentile value exceeds `slo`."""
    total = num_windows(start, end, window_s)
    bins = bin_by_window(times, values, window_s, start, total)
    bad = sorted(i for i, vs in bins.items() if np.percentile(vs, q) > slo)
    return {"count": len(bad), "total": total, "with_samples": len(bins),
            "fraction": len(bad) / total if total else 0.0, "windows": bad}


def time_weighted_mean(times: Sequence[float], values: Sequence[float],
                       start: float, end: float) -> Optional[float]:
    """Mean of a step function (each value holds until the next sample) over [start, end]."""
    pts = sorted((t, v) for t, v in zip(times, values) if v is not None and math.isfinite(v))
    if not pts or end <= start:
        return None
    area = span = 0.0
    for i, (t, v) in enumerate(pts):
        t_next = pts[i + 1][0] if i + 1 < len(pts) else end
        lo, hi = max(t, start), min(t_next, end)
        if hi > lo:
            area += v * (hi - lo)
            span += hi - lo
    if span == 0:
        before = [v for t, v in pts if t <= start]
        return before[-1] if before else pts[0][1]
    return area / span


# -- the report ------------------------------------------------------------------------
def compute_report(run: Run, slo_ttft: Optional[float] = None, slo_tpot: Optional[float] = None,
                   slo_e2e: Optional[float] = None, baseline: Optional[dict] = None,
                   window_s: float = WINDOW_S) -> dict[str, Any]:
    recs = run.requests
    slo = {"ttft": slo_ttft, "tpot": slo_tpot, "e2e": slo_e2e}
    lats = [request_latencies(r) for r in recs]
    starts = [r.get("first_sent", r.get("sent")) for r in recs]
    starts = [s for s in starts if s is not None]
    ends = [r["done"] for r in recs if r.get("done") is not None]
    start, end = (min(starts), max(ends)) if starts and ends else (0.0, 0.0)
    duration = end - start
    ok = [r for r in recs if succeeded(r)]
    good = sum(meets_slo(lat, slo) for lat in lats)
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in ok)

    def rate(x: float) -> Optional[float]:
        return x / duration if duration > 0 else None

    report: dict[str, Any] = {
        "label": run.label, "meta": run.meta, "slo": {f"{k}_s": v for k, v in slo.items()},
        "num_requests": len(recs), "num_ok": len(ok),
        "num_rejected": sum(bool(r.get("rejected")) for r in recs),
        "num_failed": len(recs) - len(ok), "duration_s": duration,
        # refused, errored or served past an SLO: every request the promise failed
        "num_missed": len(recs) - good,
        "throughput_tok_s": rate(out_tokens), "request_throughput": rate(len(ok)),
        "goodput_req_s": rate(good), "goodput_fraction": good / len(recs) if recs else None,
        "output_tokens": out_tokens,
        "latency": {k: summarize([lat[k] for lat in lats]) for k in WATCHED},
        "errors": _errors(recs)}
    report["latency"]["itl"] = summarize([g for lat in lats for g in lat["itl"]])
    report["violations"] = _violations(recs, lats, slo, start, end, window_s)
    report["tau"] = _mean_tau(run.metrics, start, end)
    report["ladder"] = _ladder(run.metrics, start, end)
    report["baseline"] = baseline.get("label") if baseline else None
    report["reduction_vs_baseline"] = reduction(report, baseline) if baseline else None
    return report


def _violations(recs, lats, slo, start, end, window_s) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bad_any: set[int] = set()
    total = 0
    for key in WATCHED:
        if slo[key] is None:
            continue
        times = [stamp(r, key) for r in recs]
        vals = [lat[key] for lat in lats]
        out[key] = violation_windows(times, vals, slo[key], start, end, window_s)
        bad_any.update(out[key]["windows"])
        total = out[key]["total"]
    out["any"] = {"count": len(bad_any), "total": total,
                  "fraction": len(bad_any) / total if total else 0.0, "windows": sorted(bad_any)}
    return out


def _mean_tau(metrics: list[dict[str, Any]], start: float, end: float) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for phase in ("prefill", "decode"):
        rows = [m for m in metrics if f"tau_{phase}" in m]
        out[phase] = time_weighted_mean([m["t"] for m in rows], [m[f"tau_{phase}"] for m in rows],
                                        start, end)
    known = [v for v in out.values() if v is not None]
    out["mean"] = sum(known) / len(known) if known else None  # both phases weigh the same
    return out


# the ladder's gauges in a scrape's `brownout` dict, and their names in the report
_LADDER_GAUGES = (("brownout_step_token_budget", "step_token_budget"),
                  ("brownout_running_cap", "running_cap"))


def _ladder(metrics: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """The rungs beside tau, from the scrapes: the step token budget and the running cap
    (time-weighted mean and minimum), the accuracy spent and the steps exempt from dimming
    (the last scrape's totals); a key is absent when the server does not export it."""
    out: dict[str, Any] = {}
    for key, name in _LADDER_GAUGES:
        rows = [m for m in metrics if key in (m.get("brownout") or {})]
        if rows:
            vals = [m["brownout"][key] for m in rows]
            out[f"mean_{name}"] = time_weighted_mean([m["t"] for m in rows], vals, start, end)
            out[f"min_{name}"] = min(vals)
    last = (metrics[-1].get("brownout") or {}) if metrics else {}
    spent = {w: last[f"brownout_accuracy_spent,weighting={w}"] for w in ("time", "token")
             if f"brownout_accuracy_spent,weighting={w}" in last}
    if spent:
        out["accuracy_spent"] = spent
    if "brownout_exempt_steps_total" in last:
        out["exempt_steps"] = last["brownout_exempt_steps_total"]
    return out


def _errors(recs: list[dict[str, Any]]) -> dict[str, int]:
    c: Counter = Counter()
    for r in recs:
        if succeeded(r):
            continue
        status = r.get("status")
        c[str(status) if status is not None and status != 200 else
          ("connection" if status is None else "stream")] += 1
    return dict(sorted(c.items()))


def reduction(report: dict, baseline: dict) -> dict[str, Optional[float]]:
    """1 - violations / baseline violations, per watched latency and overall."""
    out = {}
    for key, v in report["violations"].items():
        base = baseline.get("violations", {}).get(key, {}).get("count")
        out[key] = None if not base else 1.0 - v["count"] / base
    return out


# -- writing ---------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def report_markdown(report: dict[str, Any]) -> str:
    slo = report["slo"]
    lines = [f"# Benchmark report: {report['label']}", "",
             f"- requests: {report['num_requests']} (ok {report['num_ok']}, rejected "
             f"{report['num_rejected']}, failed {report['num_failed']}); run {_fmt(report['duration_s'], 1)} s",
             f"- SLOs: TTFT {_fmt(slo['ttft_s'])} s, TPOT {_fmt(slo['tpot_s'])} s, e2e {_fmt(slo['e2e_s'])} s",
             f"- throughput {_fmt(report['throughput_tok_s'], 1)} output tok/s, goodput "
             f"{_fmt(report['goodput_req_s'])} req/s ({_fmt(report['goodput_fraction'])} of requests)",
             f"- mean tau: prefill {_fmt(report['tau']['prefill'])}, decode "
             f"{_fmt(report['tau']['decode'])}", *_ladder_lines(report.get("ladder") or {}), "",
             "| latency (s) | n | mean | P50 | P90 | P99 |", "|---|---|---|---|---|---|"]
    for key, s in report["latency"].items():
        lines.append(f"| {key} | {s['n']} | " + " | ".join(_fmt(s[k], 4) for k in
                                                           ("mean", "p50", "p90", "p99")) + " |")
    lines += ["", "| SLO-violation windows (1 s) | count | of | fraction | reduction vs baseline |",
              "|---|---|---|---|---|"]
    red = report.get("reduction_vs_baseline") or {}
    for key, v in report["violations"].items():
        lines.append(f"| {key} | {v['count']} | {v['total']} | {_fmt(v['fraction'])} | "
                     f"{_fmt(red.get(key))} |")
    if report["errors"]:
        lines += ["", "Errors by status: " + ", ".join(f"{k}: {v}" for k, v in report["errors"].items())]
    return "\n".join(lines) + "\n"


def _ladder_lines(lad: dict[str, Any]) -> list[str]:
    lines = []
    if "accuracy_spent" in lad:
        a = lad["accuracy_spent"]
        lines.append(f"- accuracy spent (mean perplexity increase of the rungs used): "
                     f"{_fmt(a.get('time'))} by step time, {_fmt(a.get('token'))} by tokens")
    if "mean_step_token_budget" in lad:
        lines.append(f"- step token budget: mean {_fmt(lad['mean_step_token_budget'], 0)}, "
                     f"min {_fmt(lad['min_step_token_budget'], 0)}; running cap: mean "
                     f"{_fmt(lad.get('mean_running_cap'), 0)}, min {_fmt(lad.get('min_running_cap'), 0)}")
    if lad.get("exempt_steps"):
        lines.append(f"- steps run undimmed for an exempt class: {_fmt(lad['exempt_steps'], 0)}")
    return lines


def write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(report_markdown(report))


# -- comparing runs --------------------------------------------------------------------
def load_eval_table(path: str | Path) -> list[tuple[float, float]]:
    """(tau, perplexity) pairs from {"1.0": ppl, ...}, {"tau": [...], "perplexity": [...]},
    or a list (optionally under "results") of {"tau": t, "perplexity": p}."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "results" in data:
        data = data["results"]
    if isinstance(data, dict) and "tau" in data:
        pairs = zip(data["tau"], data.get("perplexity", data.get("ppl", [])))
    elif isinstance(data, dict):
        pairs = data.items()
    else:
        pairs = ((row["tau"], row.get("perplexity", row.get("ppl"))) for row in data)
    table = sorted((float(t), float(p)) for t, p in pairs if p is not None)
    if not table:
        raise ValueError(f"{path}: no (tau, perplexity) pairs found")
    return table


def accuracy_at(table: Sequence[tuple[float, float]], tau: Optional[float]) -> Optional[float]:
    """Linear interpolation of the eval table at `tau` (clamped to its range)."""
    if tau is None or not table:
        return None
    taus, vals = zip(*table)
    return float(np.interp(tau, taus, vals))


def compare_runs(run_dirs: Sequence[str | Path], out_dir: Optional[str | Path] = None, *,
                 slo_ttft: Optional[float] = None, slo_tpot: Optional[float] = None,
                 slo_e2e: Optional[float] = None, baseline_label: str = "off",
                 eval_table: Optional[str | Path] = None, plots: bool = True) -> dict[str, Any]:
    """Reports of several runs on common SLOs, the baseline's violations as reference."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no runs to compare")
    base_run = next((r for r in runs if r.label == baseline_label), runs[0])
    meta_slo = next((r.meta["slo"] for r in (base_run, *runs) if r.meta.get("slo")), {})
    slo = dict(slo_ttft=slo_ttft if slo_ttft is not None else meta_slo.get("ttft_s"),
               slo_tpot=slo_tpot if slo_tpot is not None else meta_slo.get("tpot_s"),
               slo_e2e=slo_e2e if slo_e2e is not None else meta_slo.get("e2e_s"))
    base = compute_report(base_run, **slo)
    table = load_eval_table(eval_table) if eval_table else None
    rows = []
    for run in runs:
        rep = base if run is base_run else compute_report(run, baseline=base, **slo)
        red = reduction(rep, base)["any"] if run is not base_run else None
        rows.append({
            "label": run.label, "policy": run.meta.get("policy", run.label),
            "violations": rep["violations"]["any"]["count"],
            "violation_fraction": rep["violations"]["any"]["fraction"], "reduction": red,
            "goodput_req_s": rep["goodput_req_s"], "throughput_tok_s": rep["throughput_tok_s"],
            "p90_ttft_s": rep["latency"]["ttft"]["p90"], "p90_tpot_s": rep["latency"]["tpot"]["p90"],
            "mean_tau": rep["tau"]["mean"], "rejected": rep["num_rejected"], "missed": rep["num_missed"],
            "accuracy_spent": rep["ladder"].get("accuracy_spent", {}).get("time"),
            "perplexity": accuracy_at(table, rep["tau"]["mean"]) if table else None})
    result = {"baseline": base_run.label, "slo": slo, "rows": rows}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "comparison.json").write_text(json.dumps(result, indent=2))
        (out_dir / "comparison.md").write_text(comparison_markdown(result))
        if plots:
            # lazy: plots pull in matplotlib, which reports without plots never need
            from brownout.bench.plots import plot_comparison
            plot_comparison(runs, out_dir, slo_ttft=slo["slo_ttft"], slo_tpot=slo["slo_tpot"])
    return result


COMPARE_COLUMNS = (("label", "run", 0), ("violations", "violation windows", 0),
                   ("violation_fraction", "fraction", 3), ("reduction", "reduction vs base", 3),
                   ("goodput_req_s", "goodput req/s", 3), ("throughput_tok_s", "tok/s", 1),
                   ("p90_ttft_s", "P90 TTFT s", 3), ("p90_tpot_s", "P90 TPOT s", 4),
                   ("mean_tau", "mean tau", 3), ("rejected", "rejected", 0), ("missed", "missed", 0),
                   ("accuracy_spent", "accuracy spent", 3), ("perplexity", "ppl @ mean tau", 2))


def comparison_markdown(result: dict[str, Any]) -> str:
    head = [name for _, name, _ in COMPARE_COLUMNS]
    lines = [f"Baseline: {result['baseline']}; SLOs: " +
             ", ".join(f"{k[4:]} {_fmt(v)} s" for k, v in result["slo"].items() if v is not None), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_fmt(row[k], d) if isinstance(row[k], float) else _fmt(row[k])
                                       for k, _, d in COMPARE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
