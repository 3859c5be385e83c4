"""Clients that go away mid-request have their requests aborted at once: the KV cache
empties and nothing keeps running, for streaming and non-streaming requests alike; each is
counted once in vllm:request_success_total, as an abort unless it had finished."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import metric_value, start_server

DISCONNECTS = 200
WAVE = 20


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--max-num-seqs", "8"], tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def long_max_tokens(server) -> int:
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    return min(400, card["max_model_len"] - 32)


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def _generated(text: str) -> float:
    """Tokens the engine generated in all (it counts aborted requests' tokens too)."""
    return metric_value(text, "vllm:generation_tokens_total")


def _finished(text: str) -> dict[str, float]:
    return {reason: metric_value(text, "vllm:request_success_total", {"finished_reason": reason})
            for reason in ("abort", "length", "stop", "timeout")}


def _counted(before: str, after: str) -> dict[str, float]:
    old = _finished(before)
    return {reason: n - old[reason] for reason, n in _finished(after).items()}


def _wait_idle(server, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = _metrics(server)
        idle = (metric_value(text, "vllm:num_requests_running") == 0
                and metric_value(text, "vllm:num_requests_waiting") == 0
                and metric_value(text, "vllm:kv_cache_usage_perc") == 0)
        if idle:
            return text
        assert time.monotonic() < deadline, f"engine still busy {timeout_s} s after the clients left"
        time.sleep(0.2)


async def _stream_then_leave(http: httpx.AsyncClient, i: int, max_tokens: int) -> bool:
    body = {"prompt": f"Story {i}:", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return True  # leaving the block closes the connection mid-stream
    return False


async def _streams(url: str, max_tokens: int) -> list[bool]:
    got = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for start in range(0, DISCONNECTS, WAVE):
            got += await asyncio.gather(*(_stream_then_leave(http, i, max_tokens)
                                          for i in range(start, start + WAVE)))
    return got


def test_mid_stream_disconnects_free_everything(server, long_max_tokens):
    scraped = _metrics(server)
    before = _generated(scraped)
    got_tokens = asyncio.run(_streams(server.url, long_max_tokens))
    assert all(got_tokens)  # each client saw output before leaving
    text = _wait_idle(server)
    counted = _counted(scraped, text)
    assert sum(counted.values()) == DISCONNECTS and counted["abort"] > 0.9 * DISCONNECTS, counted
    assert metric_value(text, "vllm:num_requests_running") == 0
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0
    # aborted, not run to the end: far fewer tokens than the requests asked for
    assert _generated(text) - before < 0.1 * DISCONNECTS * long_max_tokens


async def _post_then_leave(url: str, n: int, max_tokens: int) -> None:
    body = {"prompt": "A long answer:", "max_tokens": max_tokens, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=0.2)) as http:
        results = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(n)),
                                       return_exceptions=True)
    assert all(isinstance(r, httpx.ReadTimeout) for r in results), results


def test_non_streaming_disconnects_abort(server, long_max_tokens):
    scraped = _metrics(server)
    before = _generated(scraped)
    asyncio.run(_post_then_leave(server.url, 6, long_max_tokens))
    text = _wait_idle(server)
    assert _counted(scraped, text)["abort"] == 6
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0
    assert _generated(text) - before < 0.5 * 6 * long_max_tokens


def test_server_still_serves(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
