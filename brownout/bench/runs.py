"""A benchmark run as the bench client wrote it, per-request latencies, and time windows.

A run directory holds requests.jsonl (one record per request, client times), metrics.jsonl
(the server's /metrics scrapes) and meta.json. Per request (times from the client):
TTFT = first text chunk - first send; e2e = done - first send; TPOT = (e2e - TTFT) /
(output tokens - 1); ITL = gaps between text chunks. Over time, a latency is stamped when it
becomes known (TTFT at the first token, TPOT and e2e at completion) and binned into windows
of `WINDOW_S`; the report counts SLO-violating windows and the plots draw them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

# the SLO-violation periods of the report and the P90 curves of the plots use 1-second windows
WINDOW_S = 1.0
# window counts round (end - start) / window_s up, forgiving this much float error
WINDOW_COUNT_SLACK = 1e-9


@dataclass
class Run:
    requests: list[dict[str, Any]]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.meta.get("label") or "run")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none when the file is absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "requests.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no requests.jsonl")
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("label", run_dir.name)
    return Run(read_jsonl(run_dir / "requests.jsonl"), read_jsonl(run_dir / "metrics.jsonl"), meta)


# -- per request -----------------------------------------------------------------------
def succeeded(rec: dict[str, Any]) -> bool:
    return rec.get("status") == 200 and not rec.get("error") and rec.get("first_token") is not None


def request_latencies(rec: dict[str, Any]) -> dict[str, Any]:
    """ttft, e2e, tpot (None when undefined) and the request's inter-token gaps."""
    start = rec.get("first_sent", rec.get("sent"))
    out: dict[str, Any] = {"ttft": None, "e2e": None, "tpot": None, "itl": []}
    if not succeeded(rec) or start is None:
        return out
    out["ttft"] = rec["first_token"] - start
    out["e2e"] = rec["done"] - start
    n = int(rec.get("output_tokens") or 0)
    if n > 1:
        out["tpot"] = (out["e2e"] - out["ttft"]) / (n - 1)
    times = rec.get("token_times") or []
    out["itl"] = list(np.diff(times)) if len(times) > 1 else []
    return out


def stamp(rec: dict[str, Any], key: str) -> Optional[float]:
    """When latency `key` of a request became known: TTFT at the first token, else at done."""
    return rec.get("first_token") if key == "ttft" else rec.get("done")


# -- over time -------------------------------------------------------------------------
def num_windows(start: float, end: float, window_s: float = WINDOW_S) -> int:
    """Windows [start + i*w, start + (i+1)*w) that cover [start, end] (at least one)."""
    if end <= start:
        return 0
    return max(1, math.ceil((end - start) / window_s - WINDOW_COUNT_SLACK))


def bin_by_window(times: Sequence[Optional[float]], values: Sequence[Optional[float]],
                  window_s: float = WINDOW_S, start: float = 0.0,
                  total: Optional[int] = None) -> dict[int, list[float]]:
    """Values by the window [start + i*w, start + (i+1)*w) their time falls in; pairs with a
    missing time or value are skipped. With `total` windows, a time past the last one counts
    in the last (a run's final completion lands on its end)."""
    bins: dict[int, list[float]] = {}
    for t, v in zip(times, values):
        if v is None or t is None:
            continue
        i = int((t - start) // window_s)
        if total is not None:
            i = min(i, max(total - 1, 0))
        bins.setdefault(i, []).append(v)
    return bins
