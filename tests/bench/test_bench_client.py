"""The load client against a fake OpenAI-style streaming server on localhost."""

import asyncio
import json

import pytest

from brownout.bench.client import LoadClient, parse_prometheus, summarize_metrics
from brownout.bench.datasets import BenchRequest
from fake_openai_server import serve_fake


def requests_(prompts, gap=0.05, max_tokens=5):
    return [BenchRequest(i, i * gap, p, max_tokens, 3) for i, p in enumerate(prompts)]


def run_client(url, reqs, out, **kw):
    client = LoadClient(url, scrape_interval_s=0.1, **kw)
    return asyncio.run(client.run(reqs, out, progress=False)), client


def test_records_timestamps_tokens_and_statuses(tmp_path):
    with serve_fake(first_delay=0.2, itl=0.03) as (url, server):
        recs, client = run_client(url + "/v1/", requests_(["hello world", "REJECT me", "FAIL me",
                                                           "ERRORMID x"]), tmp_path)
    ok, rejected, failed, mid = recs
    assert client.model == "fake-moe" and server.bodies[0]["model"] == "fake-moe"
    body = server.bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5 and body["prompt"] == "hello world"
    # scheduled 50 ms apart, never sent early (how late depends on the machine's load)
    assert [r["scheduled"] for r in recs] == pytest.approx([0, 0.05, 0.1, 0.15])
    assert all(r["sent"] >= r["scheduled"] - 1e-3 for r in recs)
    assert ok["status"] == 200 and ok["error"] is None and not ok["rejected"]
    assert ok["first_token"] - ok["sent"] >= 0.2  # the fake server's first-token delay
    assert len(ok["token_times"]) == 5 and ok["output_tokens"] == 5 and ok["prompt_tokens"] == 2
    gaps = [b - a for a, b in zip(ok["token_times"], ok["token_times"][1:])]
    assert all(g >= 0.025 for g in gaps)  # its inter-token delay: no token early
    assert ok["done"] >= ok["token_times"][-1] and ok["finish_reason"] == "length"
    assert rejected["status"] == 429 and rejected["rejected"] and rejected["retry_after"] == 2.0
    assert rejected["attempts"] == 1 and rejected["first_token"] is None
    assert failed["status"] == 500 and not failed["rejected"] and "boom" in failed["error"]
    assert mid["status"] == 200 and "engine died" in mid["error"] and mid["output_tokens"] == 2
    # the JSONL holds the same records
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2, 3]
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[0]["tau_prefill"] == 0.75 and metrics[0]["tau_decode"] == 0.375
    assert metrics[0]["waiting"] == 3.0 and metrics[0]["kv_cache_usage"] == 0.25
    assert any(m["running"] >= 1 for m in metrics)  # scraped while a stream was open


def test_chat_mode_and_count_without_usage(tmp_path):
    with serve_fake(first_delay=0.05, itl=0.01, usage=False) as (url, server):
        recs, _ = run_client(url, requests_(["hi there"], max_tokens=4), tmp_path, chat=True,
                             model="m", ignore_eos=False)
    (rec,) = recs
    assert server.bodies[0]["messages"] == [{"role": "user", "content": "hi there"}]
    assert "ignore_eos" not in server.bodies[0] and server.bodies[0]["model"] == "m"
    # the role-only chunk is not a token; chunks are counted when no usage comes
    assert rec["output_tokens"] == 4 and len(rec["token_times"]) == 4
    assert rec["first_token"] - rec["sent"] >= 0.05 and rec["prompt_tokens"] is None


@pytest.mark.parametrize("chat", [False, True])
def test_held_back_token_counts(tmp_path, chat):
    with serve_fake(first_delay=0.02, itl=0.02, usage=False) as (url, _):
        recs, _ = run_client(url, requests_(["HOLD it"], max_tokens=4), tmp_path, chat=chat, model="m")
    assert recs[0]["output_tokens"] == 4 and len(recs[0]["token_times"]) == 4


def test_retries_rejected_when_asked(tmp_path):
    with serve_fake() as (url, server):
        client = LoadClient(url, max_retries=1, scrape_interval_s=0.1)

        async def go():
            import aiohttp
            async with aiohttp.ClientSession() as s:
                client._t0 = 0.0
                req = BenchRequest(0, 0.0, "REJECT", 3)
                return await asyncio.wait_for(client.send(s, req), 10)

        rec = asyncio.run(go())
    assert rec["attempts"] == 2 and rec["rejected"] and len(server.bodies) == 2
    assert rec["sent"] - rec["first_sent"] >= 2.0  # waited Retry-After


def test_connection_error_is_recorded(tmp_path):
    recs, _ = run_client("http://127.0.0.1:9", requests_(["x"]), tmp_path, model="m")
    assert recs[0]["status"] is None and "Error" in recs[0]["error"]


def test_parse_prometheus():
    text = ('# HELP x y\nbrownout_tau{phase="decode"} 0.5\n'
            'vllm:num_requests_running{model_name="a",x="q\\"z"} 2\n'
            'vllm:num_requests_running{model_name="b"} 3\nbad line\nfoo 1e-3\n')
    samples = parse_prometheus(text)
    assert ("brownout_tau", {"phase": "decode"}, 0.5) in samples
    assert ("foo", {}, 0.001) in samples
    summary = summarize_metrics(samples)
    assert summary["tau_decode"] == 0.5 and summary["running"] == 5.0
