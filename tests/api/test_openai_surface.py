"""The OpenAI API surface beyond generation, with the official `openai` client against a real
server: /v1/models/{id}, logprobs as OpenAI defines them (the sampled token in completions'
`top_logprobs`, `logprobs: 0`, chat `bytes`), echo of non-ASCII text whose token strings
concatenate to the prompt with `text_offset` indexing the text, /tokenize, /detokenize,
/tokenizer_info, /version, and vLLM's request-level metric families.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import start_server
from prometheus_client.parser import text_string_to_metric_families

from brownout.api.engine_client import TokenLogprob
from brownout.api.logprobs import TokenPieces, chat_content, legacy, output_entries

PROMPT = "The quick brown fox jumps over the"
NON_ASCII = "Crème brûlée — 日本語 naïve 🙂 ok"
MESSAGES = [{"role": "user", "content": "Name a colour of the sky."}]
SAMPLED = dict(temperature=1.5, seed=7, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--served-model-name", "demo"], tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def root(server):
    """The same client at the server's root, where vLLM serves /tokenize and /detokenize."""
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def post(root: openai.OpenAI, path: str, body: dict) -> httpx.Response:
    return root.post(path, body=body, cast_to=httpx.Response)


def check_offsets(text: str, lp) -> None:
    """Offsets index `text`: in range, monotone, and each token's string is its slice."""
    tokens, offsets = lp.tokens, lp.text_offset
    assert all(0 <= o <= len(text) for o in offsets)
    assert offsets == sorted(offsets)
    ends = offsets[1:] + [len(text)]
    if "".join(tokens) == text:
        assert all(text[o:e] == t for o, e, t in zip(offsets, ends, tokens))


# ------------------------------------------------------------------ models
def test_models_retrieve(client):
    card = client.models.retrieve("demo")
    assert card.id == "demo" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found"
    assert exc.value.body["type"] == "not_found_error"


