"""The live dashboard: a page at /dashboard, its data at /dashboard/data, its files under
/dashboard/static/ (the page, its script and the vendored uPlot chart library).

`DashboardFeed` listens to the engine client's step feed like the Prometheus exporter and
keeps a ring buffer of one row per second over the last `HISTORY_S` seconds: TTFT and TPOT
P90 over the last `LATENCY_WINDOW_S` seconds, every controller rung the engine snapshot
exports per phase (a numeric key ending in `_prefill` or `_decode`: tau_prefill, tau_decode,
and any other rung), running batch, queue length, KV usage and refusals per second. A row is
added when a step, a snapshot or a data request comes at least `SAMPLE_INTERVAL_S` after the
last one, so an idle server with no page open adds nothing and the chart shows the gap.

With an API key set, the dashboard's paths need it like every other path. A browser cannot
send an Authorization header when it navigates to a page or loads its scripts, so the
middleware (brownout.api.middleware) also takes the key once as `/dashboard?key=...`; the
page then sets it in an HttpOnly, SameSite=Strict cookie scoped to /dashboard and redirects
to the bare URL, so the key leaves the address bar and the browser history, and the page's
script and data requests carry the cookie.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from brownout.api.engine_client import EngineClient
from brownout.api.middleware import DASHBOARD_KEY_COOKIE, DASHBOARD_KEY_PARAM, DASHBOARD_PAGE
from brownout.types import RequestOutput, StepStats

logger = logging.getLogger(__name__)

ACCESS_LOGGER = "uvicorn.access"
STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = DASHBOARD_PAGE  # the middleware lets the key in through this path's query
DATA_PATH = PAGE_PATH + "/data"
STATIC_PATH = PAGE_PATH + "/static"
HISTORY_S = 300  # the page shows the last five minutes
SAMPLE_INTERVAL_S = 1.0  # one row per second, the page's refresh period
# P90 over this many seconds: long enough to hold a few requests at light load, short
# enough that the curve follows a burst (the controller's default window is 2 s)
LATENCY_WINDOW_S = 5.0
GAP_ROWS = 2.5  # rows further apart than this many intervals are drawn unjoined
PERCENTILE = 90.0  # the SLOs are judged on P90
PHASES = ("prefill", "decode")
GAUGES = (("running", "num_running"), ("waiting", "num_waiting"), ("kv_usage", "kv_usage"))
REFUSAL_TOTALS = (("refused_slo", "num_refused_slo_total"), ("refused_full", "num_refused_full_total"))


def rung_keys(snapshot: dict) -> list[str]:
    """The snapshot's controller rungs: numeric keys per phase (tau_prefill, tau_decode, ...)."""
    return sorted(k for k, v in snapshot.items()
                  if k.endswith(tuple(f"_{p}" for p in PHASES))
                  and isinstance(v, (int, float)) and not isinstance(v, bool))


def _p90(samples: deque, since: float) -> Optional[float]:
    values = [v for t, v in samples if t >= since]
    return float(np.percentile(values, PERCENTILE)) if values else None


