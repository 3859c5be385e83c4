"""One self-contained HTML report of benchmark runs: the charts of the PNG plots
(brownout.bench.plots), drawn in the browser by the uPlot library vendored in the package
(brownout/api/static/vendor/uplot/), whose script and style are inlined, so the file opens
offline with no server.

`write_html_report(out_dir)` finds every configured run under `out_dir` (a directory with
requests.jsonl and a meta.json naming its policy; calibration runs name none), groups them
by their parent directory (one section each, e.g. the demo's two parts) and draws, per
section, the runs overlaid (P90 TTFT and TPOT against their SLOs, decode tau, served rate),
then per run its latency, tau, offered vs served rate and queue depth.
"""

from __future__ import annotations

import html
import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from brownout.bench.plots import p90_per_window, rate_per_window
from brownout.bench.runs import Run, load_run, request_latencies, stamp

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
VENDOR = ("brownout.api", "static/vendor/uplot")  # package, folder of the vendored uPlot
FRACTION_RANGE = (0.0, 1.05)  # tau and KV usage are fractions


def _clean(values) -> list[Optional[float]]:
    """JSON numbers; NaN and infinities become null (gaps)."""
    return [None if v is None or not math.isfinite(float(v)) else round(float(v), 6) for v in values]


def _line(label: str, x, y, kind: str = "step") -> dict[str, Any]:
    return {"label": label, "x": _clean(x), "y": _clean(y), "kind": kind}


def _slo_line(slo: Optional[float], xs: Sequence[dict]) -> list[dict[str, Any]]:
    points = [v for s in xs for v in s["x"] if v is not None]
    if not slo or not points:
        return []
    return [_line(f"SLO {slo:g} s", [min(points), max(points)], [slo, slo], "slo")]


def _chart(title: str, ylabel: str, series: list[dict], yrange=None) -> dict[str, Any]:
    return {"title": title, "ylabel": ylabel, "series": series, "range": yrange}


def _metric_series(run: Run, key: str) -> tuple[list, list]:
    rows = [m for m in run.metrics if m.get(key) is not None]
    return [m["t"] for m in rows], [m[key] for m in rows]


def _served(run: Run) -> tuple[np.ndarray, np.ndarray]:
    reqs = run.requests
    end = max((r.get("done") or 0.0 for r in reqs), default=0.0)
    ok = [r.get("done") for r in reqs if r.get("status") == 200 and not r.get("error")]
    return rate_per_window(ok, end=end)


def run_charts(run: Run, slo_ttft: Optional[float], slo_tpot: Optional[float]) -> list[dict]:
    """The four PNG plots of one run, as chart specs."""
    charts = []
    for key, slo in (("ttft", slo_ttft), ("tpot", slo_tpot)):
        pts = [(stamp(r, key), request_latencies(r)[key]) for r in run.requests]
        pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
        series = [_line("requests", [p[0] for p in pts], [p[1] for p in pts], "points"),
                  _line("P90 per second", *p90_per_window(run, key))]
        charts.append(_chart(f"{run.label}: {key.upper()} over time", f"{key.upper()} (s)",
                             series + _slo_line(slo, series)))
    charts.append(_chart(f"{run.label}: brownout threshold", "tau",
                         [_line(p, *_metric_series(run, f"tau_{p}")) for p in ("prefill", "decode")],
                         FRACTION_RANGE))
    reqs = run.requests
    end = max((r.get("done") or 0.0 for r in reqs), default=0.0)
    rates = [_line("offered", *rate_per_window([r.get("scheduled") for r in reqs], end=end)),
             _line("served", *_served(run))]
    rejected = [r.get("done") for r in reqs if r.get("rejected")]
    if rejected:
        rates.append(_line("rejected", *rate_per_window(rejected, end=end)))
    charts.append(_chart(f"{run.label}: offered vs served rate", "requests / s", rates))
    queue = [_line(k, *_metric_series(run, k)) for k in ("running", "waiting")]
    charts.append(_chart(f"{run.label}: queue depth", "requests", queue))
    charts.append(_chart(f"{run.label}: KV cache use", "KV cache use",
                         [_line("KV cache use", *_metric_series(run, "kv_cache_usage"))], FRACTION_RANGE))
    return charts


def comparison_charts(runs: Sequence[Run], slo_ttft: Optional[float],
                      slo_tpot: Optional[float]) -> list[dict]:
    """The comparison PNGs' curves: the runs overlaid, one colour each."""
    charts = []
    for key, slo in (("ttft", slo_ttft), ("tpot", slo_tpot)):
        series = [_line(run.label, *p90_per_window(run, key)) for run in runs]
        charts.append(_chart(f"P90 {key.upper()} per second", f"P90 {key.upper()} (s)",
                             series + _slo_line(slo, series)))
    charts.append(_chart("decode tau", "decode tau",
                         [_line(run.label, *_metric_series(run, "tau_decode")) for run in runs],
                         FRACTION_RANGE))
    charts.append(_chart("served requests per second", "served req/s",
                         [_line(run.label, *_served(run)) for run in runs]))
    return charts


