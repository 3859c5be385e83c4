"""The official `openai` client against a real server: chat and completions, streaming or
not, usage equal to the tokenizer's counts, seeds, stop strings, and the echo + prompt
logprobs format lm-eval's local-completions model relies on.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from conftest import start_server

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour of the sky."}]
PROMPT = "The quick brown fox jumps over the"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--served-model-name", "demo"], tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def chat_prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_models_lists_served_name(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_chat_usage_matches_tokenizer(client, tokenizer):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == chat_prompt_len(tokenizer, MESSAGES)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model="demo", messages=MESSAGES, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completion_usage_and_length(client, tokenizer):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT, add_special_tokens=False))
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_completion_streaming_equals_non_streaming(client):
    kw = dict(model="demo", prompt=PROMPT, max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_prompt_forms_agree(client, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    kw = dict(model="demo", max_tokens=5, temperature=0)
    texts = {client.completions.create(prompt=p, **kw).choices[0].text
             for p in (PROMPT, [PROMPT], ids, [ids])}
    assert len(texts) == 1


def test_several_prompts_give_indexed_choices(client):
    r = client.completions.create(model="demo", prompt=["One", "Two", "Three"], max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 9


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model="demo", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


def test_stop_string_cuts_the_text(client):
    kw = dict(model="demo", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(max_tokens=16, **kw).choices[0].text
    stop = text.strip()[2:4] if len(text.strip()) >= 4 else None
    if not stop:
        pytest.skip("the model's greedy output is too short to pick a stop string")
    r = client.completions.create(max_tokens=16, stop=[stop], **kw)
    assert stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert text.startswith(r.choices[0].text)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert math.isclose(tok.logprob, max(t.logprob for t in tok.top_logprobs), abs_tol=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_prompt_logprobs_for_loglikelihood(server, tokenizer, model_dir, max_tokens):
    """lm-eval local-completions: echo=true, logprobs=1, token-id prompt; scores [ctx:-1] or [ctx:]."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    body = {"model": "demo", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    lp = r["choices"][0]["logprobs"]
    n = len(ids) + max_tokens
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": max_tokens,
                          "total_tokens": len(ids) + max_tokens}
    # the prompt logprobs are the model's: compare with transformers on the same checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp["token_logprobs"][1:len(ids)])
    assert torch.allclose(got, ref, atol=2e-3), (got, ref)
    for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) >= 1 and max(top.values()) >= tok_lp - 1e-6
    assert "".join(lp["tokens"][:len(ids)]) == tokenizer.decode(ids)
    assert r["choices"][0]["text"].startswith(tokenizer.decode(ids))
