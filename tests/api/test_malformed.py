"""Malformed requests each get the right 4xx naming the field; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import start_server

from brownout.api.schemas import MAX_N

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
MAX_BODY = 64 * 1024
MAX_PROMPT = 64
MAX_TOKENS = 128


def comp(**kw):
    return {"model": "demo", "prompt": "hello", "max_tokens": 2, **kw}


def chat(**kw):
    return {"model": "demo", "messages": MSGS, "max_tokens": 2, **kw}


def drop(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (name, path, body (dict, or raw bytes), expected status, expected param)
CASES = [
    ("bad json", COMP, b'{"prompt": "x",', 400, "body"),
    ("json array body", COMP, b'[1, 2]', 400, "body"),
    ("missing prompt", COMP, drop(comp(), "prompt"), 400, "prompt"),
    ("prompt wrong type", COMP, comp(prompt=123), 400, "prompt"),
    ("prompt empty string", COMP, comp(prompt=""), 400, "prompt"),
    ("prompt empty list", COMP, comp(prompt=[]), 400, "prompt"),
    ("prompt negative id", COMP, comp(prompt=[1, -5]), 400, "prompt"),
    ("prompt id beyond vocab", COMP, comp(prompt=[10**9]), 400, "prompt"),
    ("prompt too long", COMP, comp(prompt=list(range(3, 3 + MAX_PROMPT + 10))), 400, "prompt"),
    ("unknown model", COMP, comp(model="gpt-17"), 404, "model"),
    ("model wrong type", COMP, comp(model=5), 400, "model"),
    ("n=0", COMP, comp(n=0), 400, "n"),
    ("n above its maximum", COMP, comp(n=MAX_N + 1), 400, "n"),
    ("negative max_tokens", COMP, comp(max_tokens=-1), 400, "max_tokens"),
    ("zero max_tokens without echo", COMP, comp(max_tokens=0), 400, "max_tokens"),
    ("max_tokens above limit", COMP, comp(max_tokens=MAX_TOKENS + 1), 400, "max_tokens"),
    ("max_tokens string", COMP, comp(max_tokens="5"), 400, "max_tokens"),
    ("max_tokens float", COMP, comp(max_tokens=2.5), 400, "max_tokens"),
    ("top_p=0", COMP, comp(top_p=0), 400, "top_p"),
    ("top_p>1", COMP, comp(top_p=1.5), 400, "top_p"),
    ("temperature=-1", COMP, comp(temperature=-1), 400, "temperature"),
    ("temperature string", COMP, comp(temperature="hot"), 400, "temperature"),
    ("top_k=0", COMP, comp(top_k=0), 400, "top_k"),
    ("logprobs=99", COMP, comp(logprobs=99), 400, "logprobs"),
    ("stop list too long", COMP, comp(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop empty string", COMP, comp(stop=[""]), 400, "stop"),
    ("stop wrong type", COMP, comp(stop=7), 400, "stop"),
    ("seed string", COMP, comp(seed="x"), 400, "seed"),
    ("stream not bool", COMP, comp(stream="yes"), 400, "stream"),
    ("stream_options without stream", COMP, comp(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("presence_penalty", COMP, comp(presence_penalty=0.5), 400, "presence_penalty"),
    ("best_of below n", COMP, comp(n=3, best_of=2), 400, "best_of"),
    ("best_of streamed", COMP, comp(best_of=3, stream=True), 400, "best_of"),
    ("missing messages", CHAT, drop(chat(), "messages"), 400, "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages"),
    ("role invalid", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "messages[0].role"),
    ("role missing", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("content wrong type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content"),
    ("image content part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content"),
    ("chat n above its maximum", CHAT, chat(n=MAX_N + 1), 400, "n"),
    ("chat negative max_completion_tokens", CHAT, chat(max_completion_tokens=-3), 400,
     "max_completion_tokens"),
    ("chat logprobs not bool", CHAT, chat(logprobs=5), 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs=30", CHAT, chat(logprobs=True, top_logprobs=30), 400, "top_logprobs"),
    ("chat prompt too long", CHAT, chat(messages=[{"role": "user", "content": "word " * 400}]), 400,
     "messages"),
    ("chat unknown model", CHAT, chat(model="nope"), 404, "model"),
    ("body too large", COMP, comp(prompt="x" * (MAX_BODY + 10)), 413, "body"),
]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ["--served-model-name", "demo", "--api-key", KEY, "--max-body-bytes", str(MAX_BODY),
            "--max-prompt-tokens", str(MAX_PROMPT), "--max-tokens-limit", str(MAX_TOKENS)]
    srv = start_server(model_dir, args, tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def test_table_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(http, name, path, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_auth_required(server, headers):
    r = httpx.post(server.url + COMP, json=comp(), headers=headers, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_key_on_the_command_line_is_warned_about(server):
    server.log()  # flushes
    # the whole log: the warning comes at start-up, before the access lines of earlier tests
    assert "visible to every local user in the process list" in server.log_path.read_text()


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_route_is_openai_shaped(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_normal_requests_still_work(http):
    """Runs after the table: nothing above hurt the engine."""
    r = http.post(COMP, json=comp(max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    r = http.post(CHAT, json=chat(max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = http.post(COMP, json=comp(prompt="x", echo=True, max_tokens=0, logprobs=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0