def find_runs(out_dir: Path) -> dict[str, list[Run]]:
    """Configured runs under `out_dir` by their parent folder (relative), in start order."""
    groups: dict[str, list[Run]] = {}
    for meta_path in sorted(out_dir.rglob("meta.json")):
        run_dir = meta_path.parent
        meta = json.loads(meta_path.read_text())
        if meta.get("policy") is None or not (run_dir / "requests.jsonl").is_file():
            continue
        parent = run_dir.parent.relative_to(out_dir).as_posix()
        groups.setdefault(parent, []).append(load_run(run_dir))
    for runs in groups.values():
        runs.sort(key=lambda run: str(run.meta.get("started_at") or ""))
    return groups


def _slos(runs: Sequence[Run]) -> tuple[Optional[float], Optional[float]]:
    slo = next((run.meta.get("slo") for run in runs if run.meta.get("slo")), None) or {}
    return slo.get("ttft_s"), slo.get("tpot_s")


def report_spec(groups: dict[str, list[Run]], title: str) -> dict[str, Any]:
    sections = []
    for name, runs in groups.items():
        slo_ttft, slo_tpot = _slos(runs)
        workload = runs[0].meta.get("workload") or ""
        sections.append({"title": name if name != "." else title, "subtitle": workload,
                         "charts": comparison_charts(runs, slo_ttft, slo_tpot),
                         "runs": [{"title": run.label, "charts": run_charts(run, slo_ttft, slo_tpot)}
                                  for run in runs]})
    return {"title": title, "sections": sections}


def _vendored(name: str) -> str:
    package, folder = VENDOR
    return (resources.files(package) / folder / name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """Text that cannot close the <script> or <style> element it is inlined in."""
    return text.replace("</", "<\\/")


def render_html(spec: dict[str, Any]) -> str:
    data = json.dumps(spec, separators=(",", ":"), allow_nan=False)
    return (PAGE.replace("@TITLE@", html.escape(spec["title"]))
            .replace("@UPLOT_CSS@", _script_safe(_vendored("uPlot.min.css")))
            .replace("@UPLOT_JS@", _script_safe(_vendored("uPlot.iife.min.js")))
            .replace("@DATA@", _script_safe(data)))


def write_html_report(out_dir: str | Path, title: Optional[str] = None) -> Optional[Path]:
    """`out_dir`/report.html over every configured run under `out_dir`; None if there is none."""
    out_dir = Path(out_dir)
    groups = find_runs(out_dir)
    if not groups:
        logger.warning("no benchmark runs under %s: no HTML report", out_dir)
        return None
    path = out_dir / REPORT_NAME
    path.write_text(render_html(report_spec(groups, title or f"brownout benchmark: {out_dir.name}")),
                    encoding="utf-8")
    logger.info("HTML report: %s", path)
    return path


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title>
<style>@UPLOT_CSS@</style>
<style>
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 0.5em; }
.sub { color: #666; font-size: 0.9em; }
details { margin: 0.5em 0; }
</style></head>
<body><h1>@TITLE@</h1><div id="report"></div>
<script>@UPLOT_JS@</script>
<script>
"use strict";
const SPEC = @DATA@;
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const step = uPlot.paths.stepped({align: 1});

function seriesOpts(s, i) {
  if (s.kind === "slo") return {label: s.label, stroke: "#d62728", dash: [6, 4], width: 1, spanGaps: true};
  const colour = COLOURS[i % COLOURS.length];
  if (s.kind === "points") {
    return {label: s.label, stroke: colour, fill: colour + "55", paths: () => null,
            points: {show: true, size: 3, fill: colour + "55"}};
  }
  return {label: s.label, stroke: colour, width: 1.5, paths: step, spanGaps: true, points: {show: false}};
}

function drawChart(chart, parent) {
  const box = document.createElement("div");
  parent.appendChild(box);
  const series = chart.series.filter(s => s.x.length > 0);
  if (series.length === 0) { box.textContent = chart.title + ": no data"; return; }
  const data = uPlot.join(series.map(s => [s.x, s.y]));
  const range = chart.range || ((u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1]);
  const lineIndex = {n: 0};
  new uPlot({
    title: chart.title, width: 600, height: 230,
    scales: {x: {time: false}, y: {range: range}},
    axes: [{label: "time (s)"}, {label: chart.ylabel}],
    series: [{label: "t (s)"}].concat(series.map(s => seriesOpts(s, s.kind === "slo" ? 0 : lineIndex.n++))),
  }, data, box);
}

function drawCharts(charts, parent) {
  const grid = document.createElement("div");
  grid.className = "charts";
  parent.appendChild(grid);
  charts.forEach(c => drawChart(c, grid));
}

const root = document.getElementById("report");
for (const section of SPEC.sections) {
  const h = document.createElement("h2");
  h.textContent = section.title;
  root.appendChild(h);
  const sub = document.createElement("div");
  sub.className = "sub";
  sub.textContent = section.subtitle;
  root.appendChild(sub);
  drawCharts(section.charts, root);
  for (const run of section.runs) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "run " + run.title;
    details.appendChild(summary);
    root.appendChild(details);
    drawCharts(run.charts, details);
  }
}
</script></body></html>
"""
