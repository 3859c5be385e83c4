"""ASGI guard in front of the API: shutdown refusals, bearer-token auth, JSON only, and a
request body read with a size limit and a deadline.

With a key set, every path but /health and /metrics needs it (the OpenAPI schema and any
docs included); those two stay open for probes and scrapers (bind to 127.0.0.1, the
default, to keep them private). The dashboard's paths also take the key from its cookie,
and its page from `?key=` (a browser navigating sends no header). The key and the
Authorization header are compared as UTF-8 bytes in constant time, so a header or a key of
any bytes is a plain match or mismatch. Requests with a body must say `Content-Type: application/json`: a web page can
POST text/plain (or no type) to a local server without a CORS preflight, but not JSON.
The body is read here up to the limit and replayed to the app, so an oversize body is
refused with 413 without ever being parsed, whether or not the client sent a
Content-Length, and a body that stops arriving is refused with 408 once the body timeout
passes. A head over MAX_HEAD_BYTES is refused with 431. While the server shuts down (brownout.api.drain) new requests get 503.

A response to a connection the HTTP layer has already answered is dropped with a warning:
uvicorn answers a request whose body framing breaks mid-stream (a bad chunk size) with its
own 400 and closes, while the app may still be about to answer it; h11 then refuses the
app's response. The client has its 400 and no other request is involved.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from http.cookies import CookieError, SimpleCookie
from typing import Optional
from urllib.parse import parse_qs, unquote

from brownout.api.drain import Drain
from brownout.api.errors import APIError

try:  # uvicorn's HTTP/1.1 protocol; its error for a response on an answered connection
    from h11 import LocalProtocolError as _AnsweredConnection
except ImportError:  # another server: nothing to drop
    _AnsweredConnection = None
ANSWERED_CONNECTION_ERRORS = (_AnsweredConnection,) if _AnsweredConnection is not None else ()

logger = logging.getLogger(__name__)

# Request line and headers of one request, in bytes: far above any client's (a bearer key
# and a few headers), small enough that a flood of heads holds little memory.
MAX_HEAD_BYTES = 16 * 1024
OPEN_PATHS = frozenset({"/health", "/metrics"})  # no key needed
DRAIN_OPEN_PATHS = frozenset({"/metrics"})  # still served while shutting down
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The dashboard page takes the key once as ?key= and its paths accept it from a cookie, since
# a browser sends no Authorization header when it navigates or loads scripts (see
# brownout.api.dashboard); every other path takes the header only.
DASHBOARD_PAGE = "/dashboard"
DASHBOARD_KEY_PARAM = "key"
DASHBOARD_KEY_COOKIE = "brownout_dashboard_key"
JSON_MEDIA_TYPE = b"application/json"


async def _send_error(send, err: APIError, close: bool = False) -> None:
    """Answer `err`; `close` ends the connection after it (the body was left unread, or the
    server is going away)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _head_bytes(scope) -> int:
    return (len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            + sum(len(k) + len(v) for k, v in scope.get("headers") or []))


def _is_json(content_type: Optional[bytes]) -> bool:
    media_type = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media_type == JSON_MEDIA_TYPE


def _dashboard_keys(scope, headers: dict[bytes, bytes]) -> list[str]:
    """Keys a dashboard request offers: ?key= on the page itself, and the page's cookie."""
    keys = []
    if scope["path"] == DASHBOARD_PAGE:
        query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        keys += query.get(DASHBOARD_KEY_PARAM, [])[:1]
    try:
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
    except CookieError:
        return keys
    if DASHBOARD_KEY_COOKIE in cookie:
        keys.append(unquote(cookie[DASHBOARD_KEY_COOKIE].value))
    return keys


def _dropping_answered(send):
    """`send` that drops messages the HTTP layer refuses because it already answered the
    request (see the module docstring)."""
    answered = False

    async def wrapped(message) -> None:
        nonlocal answered
        if answered:  # the rest of a response the HTTP layer refused
            return
        try:
            await send(message)
        except ANSWERED_CONNECTION_ERRORS as exc:
            answered = True
            logger.warning("response not sent: the connection was already answered and closed (%s)", exc)
    return wrapped


class GuardMiddleware:
    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, body_timeout_s: float,
                 drain: Drain):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode("utf-8")
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.drain = drain

    def _authorized(self, scope, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return True
        path = scope["path"]
        if path != DASHBOARD_PAGE and not path.startswith(DASHBOARD_PAGE + "/"):
            return False
        return any(hmac.compare_digest(key.encode("utf-8"), self.api_key)
                   for key in _dashboard_keys(scope, headers))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _dropping_answered(send)
        if self.drain.draining and scope["path"] not in DRAIN_OPEN_PATHS:
            return await _send_error(send, self.drain.error(), close=True)
        if _head_bytes(scope) > MAX_HEAD_BYTES:
            return await _send_error(send, APIError(
                431, f"request line and headers exceed {MAX_HEAD_BYTES} bytes", param="headers",
                code="headers_too_large"), close=True)
        self.drain.enter()
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.drain.leave()

    async def _guarded(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        if not self._authorized(scope, headers):
            how = ("open /dashboard?key=<key> once" if scope["path"].startswith(DASHBOARD_PAGE)
                   else "send 'Authorization: Bearer <key>'")
            return await _send_error(send, APIError(401, f"missing or invalid API key ({how})",
                                                    code="invalid_api_key"))
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        if not _is_json(headers.get(b"content-type")):
            return await _send_error(send, APIError(
                415, "Content-Type must be application/json", param="Content-Type",
                code="unsupported_media_type"), close=True)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, self._too_large(), close=True)
        try:
            body = await self._read_body(receive)
        except APIError as err:
            return await _send_error(send, err, close=True)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        return await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.max_body_bytes} bytes",
                        param="body", code="request_too_large")

    async def _read_body(self, receive) -> Optional[bytes]:
        """The whole body; None if the client disconnected; APIError 408 or 413."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise APIError(408, f"request body not received within {self.body_timeout_s:g} s",
                               param="body", code="request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
