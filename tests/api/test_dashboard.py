"""The live dashboard: its ring buffer (unit), its key handling, and the page in a real
headless chromium against a server under light load (charts render, then update).

The browser is driven over the DevTools protocol with aiohttp's websocket client. Set
BROWNOUT_DASHBOARD_SCREENSHOT=PATH to also write the page's screenshot there (the one in
docs/ is made so).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
from conftest import start_server

from brownout.api.dashboard import DashboardFeed, _RedactKey, rung_keys
from brownout.types import RequestOutput

API_KEY = "dash-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BROWSER_NAMES = ("chromium", "chromium-browser")
BROWSER_START_TIMEOUT_S = 60
RENDER_TIMEOUT_S = 90  # bounded polls: the page refreshes every second
LOAD_CONCURRENCY = 3
WINDOW = (1280, 1000)


# --------------------------------------------------------------------------- ring buffer
def _out(rid: str, new: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [1, 2], list(range(new)), "x" * new, list(range(new)), finished)


class _Clock:
    """Monotonic and wall clocks that move only when told (wall = mono + 900)."""

    def __init__(self, now: float):
        self.now = now

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + 900.0


def _feed(clock: _Clock, **kw) -> DashboardFeed:
    return DashboardFeed(interval_s=1.0, clock=clock.mono, wall_clock=clock.wall, **kw)


def test_feed_rows_p90_rungs_and_refusal_rate():
    clock = _Clock(100.0)
    feed = _feed(clock, history_s=10, latency_window_s=5.0)

    def at(t: float, **changes) -> None:
        clock.now = t
        feed._snapshot = {**feed._snapshot, **changes}
        feed.sample()

    snap = {"num_running": 2, "num_waiting": 3, "kv_usage": 0.5, "tau_prefill": 1.0,
            "tau_decode": 0.7, "brownout_ready": True, "num_refused_slo_total": 4}
    feed.on_request_start("a", 99.5)
    feed.on_step(100.0, [_out("a", 1)], None, {})  # TTFT 0.5: the first row
    clock.now = 100.5
    feed.on_step(100.5, [_out("a", 6, finished=True)], None, {})  # TPOT 0.5 / 6 tokens; too soon
    at(101.0, **snap)
    at(101.5)  # too soon: no row
    at(103.0, num_refused_slo_total=10, tau_decode=0.4)
    at(109.0)  # the latencies have left the window
    cols = feed.columns()
    assert cols["t"] == [1000.0, 1001.0, 1003.0, 1004.0, 1009.0]  # a gap row marks the idle spell
    assert cols["ttft_p90"] == [0.5, 0.5, 0.5, None, None]
    assert cols["tpot_p90"][:3] == [None, pytest.approx(0.5 / 6), pytest.approx(0.5 / 6)]
    assert cols["tau_decode"] == [None, 0.7, 0.4, None, 0.4]
    assert feed.rungs == ["tau_decode", "tau_prefill"]
    assert cols["refused_slo"] == [None, None, pytest.approx(3.0), None, 0.0]  # 6 over 2 s
    assert cols["running"] == [None, 2, 2, None, 2] and cols["kv_usage"][1] == 0.5
    assert "brownout_ready" not in cols


def test_feed_keeps_history_bounded():
    clock = _Clock(0.0)
    feed = _feed(clock, history_s=5)
    for i in range(20):
        clock.now = float(i)
        feed.on_snapshot({"num_running": i})
    assert len(feed.rows) == 5 and feed.columns()["running"][-1] == 19


def test_rung_keys_are_numeric_per_phase():
    assert rung_keys({"tau_prefill": 1, "tau_decode": 0.5, "k_decode": 4, "flag_decode": True,
                      "note_prefill": "x", "kv_usage": 0.1}) == ["k_decode", "tau_decode", "tau_prefill"]


def test_access_log_hides_the_key():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/dashboard?x=1&key=s3cret&y=2", "1.1", 303), None)
    _RedactKey().filter(record)
    assert "s3cret" not in record.getMessage() and "/dashboard?x=1&key=<redacted>&y=2" in record.getMessage()


# --------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--slo-policy", "aimd", "--slo-ttft", "2", "--slo-tpot", "0.2",
                                   "--slo-check-interval", "1", "--slo-window", "2"],
                       tmp_path_factory, env={"BROWNOUT_API_KEY": API_KEY})
    yield srv
    srv.stop()


def test_key_once_in_the_query_then_a_cookie(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/dashboard").status_code == 401
        assert c.get("/dashboard?key=wrong").status_code == 401
        assert c.get("/dashboard/data?key=" + API_KEY).status_code == 401  # the page only
        r = c.get("/dashboard?key=" + API_KEY)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        assert "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/dashboard").status_code == 200  # the cookie now
        r = c.get("/dashboard?key=wrong")  # the cookie lets it in; the wrong key is not kept
        assert r.status_code == 303 and "set-cookie" not in r.headers
        data = c.get("/dashboard/data").json()
        assert c.get("/dashboard/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
        assert c.get("/v1/models").status_code == 401  # the cookie opens the dashboard only
    assert data["slo"] == {"policy": "aimd", "ttft_s": 2.0, "tpot_s": 0.2}
    assert {"t", "ttft_p90", "tpot_p90", "running", "waiting", "kv_usage",
            "tau_prefill", "tau_decode"} <= set(data["columns"])
    assert httpx.get(server.url + "/dashboard/data", headers=AUTH).status_code == 200


# --------------------------------------------------------------------------- browser
def _browser() -> str:
    for name in BROWSER_NAMES:
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on PATH (scripts/test.sh installs Debian's chromium when run as root)")


class _Load:
    """A few concurrent completion loops until stopped."""

    def __init__(self, url: str):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(url,), daemon=True)
                         for _ in range(LOAD_CONCURRENCY)]

    def _loop(self, url: str) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            while not self._stop.is_set():
                c.post("/v1/completions", json={"prompt": "The dashboard shows", "max_tokens": 12,
                                                "ignore_eos": True})

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


class _DevTools:
    """One page of a headless chromium, over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self._id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def poll(self, expression: str, timeout_s: float = RENDER_TIMEOUT_S):
        """Evaluate until the value is truthy; fail after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if value := await self.eval(expression):
                return value
            await asyncio.sleep(0.5)
        raise AssertionError(f"not true within {timeout_s} s: {expression}")


def _devtools_port(proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + BROWSER_START_TIMEOUT_S
    for line in proc.stderr:
        if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            return int(m.group(1))
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"chromium did not open its DevTools port (exit code {proc.poll()})")


STATE = "window.dashboard"
RENDERED = (f"{STATE} && {STATE}.points > 0 && document.querySelectorAll('#charts canvas').length >= 6"
            f" && {STATE}.charts.ttft.plot.data[1].some(v => v != null) && {STATE}.lastT")


async def _drive(browser: str, url: str, profile: str) -> None:
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                             f"{url}/dashboard?key={API_KEY}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: the helpers end with it
    try:
        port = _devtools_port(proc)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in await r.json() if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = _DevTools(ws)
                first = await tools.poll(RENDERED)  # charts drawn, TTFT points among them
                assert await tools.eval(f"{STATE}.error") is None
                assert await tools.eval("location.search") == ""  # the key left the address bar
                await tools.poll(f"{STATE}.lastT > {first}")  # and they update
                shot = base64.b64decode((await tools.call("Page.captureScreenshot", format="png",
                                                                   captureBeyondViewport=True))["data"])
                assert shot.startswith(b"\x89PNG")
                if target := os.environ.get("BROWNOUT_DASHBOARD_SCREENSHOT"):
                    Path(target).write_bytes(shot)
    finally:
        _end_group(proc)


def _end_group(proc: subprocess.Popen) -> None:
    """Stop chromium and its helper processes (renderer, GPU, crash handler), which write into
    the profile until they exit."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def test_page_renders_and_updates_in_chromium(server):
    browser = _browser()
    # a helper that outlives the group's signal may still write a file into the profile while
    # it is removed; that is no fault of the page
    with _Load(server.url), tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        asyncio.run(_drive(browser, server.url, profile))
    assert API_KEY not in server.log_path.read_text()  # the access log shows no key
