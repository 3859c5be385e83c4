"""/metrics exposes the vLLM-named and brownout metrics, and they move with traffic."""

from __future__ import annotations

import httpx
import pytest
from conftest import metric_value, start_server

HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_queue_time_seconds", "vllm:request_time_per_output_token_seconds"]
GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
COUNTERS = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:num_preemptions_total"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--slo-policy", "fixed", "--fixed-tau", "1.0"], tmp_path_factory)
    yield srv
    srv.stop()


def scrape(server) -> str:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_names_are_exposed(server):
    text = scrape(server)
    for name in GAUGES + COUNTERS:
        metric_value(text, name)  # raises KeyError when absent
    for name in HISTOGRAMS + ["brownout_experts_touched"]:
        assert f"# TYPE {name} histogram" in text, name
    assert "# TYPE brownout_step_latency_seconds histogram" in text
    metric_value(text, "brownout_step_latency_seconds_count", {"phase": "decode"})
    assert "# TYPE brownout_slo_violations_total counter" in text
    metric_value(text, "brownout_slo_violations_total")  # one series per kind, from the engine
    assert metric_value(text, "brownout_tau", {"phase": "prefill"}) == 1.0
    assert metric_value(text, "brownout_tau", {"phase": "decode"}) == 1.0
    # the engine process's garbage-collector pauses, by generation (its startup heap is frozen)
    for gen in ("0", "1", "2"):
        assert metric_value(text, "brownout_gc_pause_seconds_total", {"generation": gen}) >= 0
        assert metric_value(text, "brownout_gc_collections_total", {"generation": gen}) >= 0
    assert metric_value(text, "brownout_gc_longest_pause_seconds") >= 0


def test_metrics_move_with_requests(server):
    before = scrape(server)
    usages = []
    for stream in (False, True):
        body = {"prompt": "Counting tokens is", "max_tokens": 5, "ignore_eos": True, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        if stream:
            import json
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            usages.append(chunks[-1]["usage"])
        else:
            usages.append(r.json()["usage"])
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
    usages.append(r.json()["usage"])
    after = scrape(server)

    def delta(name, labels=None):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_time_per_output_token_seconds"):
        assert delta(name + "_count") == 3, name
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert delta(name + "_count") == sum(u["completion_tokens"] - 1 for u in usages), name
    assert delta("vllm:request_success_total", {"finished_reason": "length"}) == 3
    assert delta("brownout_step_latency_seconds_count", {"phase": "prefill"}) >= 3
    assert delta("brownout_step_latency_seconds_count", {"phase": "decode"}) >= 4
    assert delta("brownout_experts_touched_count") >= 7
    assert metric_value(after, "brownout_experts_touched_sum") > 0
    assert metric_value(after, "vllm:num_requests_running") == 0
    assert metric_value(after, "vllm:kv_cache_usage_perc") == 0
