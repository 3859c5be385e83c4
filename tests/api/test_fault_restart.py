"""Self-healing: a killed engine process fails the requests in flight at once (503, or an
error event in a started stream), /health says the engine is restarting, and the server
serves again without help, counting the restart; an engine that keeps dying makes the
server exit non-zero so that its supervisor can act."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server, metric_value, start_server

from brownout.api.engine_restart import (BACKOFF_BASE_S, ENGINE_FAILED_EXIT_CODE,
                                         MAX_DEATHS_IN_WINDOW, RESTART_WINDOW_S, RestartPolicy)
from brownout.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds the engine process through /proc")

# The target is 30 s on an idle CPU box; this bound only keeps a broken restart
# from hanging the suite on a busy one.
SERVING_AGAIN_BOUND_S = 120
# A server giving up on its engine exits within this bound (back-off waits and failed starts).
GIVE_UP_BOUND_S = 180
# Set for CrashingEngine: the file marking that its first engine was built.
MARKER_ENV = "BROWNOUT_TEST_ENGINE_MARKER"


class CrashingEngine(LLMEngine):
    """Builds once; every later engine process fails while loading."""

    def __init__(self, config, **kwargs):
        marker = Path(os.environ[MARKER_ENV])
        if marker.exists():
            raise RuntimeError("injected start failure")
        super().__init__(config, **kwargs)
        marker.touch()


def engine_pid(server_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise LookupError("engine process not found")


def wait_for(predicate, bound_s: float, what: str):
    deadline = time.monotonic() + bound_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not {what} after {bound_s} s"
        time.sleep(0.2)


def health(url: str) -> tuple[int, dict]:
    try:
        r = httpx.get(url + "/health", timeout=5)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return 0, {}


BODY = {"prompt": "Tell me a story", "max_tokens": 300, "ignore_eos": True, "temperature": 0}


async def stream_until_killed(url: str, started: asyncio.Event) -> list[str] | httpx.Response:
    """The events of a stream that started, or the response of one refused before its
    first token (the server answers a stream's headers only once its first token is out)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return r
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
            return events


async def kill_under_load(server: Server) -> tuple[list, list, float]:
    started = asyncio.Event()
    streams = [asyncio.create_task(stream_until_killed(server.url, started)) for _ in range(2)]
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        plain = [asyncio.create_task(http.post("/v1/completions", json=BODY)) for _ in range(2)]
        await asyncio.wait_for(started.wait(), 120)
        os.kill(engine_pid(server.proc.pid), signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.gather(*plain)
        events = await asyncio.gather(*streams)
    return results, events, time.monotonic() - killed


def test_restart_policy_backs_off_forgives_old_deaths_and_gives_up():
    policy = RestartPolicy()
    delays = [policy.on_death(t) for t in range(MAX_DEATHS_IN_WINDOW - 1)]
    assert delays == [BACKOFF_BASE_S * 2 ** i for i in range(MAX_DEATHS_IN_WINDOW - 1)]
    later = MAX_DEATHS_IN_WINDOW + RESTART_WINDOW_S  # every earlier death is forgiven
    assert policy.on_death(later) == BACKOFF_BASE_S
    for i in range(1, MAX_DEATHS_IN_WINDOW - 1):
        assert policy.on_death(later + i) is not None
    assert policy.on_death(later + MAX_DEATHS_IN_WINDOW) is None


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--max-num-seqs", "2"], tmp_path_factory)
    yield srv
    srv.stop()


def test_killed_engine_fails_in_flight_requests_and_comes_back(server):
    results, events, _ = asyncio.run(kill_under_load(server))
    for r in results:  # queued or running when the engine died
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
    for ev in events:
        if isinstance(ev, httpx.Response):  # not started yet when the engine died
            assert ev.status_code == 503 and ev.json()["error"]["code"] == "engine_dead", ev.text
            continue
        # started streams end with an error event and [DONE]
        assert ev[-1] == "[DONE]" and json.loads(ev[-2])["error"]["code"] == "engine_dead"
    assert any(isinstance(ev, list) for ev in events)  # the kill came after a stream started
    status, info = health(server.url)
    if status == 503:  # still restarting: say so, and refuse new requests at once
        assert info["status"] == "restarting" and "exited" in info["reason"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code in (200, 503)  # 200 only if the restart finished meanwhile
    started = time.monotonic()
    wait_for(lambda: health(server.url)[0] == 200, SERVING_AGAIN_BOUND_S, "serving again")
    print(f"serving again {time.monotonic() - started:.1f} s after the first health check")
    assert health(server.url)[1] == {"status": "ok", "restarts": 1}
    r = httpx.post(server.url + "/v1/completions", json={**BODY, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    metrics = httpx.get(server.url + "/metrics").text
    assert metric_value(metrics, "brownout_engine_restarts_total") == 1
    assert metric_value(metrics, "vllm:num_requests_running") == 0
    assert metric_value(metrics, "vllm:kv_cache_usage_perc") == 0
    # the fresh engine's token totals count on from the old ones
    assert metric_value(metrics, "vllm:generation_tokens_total") > 4


def test_engine_that_keeps_dying_makes_the_server_exit_non_zero(model_dir, tmp_path):
    env = {MARKER_ENV: str(tmp_path / "built")}
    server = Server(model_dir, ["--engine-factory", "test_fault_restart:CrashingEngine"],
                    tmp_path / "server.log", env)
    try:
        server.wait_ready()
        os.kill(engine_pid(server.proc.pid), signal.SIGKILL)
        seen = wait_for(lambda: health(server.url)[1].get("status") == "restarting" or server.proc.poll(),
                        GIVE_UP_BOUND_S, "restarting")
        assert seen is not None
        code = server.proc.wait(timeout=GIVE_UP_BOUND_S)
        log = server.log()
        assert code == ENGINE_FAILED_EXIT_CODE, log
        assert f"engine died {MAX_DEATHS_IN_WINDOW} times" in log
    finally:
        server.stop()
