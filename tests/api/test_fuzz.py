"""Property-based fuzzing of the real server: generated hostile bodies, headers and framings
(over raw sockets) never get a 5xx and never hang a connection (the server answers or closes
within a bound), and a normal request is still answered after each batch. Also the
connection timeouts one by one: idle connections, half-sent heads and bodies, big heads."""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest
from conftest import start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brownout.api.schemas import ChatCompletionRequest, CompletionRequest

KEY = "fuzz-key"
GOOD_AUTH = b"Bearer " + KEY.encode()
TIMEOUT_S = 1.0  # the server's header, body and keep-alive timeouts in this module
READ_BOUND_S = 60.0  # a connection that neither answers nor closes within this has hung
EXAMPLES = 60  # per fuzz test: about 10 s each on 2 cores
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")
FIELDS = sorted(set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields))
PATHS = ["/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    timeouts = str(TIMEOUT_S)
    args = ["--header-timeout", timeouts, "--body-timeout", timeouts, "--keep-alive-timeout", timeouts,
            "--max-tokens-limit", "4", "--max-prompt-tokens", "64", "--max-body-bytes", "65536"]
    srv = start_server(model_dir, args, tmp_path_factory, env={"BROWNOUT_API_KEY": KEY})
    yield srv
    srv.stop()


def _exchange(server, data: bytes, half_close: bool = False) -> tuple[list[int], bytes]:
    """Send raw bytes; read until the server closes. (status codes seen, bytes read)"""
    with socket.create_connection(("127.0.0.1", server.port), timeout=READ_BOUND_S) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (it refused the head)
            pass
        got = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                pytest.fail(f"connection hung: {data[:200]!r} -> {got[:300]!r}")
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return [int(s) for s in STATUS.findall(got)], got


def _assert_still_serving(server) -> None:
    body = {"prompt": "still here", "max_tokens": 2}
    r = httpx.post(server.url + PATHS[0], json=body, headers={"Authorization": GOOD_AUTH}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    assert "Traceback" not in server.log()


# ------------------------------------------------------------------ bodies
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**70)
            | st.floats() | st.text(st.characters(exclude_categories=()), max_size=12)
            | st.sampled_from([0, -1, 1, 2**64, -2**63 - 1, 1e400, "", "\ud800", "x" * 3000]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard"]),
                                  "content": _SCALARS | st.lists(st.fixed_dictionaries(
                                      {"type": st.just("text"), "text": _SCALARS}), max_size=2)})
_FIELD_VALUES = {"prompt": _VALUES | st.lists(st.integers(-5, 10**10), max_size=70) | st.text(),
                 "messages": st.lists(_MESSAGE, max_size=3) | _VALUES}


@st.composite
def _body(draw) -> bytes:
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    body = {n: draw(_FIELD_VALUES.get(n, _VALUES)) for n in names}
    if draw(st.booleans()):  # most requests carry what a request needs, to get past the first check
        body.setdefault("prompt", "fuzz")
        body.setdefault("messages", [{"role": "user", "content": "fuzz"}])
    text = json.dumps(body)  # NaN and Infinity as Python writes them; surrogates as \ud800
    depth = draw(st.sampled_from([0] * 8 + [40, 5000]))
    if depth:
        text = '{"prompt": ' + "[" * depth + "1" + "]" * depth + "}"
    if draw(st.integers(0, 19)) == 0:
        text = text[:draw(st.integers(1, len(text)))]  # cut short
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(path=st.sampled_from(PATHS), body=_body())
def _run_bodies(server, path, body):
    r = httpx.post(server.url + path, content=body, timeout=READ_BOUND_S,
                   headers={"Authorization": GOOD_AUTH, "Content-Type": "application/json"})
    assert r.status_code < 500, (body[:300], r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"] and "param" in err


def test_fuzz_bodies(server):
    _run_bodies(server)
    _assert_still_serving(server)


# ------------------------------------------------------------------ heads and framings
_HEADER_BYTES = st.binary(max_size=40).filter(lambda b: not any(c in b for c in b"\r\n\x00"))
_HEADERS = st.lists(st.tuples(st.sampled_from([b"Content-Type", b"Authorization", b"X-Any", b"Accept",
                                               b"Transfer-Encoding", b"Content-Length", b"Expect",
                                               b"Connection", b"Bad Name", b"\xff"]), _HEADER_BYTES),
                    max_size=3)


@st.composite
def _request(draw) -> tuple[bytes, bool]:
    method = draw(st.sampled_from([b"POST", b"POST", b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"BREW",
                                   b"P\xffST"]))
    target = draw(st.sampled_from([b"/v1/completions", b"/v1/chat/completions", b"/health", b"/metrics",
                                   b"/openapi.json", b"/%ff%fe", b"/v1/completions?a=%00", b"*",
                                   b"http://x/v1/models", b"/\xff", b"/" + b"a" * 20000]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTX"]))
    body = draw(_body())
    framing = draw(st.sampled_from(["length", "length", "chunked", "bad-chunked", "short", "long",
                                    "none", "both"]))
    headers = [(b"Host", b"fuzz"), (b"Connection", b"close")]
    headers.append((b"Authorization", GOOD_AUTH if draw(st.booleans()) else draw(_HEADER_BYTES)))
    headers.append((b"Content-Type", b"application/json" if draw(st.booleans()) else draw(_HEADER_BYTES)))
    headers += draw(_HEADERS)
    if framing in ("length", "both"):
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "short":
        headers.append((b"Content-Length", str(len(body) // 2).encode()))
    elif framing == "long":
        headers.append((b"Content-Length", str(len(body) + 10).encode()))
    if framing in ("chunked", "bad-chunked", "both"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        size = b"%x" % len(body) if framing != "bad-chunked" else draw(st.sampled_from([b"zz", b"-1", b"ffffffffffffffffff"]))
        body = size + b"\r\n" + body + b"\r\n0\r\n\r\n"
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    return head + body, draw(st.booleans())


@FUZZ
@given(request=_request())
def _run_framings(server, request):
    data, half_close = request
    statuses, got = _exchange(server, data, half_close)
    assert all(s < 500 for s in statuses), (data[:300], got[:500])


def test_fuzz_heads_and_framings(server):
    _run_framings(server)
    _assert_still_serving(server)


@FUZZ
@given(pieces=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4),
       keep_open=st.integers(0, 9))
def _run_garbage(server, pieces, keep_open):
    # mostly half-closed: an unfinished head left open waits out the head timeout
    statuses, _ = _exchange(server, b"".join(pieces), half_close=keep_open > 0)
    assert all(s < 500 for s in statuses)


def test_fuzz_garbage_bytes(server):
    _run_garbage(server)
    _assert_still_serving(server)


# ------------------------------------------------------------------ timeouts one by one
def test_idle_connection_is_closed(server):
    assert _exchange(server, b"") == ([], b"")


def test_half_sent_head_is_closed(server):
    assert _exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty") == ([], b"")


def test_half_sent_body_gets_408(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + GOOD_AUTH + b"\r\nContent-Length: 100\r\n\r\n")
    statuses, got = _exchange(server, head + b'{"prompt": "hal')
    assert statuses == [408], got
    assert b"request_timeout" in got


def test_idle_keep_alive_and_a_half_sent_next_head_are_closed(server):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _exchange(server, request)[0] == [200]  # then closed after the keep-alive timeout
    assert _exchange(server, request + b"GET /hea")[0] == [200]  # closed after the head timeout


def test_big_head_is_refused(server):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    statuses, _ = _exchange(server, head)
    assert statuses in ([400], [431])
    _assert_still_serving(server)