# ------------------------------------------------------------------ completions logprobs
def test_completion_top_logprobs_include_the_sampled_token(client):
    k = 2
    r = client.completions.create(model="demo", prompt=PROMPT, logprobs=k, **SAMPLED)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 12
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(logprob)
        assert k <= len(top) <= k + 1 or len(set(top)) < k  # texts of distinct ids may coincide
    # at this temperature some sampled tokens fall outside the top k: listed as the k + 1st
    assert any(len(top) == k + 1 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    check_offsets(r.choices[0].text, lp)


def test_completion_logprobs_zero_gives_the_sampled_token_only(client):
    r = client.completions.create(model="demo", prompt=PROMPT, logprobs=0, **SAMPLED)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top == {token: pytest.approx(logprob)}


def test_completion_streamed_logprobs_match(client):
    kw = dict(model="demo", prompt=PROMPT, logprobs=1, **SAMPLED)
    full = client.completions.create(**kw)
    tokens, offsets, text = [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
        text += chunk.choices[0].text if chunk.choices else ""
    assert text == full.choices[0].text
    assert tokens == full.choices[0].logprobs.tokens
    assert offsets == full.choices[0].logprobs.text_offset


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_echo_non_ascii_tokens_concatenate_to_the_prompt(client, tokenizer, max_tokens):
    r = client.completions.create(model="demo", prompt=NON_ASCII, echo=True, logprobs=1,
                                  max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
    text, lp = r.choices[0].text, r.choices[0].logprobs
    n_prompt = len(tokenizer.encode(NON_ASCII, add_special_tokens=False))
    assert len(lp.tokens) == n_prompt + max_tokens
    assert "".join(lp.tokens[:n_prompt]) == NON_ASCII
    assert "\ufffd" not in "".join(lp.tokens[:n_prompt])
    assert text.startswith(NON_ASCII)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(logprob)
    check_offsets(text, lp)
    assert lp.text_offset[n_prompt - 1] + len(lp.tokens[n_prompt - 1]) == len(NON_ASCII)


def test_streamed_echo_non_ascii(client):
    tokens, offsets, text = [], [], ""
    for chunk in client.completions.create(model="demo", prompt=NON_ASCII, echo=True, logprobs=1,
                                           max_tokens=3, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        choice = chunk.choices[0]
        tokens += choice.logprobs.tokens
        offsets += choice.logprobs.text_offset
        text += choice.text
    assert text.startswith(NON_ASCII) and "".join(tokens).startswith(NON_ASCII)
    assert offsets == sorted(offsets) and all(o <= len(text) for o in offsets)


def test_echo_token_ids_prompt(client, tokenizer):
    ids = tokenizer.encode(NON_ASCII, add_special_tokens=False)
    r = client.completions.create(model="demo", prompt=ids, echo=True, logprobs=0, max_tokens=0)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == tokenizer.decode(ids)
    check_offsets(r.choices[0].text, lp)


# ------------------------------------------------------------------ chat logprobs
def test_chat_logprobs_bytes_concatenate_to_the_content(client, tokenizer):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, logprobs=True, top_logprobs=2,
                                       **SAMPLED)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    raw = b"".join(bytes(t.bytes) for t in content).decode("utf-8", errors="replace")
    for special in tokenizer.all_special_tokens:  # the text leaves special tokens out
        raw = raw.replace(special, "")
    assert raw == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and all(isinstance(b, int) for b in t.bytes)
        assert all(bytes(a.bytes).decode("utf-8", "replace") == a.token or "\ufffd" in a.token
                   for a in t.top_logprobs)


def test_chat_top_logprobs_zero(client):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, logprobs=True, top_logprobs=0,
                                       max_tokens=3, temperature=0)
    assert all(t.top_logprobs == [] and t.logprob <= 0 for t in r.choices[0].logprobs.content)


def _lp(tokenizer, token_id: int) -> TokenLogprob:
    from brownout.engine.tokens import TokenBytes

    raw = TokenBytes(tokenizer, lambda i: tokenizer.decode([i]))
    return TokenLogprob(token_id, -0.5, top={token_id: -0.5}, text=tokenizer.decode([token_id]),
                        top_texts={token_id: tokenizer.decode([token_id])},
                        token_bytes=raw(token_id), top_bytes={token_id: raw(token_id)})


def test_split_characters_carry_raw_bytes(tokenizer):
    """Tokens that split a character: their strings concatenate to the text (the completing
    token carries the character), their bytes to its UTF-8 bytes."""
    ids = tokenizer.encode(NON_ASCII, add_special_tokens=False)
    lps = [_lp(tokenizer, t) for t in ids]
    assert any(lp.text == "\ufffd" for lp in lps)  # the text does split characters
    content = chat_content(TokenPieces(), lps, 1)
    assert b"".join(bytes(c["bytes"]) for c in content) == NON_ASCII.encode("utf-8")
    assert "".join(c["token"] for c in content) == NON_ASCII
    out = legacy(output_entries(TokenPieces(), lps), 0, len(NON_ASCII))
    assert "".join(out["tokens"]) == NON_ASCII
    ends = out["text_offset"][1:] + [len(NON_ASCII)]
    assert all(NON_ASCII[o:e] == t for o, e, t in zip(out["text_offset"], ends, out["tokens"]))


# ------------------------------------------------------------------ tokenize, detokenize, version
def test_tokenize_prompt_and_messages(root, client, tokenizer):
    r = post(root, "/tokenize", {"model": "demo", "prompt": NON_ASCII})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tokenizer.encode(NON_ASCII, add_special_tokens=True)
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == client.models.retrieve("demo").model_extra["max_model_len"]
    chat = post(root, "/tokenize", {"model": "demo", "messages": MESSAGES}).json()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    usage = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens


def test_detokenize_round_trip(root, tokenizer):
    ids = post(root, "/tokenize", {"prompt": NON_ASCII, "add_special_tokens": False}).json()["tokens"]
    assert post(root, "/detokenize", {"model": "demo", "tokens": ids}).json() == {"prompt": NON_ASCII}


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_tokenize_errors_in_openai_shape(root, path, body, status, param):
    with pytest.raises(openai.APIStatusError) as exc:
        post(root, path, body)
    assert exc.value.status_code == status
    assert exc.value.body["param"] == param


def test_tokenizer_info_and_version(root, tokenizer):
    info = root.get("/tokenizer_info", cast_to=httpx.Response).json()
    assert info["eos_token"] == tokenizer.eos_token
    assert info["chat_template"] == tokenizer.chat_template
    version = root.get("/version", cast_to=httpx.Response).json()["version"]
    import brownout

    assert version == brownout.__version__


# ------------------------------------------------------------------ metrics
VLLM_FAMILIES = {
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:iteration_tokens_total": "histogram",
}


def _families(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(family, suffix: str) -> float:
    return sum(s.value for s in family.samples if s.name == family.name + suffix
               and s.labels.get("model_name") == "demo")


def test_vllm_request_families(server, client, tokenizer):
    before = _families(server)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = _families(server)
    for name, kind in VLLM_FAMILIES.items():
        assert after[name].type == kind, name
        if name != "vllm:iteration_tokens_total":  # one observation per request
            assert _sample(after[name], "_count") == _sample(before[name], "_count") + 1, name
    grew = {name: _sample(after[name], "_sum") - _sample(before[name], "_sum") for name in VLLM_FAMILIES}
    assert grew["vllm:request_prompt_tokens"] == r.usage.prompt_tokens
    assert grew["vllm:request_generation_tokens"] == r.usage.completion_tokens == 5
    assert grew["vllm:request_inference_time_seconds"] == pytest.approx(
        grew["vllm:request_prefill_time_seconds"] + grew["vllm:request_decode_time_seconds"], abs=1e-6)
    iteration = "vllm:iteration_tokens_total"
    steps = _sample(after[iteration], "_count") - _sample(before[iteration], "_count")
    assert steps >= 5 and grew[iteration] >= r.usage.prompt_tokens + 4
