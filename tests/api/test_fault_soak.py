"""A bounded soak: closed-loop clients at about 3x what the server holds (running slots plus
its queue) for SOAK_S seconds, streams and not, a share of them leaving early. Every answer
is a 200 or a 429, every 200 is well-formed, and afterwards the queue and the KV cache are
empty again and the engine never restarted."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx
import pytest
from conftest import metric_value, start_server

MAX_NUM_SEQS = 4
MAX_WAITING = 4
CLIENTS = 3 * (MAX_NUM_SEQS + MAX_WAITING)
SOAK_S = 120
DISCONNECT_SHARE = 0.2  # requests whose client leaves before the answer is complete
RETRY_PAUSE_S = 0.1  # a refused client waits this long before its next request
# After the load stops, the server empties its queue and cache within this bound.
SETTLE_BOUND_S = 60
WORDS = "the king of a land far away once said to his people that all is well".split()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--max-num-seqs", str(MAX_NUM_SEQS),
                                   "--max-waiting-requests", str(MAX_WAITING)], tmp_path_factory)
    yield srv
    srv.stop()


def check_completion(body: dict, max_tokens: int) -> None:
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
    assert 1 <= body["usage"]["completion_tokens"] <= max_tokens


def check_stream(events: list[str]) -> None:
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


async def one_request(http: httpx.AsyncClient, rng: random.Random, tally: Counter) -> None:
    max_tokens = rng.randint(4, 24)
    body = {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
            "max_tokens": max_tokens, "temperature": 0.8, "stream": rng.random() < 0.5}
    leave = rng.random() < DISCONNECT_SHARE
    if not body["stream"]:
        try:
            r = await asyncio.wait_for(http.post("/v1/completions", json=body),
                                       timeout=rng.uniform(0.05, 0.5) if leave else None)
        except asyncio.TimeoutError:
            tally["left"] += 1
            return
        tally[r.status_code] += 1
        if r.status_code == 200:
            check_completion(r.json(), max_tokens)
        return
    async with http.stream("POST", "/v1/completions", json=body) as r:
        tally[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            return
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if leave:
                    tally["left"] += 1
                    return
        check_stream(events)


async def client_loop(url: str, seed: int, until: float, tally: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < until:
            before = tally[429]
            await one_request(http, rng, tally)
            if tally[429] > before:
                await asyncio.sleep(RETRY_PAUSE_S)


def settled(url: str) -> bool:
    text = httpx.get(url + "/metrics", timeout=10).text
    return all(metric_value(text, name) == 0 for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"))


@pytest.mark.slow
def test_soak_at_three_times_capacity_with_disconnects(server):
    tally: Counter = Counter()
    until = time.monotonic() + SOAK_S

    async def go():
        await asyncio.gather(*(client_loop(server.url, i, until, tally) for i in range(CLIENTS)))

    asyncio.run(go())
    print(f"soak: {dict(tally)}")
    statuses = {k for k in tally if isinstance(k, int)}
    assert statuses <= {200, 429}, tally
    assert tally[200] > 0 and tally[429] > 0 and tally["left"] > 0, tally
    deadline = time.monotonic() + SETTLE_BOUND_S
    while not settled(server.url):
        assert time.monotonic() < deadline, httpx.get(server.url + "/metrics").text[-3000:]
        time.sleep(0.5)
    metrics = httpx.get(server.url + "/metrics").text
    assert metric_value(metrics, "brownout_engine_restarts_total") == 0
    # no request ended by a failed step
    assert metric_value(metrics, "vllm:request_success_total", {"finished_reason": "error"}) == 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