class DashboardFeed:
    """An engine listener holding the dashboard's ring buffer (see the module docstring)."""

    def __init__(self, history_s: float = HISTORY_S, interval_s: float = SAMPLE_INTERVAL_S,
                 latency_window_s: float = LATENCY_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        # `clock` is the engine's step clock (monotonic, shared by both processes on one
        # host); `wall_clock` stamps the rows for the charts' time axis.
        self.clock, self.wall_clock = clock, wall_clock
        self.interval_s = interval_s
        self.latency_window_s = latency_window_s
        self.rows: deque[dict[str, Any]] = deque(maxlen=max(1, math.ceil(history_s / interval_s)))
        self.rungs: list[str] = []  # every rung seen so far, in column order
        self._ttft: deque[tuple[float, float]] = deque()
        self._tpot: deque[tuple[float, float]] = deque()
        self._arrival: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self._snapshot: dict = {}
        self._last_totals: dict[str, tuple[float, float]] = {}  # key: (total, when)
        self._last_row_mono: Optional[float] = None

    # ------------------------------------------------------------------ EngineListener
    def on_request_start(self, request_id: str, arrival_time: float) -> None:
        self._arrival[request_id] = arrival_time

    def on_request_end(self, request_id: str) -> None:
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._arrival.pop(request_id, None)
        self._last_token.pop(request_id, None)

    def on_step(self, t: float, outputs: list[RequestOutput], stats: Optional[StepStats],
                snapshot: dict) -> None:
        for out in outputs:
            self._on_output(t, out)
        self.on_snapshot(snapshot)

    def _on_output(self, t: float, out: RequestOutput) -> None:
        rid = out.request_id
        if out.new_token_ids:
            prev = self._last_token.get(rid)
            if prev is None:
                if rid in self._arrival:
                    self._ttft.append((t, max(0.0, t - self._arrival[rid])))
            else:
                self._tpot.append((t, max(0.0, (t - prev) / len(out.new_token_ids))))
            self._last_token[rid] = t
        if out.finished:
            self._forget(rid)

    def on_snapshot(self, snapshot: dict) -> None:
        if snapshot:
            self._snapshot = snapshot
        self.sample()

    # ------------------------------------------------------------------ ring buffer
    def sample(self) -> None:
        """Add a row when `interval_s` has passed since the last one."""
        now_mono = self.clock()
        if self._last_row_mono is not None and now_mono - self._last_row_mono < self.interval_s:
            return
        self._last_row_mono = now_mono
        since = now_mono - self.latency_window_s
        for samples in (self._ttft, self._tpot):
            while samples and samples[0][0] < since:
                samples.popleft()
        snap = self._snapshot
        row: dict[str, Any] = {"t": self.wall_clock(),
                               "ttft_p90": _p90(self._ttft, since), "tpot_p90": _p90(self._tpot, since)}
        for name, key in GAUGES:
            row[name] = snap.get(key)
        for name, key in REFUSAL_TOTALS:
            row[name] = self._per_second(key, snap.get(key), now_mono)
        for key in rung_keys(snap):
            if key not in self.rungs:
                self.rungs.append(key)
            row[key] = snap[key]
        self.rows.append(row)

    def _per_second(self, key: str, total: Optional[float], now_mono: float) -> Optional[float]:
        """The rate of a running total since the last row (None on its first sight)."""
        if total is None:
            return None
        last = self._last_totals.get(key)
        self._last_totals[key] = (total, now_mono)
        if last is None:
            return None
        elapsed = max(now_mono - last[1], self.interval_s)
        return max(0.0, total - last[0]) / elapsed

    def columns(self) -> dict[str, list]:
        """The ring buffer as one list per field (uPlot's data layout). Missing values are
        None, and a row of None marks each gap of more than `GAP_ROWS` intervals (an idle
        spell with no page open), so the charts break their lines there."""
        names = ["t", "ttft_p90", "tpot_p90", *(n for n, _ in GAUGES), *(n for n, _ in REFUSAL_TOTALS),
                 *self.rungs]
        rows: list[dict[str, Any]] = []
        for row in self.rows:
            if rows and row["t"] - rows[-1]["t"] > GAP_ROWS * self.interval_s:
                rows.append({"t": rows[-1]["t"] + self.interval_s})
            rows.append(row)
        return {name: [row.get(name) for row in rows] for name in names}


class _RedactKey(logging.Filter):
    """Hides the key of `/dashboard...?key=...` in the access log (uvicorn logs full paths)."""

    PATTERN = re.compile(rf"^({re.escape(DASHBOARD_PAGE)}[^?]*\?(?:.*&)?{DASHBOARD_KEY_PARAM}=)[^&]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def _slo(client: EngineClient) -> dict[str, Any]:
    slo = getattr(getattr(client, "config", None), "slo", None)
    return {"policy": getattr(slo, "policy", None), "ttft_s": getattr(slo, "ttft_s", None),
            "tpot_s": getattr(slo, "tpot_s", None)}


def install_dashboard(app: FastAPI, client: EngineClient, api_key: Optional[str],
                      model_name: Callable[[], str] = lambda: "") -> DashboardFeed:
    """Register the dashboard's routes on `app` and its feed on `client`."""
    feed = DashboardFeed()
    client.listeners.append(feed)
    access_log = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, _RedactKey) for f in access_log.filters):
        access_log.addFilter(_RedactKey())

    @app.get(PAGE_PATH)
    async def dashboard_page(request: Request) -> Response:
        key = request.query_params.get(DASHBOARD_KEY_PARAM)
        if key is not None:  # the key leaves the address bar (and a right one goes to the cookie)
            response = RedirectResponse(PAGE_PATH, status_code=303)
            if api_key is not None and hmac.compare_digest(key.encode("utf-8"), api_key.encode("utf-8")):
                response.set_cookie(DASHBOARD_KEY_COOKIE, quote(key, safe=""), path=PAGE_PATH,
                                    httponly=True, samesite="strict")
            return response
        return FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-store"})

    @app.get(DATA_PATH)
    async def dashboard_data() -> JSONResponse:
        feed.sample()
        return JSONResponse({"model": model_name(), "slo": _slo(client), "interval_s": feed.interval_s,
                             "history_s": HISTORY_S, "latency_window_s": feed.latency_window_s,
                             "rungs": list(feed.rungs), "columns": feed.columns()},
                            headers={"Cache-Control": "no-store"})

    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    return feed
