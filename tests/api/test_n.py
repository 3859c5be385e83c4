"""`n` and `best_of` with the official `openai` client against a real server: choices and
their indices, streaming interleaved by index, `seed` reproducibility, best-of ranking, and
the prompt computed once for all samples."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import metric_value, start_server

MESSAGES = [{"role": "user", "content": "Name a colour of the sky."}]
BLOCK_SIZE = 16  # the server's default KV block size
METRICS_WAIT_S = 30  # the counters follow the engine's snapshots, which trail the response


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--served-model-name", "demo"], tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _sample(client, **kw):
    args = dict(model="demo", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7)
    return client.completions.create(**{**args, **kw})


def test_n_choices_are_indexed_distinct_and_reproducible(client):
    first = _sample(client, n=3)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1  # each sample has a seed of its own
    assert [c.text for c in _sample(client, n=3).choices] == texts
    assert _sample(client, n=1).choices[0].text == texts[0]  # sample 0 keeps the seed
    assert first.usage.prompt_tokens == _sample(client, n=1).usage.prompt_tokens  # counted once
    scored = _sample(client, n=3, logprobs=0)
    assert scored.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in scored.choices)


def test_n_with_several_prompts_indexes_prompt_major(client):
    out = _sample(client, prompt=["Once upon a time", "The sky is"], n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = _sample(client, prompt="The sky is", n=2)
    assert [c.text for c in out.choices[2:]] == [c.text for c in alone.choices]


def test_streamed_samples_interleave_by_index_and_match(client):
    whole = _sample(client, n=3)
    texts = ["", "", ""]
    reasons = [None, None, None]
    for chunk in _sample(client, n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_chat_n_streamed_and_not(client):
    args = dict(model="demo", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=11, n=2)
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1]
    texts, roles = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles[c.index] = roles[c.index] or c.delta.role
    assert texts == [c.message.content for c in whole.choices]
    assert roles == ["assistant", "assistant"]


def test_best_of_returns_the_samples_of_highest_cumulative_logprob(client):
    every = _sample(client, n=4, logprobs=0)
    scores = [sum(c.logprobs.token_logprobs) for c in every.choices]
    ranked = sorted(range(4), key=lambda i: -scores[i])
    best = _sample(client, n=2, best_of=4)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [every.choices[i].text for i in ranked[:2]]
    assert best.choices[0].logprobs is None  # ranked by logprobs the client did not ask for


def test_best_of_cannot_be_streamed(client):
    with pytest.raises(openai.BadRequestError, match="best_of"):
        _sample(client, n=1, best_of=2, stream=True)


def _counters(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {name: metric_value(text, name + "_total") for name in
            ("vllm:prompt_tokens", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")}


def test_the_prompt_is_computed_once_for_n_samples(client, server):
    prompt = list(range(400, 437))  # 37 tokens: 2 full blocks shared, 5 tokens per sample
    n = 4
    shared = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    expected = {"vllm:prompt_tokens": len(prompt) + (n - 1) * (len(prompt) - shared),
                "vllm:prefix_cache_queries": n * len(prompt),
                "vllm:prefix_cache_hits": (n - 1) * shared}
    before = _counters(server)
    _sample(client, prompt=prompt, n=n, max_tokens=2)
    deadline = time.monotonic() + METRICS_WAIT_S
    while True:
        delta = {k: v - before[k] for k, v in _counters(server).items()}
        if delta == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta == expected
