"""The HTTP edge's parts without a server: the limited JSON parser (property-based), request
limits, Retry-After values, abort counting, the shutdown drain, the guard, API key sources."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brownout.api.body import MAX_JSON_DEPTH, MAX_NUMBER_CHARS, load_json
from brownout.api.drain import Drain
from brownout.api.errors import APIError, to_api_error
from brownout.api.generation import check_finish
from brownout.api.launch import add_arguments, build_configs
from brownout.api.limits import MAX_CHARS_PER_TOKEN, RequestLimits
from brownout.api.metrics import ServerMetrics
from brownout.api.middleware import GuardMiddleware
from brownout.types import AdmissionError
from brownout.types import FinishReason, RequestMetrics, RequestOutput, ValidationError
from conftest import REPO

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _refusal(raw: bytes):
    try:
        return load_json(raw)
    except APIError as err:
        assert err.status == 400 and err.param and err.message
        return err


@FUZZ
@given(st.binary(max_size=256))
def test_any_bytes_parse_or_get_400(raw):
    out = _refusal(raw)
    assert isinstance(out, (dict, APIError))


# JSON text built from hostile pieces: deep brackets, long numbers, non-finite numbers,
# lone surrogates, and ordinary values.
_ATOMS = st.sampled_from(['1', '-0', '1e400', '-1e400', 'NaN', 'Infinity', '-Infinity',
                          '9' * (MAX_NUMBER_CHARS + 1), '0.' + '5' * (MAX_NUMBER_CHARS + 1),
                          '"\\ud800"', '"\\udfff"', '"ok"', '"\\ud83d\\ude00"', 'true', 'null',
                          '18446744073709551616', '"\\u0000"', '1.5'])


@st.composite
def _hostile_json(draw):
    depth = draw(st.integers(0, 3 * MAX_JSON_DEPTH))
    atom = draw(_ATOMS)
    key = draw(st.sampled_from(['"prompt"', '"seed"', '"\\ud800"', '"messages"']))
    inner = "[" * depth + atom + "]" * depth
    return ("{" + key + ": " + inner + "}").encode()


@FUZZ
@given(_hostile_json())
def test_hostile_json_parses_clean_or_gets_400(raw):
    out = _refusal(raw)
    if isinstance(out, dict):  # what passes is plain, finite, encodable JSON
        text = json.dumps(out, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=30))
def test_ordinary_json_round_trips(value):
    body = {"v": value}
    assert load_json(json.dumps(body).encode()) == body


def test_depth_limit_is_exact():
    ok = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert load_json(ok)
    deep = b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    with pytest.raises(APIError, match="deeper"):
        load_json(deep)
    brackets_in_strings = json.dumps({"a": "[" * 10_000 + '\\"{'}).encode()
    assert load_json(brackets_in_strings)


def test_refusals_name_the_field():
    cases = {b'{"messages": [{"content": "\\ud800"}]}': "messages[0].content",
             b'{"logit_bias": {"7": 1e999}}': "logit_bias",
             b'{"seed": ' + b"1" * 200 + b"}": "seed"}
    for raw, param in cases.items():
        with pytest.raises(APIError) as err:
            load_json(raw)
        assert err.value.param == param


LIMITS = RequestLimits(max_prompt_tokens=100, max_request_tokens=300, vocab_size=1000)


@pytest.mark.parametrize("prompts,ok", [
    (["x" * 100 * MAX_CHARS_PER_TOKEN], True),
    (["x" * (100 * MAX_CHARS_PER_TOKEN + 1)], False),
    ([[5] * 100] * 3, True),
    ([[5] * 100] * 3 + [[5]], False),
    ([[5] * 101], False),
    ([[999]], True),
    ([[1000]], False),
    ([[-1]], False),
])
def test_request_limits(prompts, ok):
    if ok:
        LIMITS.check_prompts(prompts)
    else:
        with pytest.raises(ValidationError) as err:
            LIMITS.check_prompts(prompts)
        assert err.value.field == "prompt"


@pytest.mark.parametrize("predicted,header", [(61.2, "62"), (0.3, "1"), (5.0, "5"),
                                              (math.inf, "60"), (math.nan, "60")])
def test_retry_after_is_the_prediction_rounded_up(predicted, header):
    err = to_api_error(AdmissionError("full", predicted))
    assert err.status == 429 and err.headers["Retry-After"] == header


def test_queue_timeout_retry_after_is_the_time_waited():
    out = RequestOutput("r", [1], [], "", [], finished=True, finish_reason=FinishReason.TIMEOUT,
                        metrics=RequestMetrics(arrival_time=100.0, finished_time=142.5))
    with pytest.raises(APIError) as err:
        check_finish(out)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "43"


def _aborts(m: ServerMetrics) -> float:
    return m.request_success.labels("demo", "abort")._value.get()


def test_aborts_are_counted_once():
    m = ServerMetrics("demo")
    m.on_request_start("a", 0.0)
    m.on_request_end("a")  # aborted by its client
    m.on_request_end("a")
    m.on_request_end("never-started")
    assert _aborts(m) == 1
    m.on_request_start("b", 0.0)
    done = RequestOutput("b", [1], [2], "x", [2], finished=True, finish_reason=FinishReason.LENGTH)
    m.on_step(1.0, [done], None, {})
    m.on_request_end("b")  # finished before the abort came: not an abort
    assert _aborts(m) == 1
    assert m.request_success.labels("demo", "length")._value.get() == 1


def test_drain_waits_for_requests_in_flight():
    async def go():
        drain = Drain()
        drain.enter()
        run = asyncio.create_task(drain.run(timeout_s=600))
        await asyncio.sleep(0)
        assert drain.draining and not run.done()
        assert drain.error().status == 503 and int(drain.error().headers["Retry-After"]) > 1
        drain.leave()
        await run
        return drain.expired

    assert asyncio.run(go()) is False


def test_drain_ends_what_is_left_after_the_timeout():
    async def go():
        drain = Drain()
        drain.enter()
        watched: asyncio.Queue = asyncio.Queue()
        drain.watch(watched)
        run = asyncio.create_task(drain.run(timeout_s=0))
        err = await watched.get()  # put there once the timeout passed
        assert isinstance(err, APIError) and err.status == 503
        late: asyncio.Queue = asyncio.Queue()
        drain.watch(late)  # a request reaching the engine afterwards ends at once
        assert late.get_nowait().code == "server_shutting_down"
        drain.leave()
        await run
        return drain.expired

    assert asyncio.run(go()) is True


async def _call(guard: GuardMiddleware, headers: list, messages: list, path: str = "/v1/completions"):
    sent = []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    pending = iter(messages)

    async def receive():
        try:
            return next(pending)
        except StopIteration:
            await asyncio.Event().wait()  # the rest of the body never comes

    async def send(message):
        sent.append(message)

    await guard(scope, receive, send)
    return sent[0]["status"] if sent else None, dict(sent[0]["headers"]) if sent else {}


def _guard(key="k€y", body_timeout_s=600.0):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    return GuardMiddleware(app, api_key=key, max_body_bytes=100, body_timeout_s=body_timeout_s,
                           drain=Drain())


@pytest.mark.parametrize("auth,status", [
    (b"Bearer k\xe2\x82\xacy", 200), (b"bearer  k\xe2\x82\xacy ", 200), (b"Bearer k\x80y", 401),
    (b"Bearer \xff", 401), (b"", 401), (b"Bearer", 401), (b"k\xe2\x82\xacy", 401)])
def test_guard_compares_keys_as_bytes(auth, status):
    headers = [(b"authorization", auth), (b"content-type", b"application/json")]
    got, _ = asyncio.run(_call(_guard(), headers, [{"type": "http.request", "body": b"{}"}]))
    assert got == status


def test_guard_times_out_a_half_sent_body():
    headers = [(b"content-type", b"application/json"), (b"content-length", b"50")]
    part = [{"type": "http.request", "body": b"{", "more_body": True}]
    status, sent_headers = asyncio.run(_call(_guard(key=None, body_timeout_s=0), headers, part))
    assert status == 408 and sent_headers[b"connection"] == b"close"


def test_guard_drops_a_response_to_an_already_answered_connection():
    """uvicorn answers a body whose framing breaks with its own 400; h11 then refuses the
    app's response. The guard drops it (no exception reaches the server's error log); any
    other send failure still propagates."""
    import h11

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}

    def run(error):
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            raise error

        return asyncio.run(_guard(key=None)(scope, receive, send))

    assert run(h11.LocalProtocolError("can't handle event type Response when role=SERVER and "
                                      "state=MUST_CLOSE")) is None
    with pytest.raises(RuntimeError):
        run(RuntimeError("another failure"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_api_key_sources(tmp_path, caplog):
    parse = _parser().parse_args
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-ключ\n", encoding="utf-8")
    assert build_configs(parse(["--api-key-file", str(key_file)]), {})[1].api_key == "s3cret-ключ"
    assert build_configs(parse([]), {"BROWNOUT_API_KEY": "from-env"})[1].api_key == "from-env"
    assert build_configs(parse([]), {})[1].api_key is None
    with caplog.at_level("WARNING"):
        assert build_configs(parse(["--api-key", "flag"]), {"BROWNOUT_API_KEY": "x"})[1].api_key == "flag"
    assert "process list" in caplog.text


@pytest.mark.parametrize("argv,env,field", [
    (["--api-key", ""], {}, "api_key"),
    ([], {"BROWNOUT_API_KEY": ""}, "BROWNOUT_API_KEY"),
    (["--api-key", " padded"], {}, "api_key"),
    (["--api-key-file", "/nonexistent/key"], {}, "api_key_file"),
])
def test_bad_api_keys_are_refused(argv, env, field):
    with pytest.raises(ValidationError) as err:
        build_configs(_parser().parse_args(argv), env)
    assert err.value.field == field


def test_empty_key_file_is_refused(tmp_path):
    empty = tmp_path / "key"
    empty.write_text("\n")
    with pytest.raises(ValidationError) as err:
        build_configs(_parser().parse_args(["--api-key-file", str(empty)]), {})
    assert err.value.field == "api_key_file" and "empty" in err.value.message


def test_empty_key_refuses_to_start():
    proc = subprocess.run([sys.executable, "-m", "brownout.cli", "serve", "--api-key", ""], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--api-key: must not be empty" in proc.stderr
