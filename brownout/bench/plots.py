"""PNG plots of benchmark runs (matplotlib, Agg canvas; no pyplot global state).

Per run: latency over time against the SLO line, tau over time, offered vs served
request rate, queue depth. Across runs: the same curves overlaid, one colour per run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from brownout.bench.runs import WINDOW_S, Run, bin_by_window, request_latencies, stamp

logger = logging.getLogger(__name__)

# the curve drawn per window: this percentile of its latencies (the report judges P90 too)
CURVE_PERCENTILE = 90


def _figure(rows: int = 1, height: float = 3.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(9, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _legend(ax, loc: str) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
        ax.legend(loc=loc, fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def p90_per_window(run: Run, key: str, window_s: float = WINDOW_S) -> tuple[np.ndarray, np.ndarray]:
    """(window start, P90 of `key`) for windows with samples; TTFT at first token, else done."""
    bins = bin_by_window([stamp(rec, key) for rec in run.requests],
                         [request_latencies(rec)[key] for rec in run.requests], window_s)
    keys = sorted(bins)
    return (np.array(keys, dtype=float) * window_s,
            np.array([np.percentile(bins[k], CURVE_PERCENTILE) for k in keys]))


def rate_per_window(times: Sequence[Optional[float]], window_s: float = WINDOW_S,
                    end: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    t = np.array([x for x in times if x is not None], dtype=float)
    if t.size == 0:
        return np.empty(0), np.empty(0)
    edges = np.arange(0.0, max(end or 0.0, t.max()) + window_s, window_s)
    counts, _ = np.histogram(t, bins=edges)
    return edges[:-1], counts / window_s


def _series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [m for m in run.metrics if m.get(key) is not None]
    return np.array([m["t"] for m in rows]), np.array([m[key] for m in rows])


def plot_latency(run: Run, path: Path, slo_ttft=None, slo_tpot=None) -> Path:
    fig, axes = _figure(2)
    for ax, key, slo in ((axes[0], "ttft", slo_ttft), (axes[1], "tpot", slo_tpot)):
        pts = [(stamp(r, key), request_latencies(r)[key]) for r in run.requests]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            ax.scatter(*zip(*pts), s=4, alpha=0.3, label="requests")
        ax.plot(*p90_per_window(run, key), drawstyle="steps-post", label="P90 per second")
        if slo:
            ax.axhline(slo, color="red", linestyle="--", label=f"SLO {slo:g} s")
        ax.set_ylabel(f"{key.upper()} (s)")
        _legend(ax, "upper right")
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(f"{run.label}: latency over time")
    return _save(fig, path)


def plot_tau(run: Run, path: Path) -> Path:
    fig, (ax,) = _figure()
    for phase in ("prefill", "decode"):
        t, v = _series(run, f"tau_{phase}")
        if t.size:
            ax.plot(t, v, drawstyle="steps-post", label=phase)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("tau")
    ax.set_xlabel("time (s)")
    _legend(ax, "lower right")
    fig.suptitle(f"{run.label}: brownout threshold")
    return _save(fig, path)


def plot_rates(run: Run, path: Path) -> Path:
    fig, (ax,) = _figure()
    reqs = run.requests
    end = max((r.get("done") or 0.0 for r in reqs), default=0.0)
    ax.plot(*rate_per_window([r.get("scheduled") for r in reqs], end=end),
            drawstyle="steps-post", label="offered")
    ok = [r.get("done") for r in reqs if r.get("status") == 200 and not r.get("error")]
    ax.plot(*rate_per_window(ok, end=end), drawstyle="steps-post", label="served")
    rejected = [r.get("done") for r in reqs if r.get("rejected")]
    if rejected:
        ax.plot(*rate_per_window(rejected, end=end), drawstyle="steps-post", label="rejected")
    ax.set_ylabel("requests / s")
    ax.set_xlabel("time (s)")
    _legend(ax, "upper right")
    fig.suptitle(f"{run.label}: offered vs served rate")
    return _save(fig, path)


def plot_queue(run: Run, path: Path) -> Path:
    fig, (ax,) = _figure()
    for key in ("running", "waiting"):
        t, v = _series(run, key)
        if t.size:
            ax.plot(t, v, drawstyle="steps-post", label=key)
    ax.set_ylabel("requests")
    ax.set_xlabel("time (s)")
    t, v = _series(run, "kv_cache_usage")
    if t.size:
        ax2 = ax.twinx()
        ax2.plot(t, v, color="grey", linestyle=":", drawstyle="steps-post", label="KV cache use")
        ax2.set_ylabel("KV cache use")
        _legend(ax2, "upper left")
    _legend(ax, "upper right")
    fig.suptitle(f"{run.label}: queue depth")
    return _save(fig, path)


def plot_run(run: Run, out_dir: str | Path, slo_ttft: Optional[float] = None,
             slo_tpot: Optional[float] = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_latency(run, out_dir / "latency.png", slo_ttft, slo_tpot),
            plot_tau(run, out_dir / "tau.png"), plot_rates(run, out_dir / "rate.png"),
            plot_queue(run, out_dir / "queue.png")]


def plot_comparison(runs: Sequence[Run], out_dir: str | Path, slo_ttft: Optional[float] = None,
                    slo_tpot: Optional[float] = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = _figure(2)
    for run in runs:
        for ax, key in zip(axes, ("ttft", "tpot")):
            ax.plot(*p90_per_window(run, key), drawstyle="steps-post", label=run.label)
    for ax, key, slo in zip(axes, ("TTFT", "TPOT"), (slo_ttft, slo_tpot)):
        if slo:
            ax.axhline(slo, color="red", linestyle="--", label="SLO")
        ax.set_ylabel(f"P90 {key} (s)")
        _legend(ax, "upper right")
    axes[-1].set_xlabel("time (s)")
    paths = [_save(fig, out_dir / "compare_latency.png")]
    fig, axes = _figure(2)
    for run in runs:
        t, v = _series(run, "tau_decode")
        if t.size:
            axes[0].plot(t, v, drawstyle="steps-post", label=run.label)
        end = max((r.get("done") or 0.0 for r in run.requests), default=0.0)
        ok = [r.get("done") for r in run.requests if r.get("status") == 200 and not r.get("error")]
        axes[1].plot(*rate_per_window(ok, end=end), drawstyle="steps-post", label=run.label)
    axes[0].set_ylabel("decode tau")
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("served req/s")
    axes[1].set_xlabel("time (s)")
    for ax in axes:
        _legend(ax, "lower right")
    paths.append(_save(fig, out_dir / "compare_tau_served.png"))
    return paths
