"""Input that used to fail the server (seeds past 64 bits, lone surrogates, deep JSON, huge or
infinite numbers, non-ASCII keys, oversize work) gets a 4xx naming the field; bodies must be
JSON; the key guards the OpenAPI schema too; the server keeps serving throughout."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import start_server

KEY = "clé-🔑-secret"  # non-ASCII: compared as UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + KEY.encode("utf-8")}
JSON = {"Content-Type": "application/json"}
COMP = "/v1/completions"
CHAT = "/v1/chat/completions"
MAX_PROMPT = 64  # --max-prompt-tokens: text prompts are bounded to 64 x 32 characters
MAX_REQUEST = 256  # --max-request-tokens
HUGE_ID = 10**9  # past any vocabulary, within 64 bits


def comp_raw(fields: str) -> bytes:
    """A completions body with `fields` (raw JSON text) after a valid prompt."""
    return ('{"prompt": "hello", "max_tokens": 2, ' + fields + "}").encode()


def comp(**kw) -> bytes:
    return json.dumps({"prompt": "hello", "max_tokens": 2, **kw}).encode()


def chat(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}).encode()


# (name, path, raw body, expected param)
CASES = [
    ("seed 2**64", COMP, comp(seed=2**64), "seed"),
    ("seed below -2**63", COMP, comp(seed=-2**63 - 1), "seed"),
    ("seed of 5000 digits", COMP, comp_raw('"seed": ' + "9" * 5000), "seed"),
    ("integer of 5000 digits", COMP, comp_raw('"top_k": ' + "1" * 5000), "top_k"),
    ("priority past int64", COMP, comp(priority=2**63), "priority"),
    ("top_k past int64", COMP, comp(top_k=2**70), "top_k"),
    ("temperature 1e400", COMP, comp_raw('"temperature": 1e400'), "temperature"),
    ("top_p NaN", COMP, comp_raw('"top_p": NaN'), "top_p"),
    ("temperature -Infinity", COMP, comp_raw('"temperature": -Infinity'), "temperature"),
    ("float of 5000 digits", COMP, comp_raw('"top_p": 0.' + "1" * 5000), "top_p"),
    ("lone surrogate prompt", COMP, b'{"prompt": "x\\ud800y", "max_tokens": 2}', "prompt"),
    ("lone low surrogate prompt", COMP, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("surrogate as raw bytes", COMP, b'{"prompt": "x\xed\xa0\x80y", "max_tokens": 2}', "prompt"),
    ("surrogate in a message", CHAT,
     b'{"messages": [{"role": "user", "content": "a\\ud83db"}], "max_tokens": 2}', "messages[0].content"),
    ("surrogate in a stop string", COMP, comp_raw('"stop": ["\\ud800"]'), "stop[0]"),
    ("surrogate in an ignored field", COMP, comp_raw('"user": "\\ud800"'), "user"),
    ("JSON 100000 deep", COMP, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    ("JSON deep in a message", CHAT, b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", "body"),
    ("prompt token id past the vocabulary", COMP, comp(prompt=[1, HUGE_ID]), "prompt"),
    ("prompt token id past int64", COMP, comp(prompt=[1, 2**64]), "prompt"),
    ("stop token id past the vocabulary", COMP, comp(stop_token_ids=[HUGE_ID]), "stop_token_ids"),
    ("negative stop token id", CHAT, chat(stop_token_ids=[-1]), "stop_token_ids"),
    ("too many stop token ids", COMP, comp(stop_token_ids=[1] * 1000), "stop_token_ids"),
    ("65 prompts", COMP, comp(prompt=["a"] * 65), "prompt"),
    ("text prompt past its character bound", COMP, comp(prompt="word " * 1000), "prompt"),
    ("3 MB text prompt", COMP, comp(prompt="x" * 3_000_000), "prompt"),
    ("token prompts past the request bound", COMP, comp(prompt=[[5] * 60] * 5), "prompt"),
    ("64 prompts of 2000 token ids", COMP, comp(prompt=[[5] * 2000] * 64), "prompt"),
    ("text prompts past the request bound", COMP, comp(prompt=["word " * 400] * 10), "prompt"),
    ("chat content past its character bound", CHAT,
     chat(messages=[{"role": "user", "content": "x" * 5000}]), "messages"),
    ("thousands of empty messages", CHAT, chat(messages=[{"role": "user", "content": ""}] * 5000),
     "messages"),
]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ["--max-prompt-tokens", str(MAX_PROMPT), "--max-request-tokens", str(MAX_REQUEST),
            "--max-tokens-limit", "16"]
    srv = start_server(model_dir, args, tmp_path_factory, env={"BROWNOUT_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.mark.parametrize("name,path,raw,param", CASES, ids=[c[0] for c in CASES])
def test_refused_with_the_field(http, name, path, raw, param):
    r = http.post(path, content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1, -1, -2**63])
def test_every_seed_the_generator_takes_is_served(http, seed):
    r = http.post(COMP, content=comp(seed=seed, temperature=0.8), headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_only_json_bodies(http, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    request = http.build_request("POST", COMP, content=comp(), headers=headers)
    if content_type is None:
        request.headers.pop("Content-Type", None)
    r = http.send(request)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["param"] == "Content-Type"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_is_served(http, content_type):
    r = http.post(COMP, content=comp(), headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", "Bearer clé".encode("latin-1"),
                                   b"Bearer " + KEY.encode("utf-8")[:-1], b"\xc3\xa9",
                                   KEY.encode("utf-8"), b"Basic " + KEY.encode("utf-8")])
def test_bad_authorization_is_401(server, value):
    r = httpx.post(server.url + COMP, content=comp(), headers={**JSON, "Authorization": value})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/v1/models"])
def test_schema_and_docs_need_the_key(server, http, path):
    assert httpx.get(server.url + path).status_code == 401
    assert http.get(path).status_code in (200, 404)


def test_openapi_with_the_key(http):
    assert http.get("/openapi.json").json()["info"]["title"] == "brownout-serve"


def test_probes_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_still_serving_and_nothing_failed(server, http):
    """Runs after the rest: the engine survived everything above, with no traceback logged."""
    r = http.post(COMP, content=comp(seed=5, temperature=0.7), headers=JSON)
    assert r.status_code == 200, r.text
    r = http.post(CHAT, content=chat(), headers=JSON)
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "Traceback" not in server.log()
