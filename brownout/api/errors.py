"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause maps to a 4xx naming the offending field in `param`:
bad input 400, auth 401, unknown model 404, body too slow 408, body too large 413, not
JSON 415, engine full 429 (with Retry-After, the engine's predicted wait rounded up to
whole seconds), engine dead or server shutting down 503. Pydantic's errors are turned into
400 with the field path.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from brownout.api.engine_client import EngineDeadError, EngineInternalError
from brownout.types import AdmissionError, ValidationError

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
    500: "internal_error", 503: "service_unavailable_error",
}
# Retry-After for a wait the engine could not predict (a prediction that is not finite).
UNKNOWN_RETRY_AFTER_S = 60


def retry_after(seconds: float) -> str:
    """A predicted wait as a Retry-After header value: whole seconds, rounded up, at least 1."""
    if not math.isfinite(seconds):
        return str(UNKNOWN_RETRY_AFTER_S)
    return str(max(1, math.ceil(seconds)))


class APIError(Exception):
    """An error to return to the client as-is."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map engine-side exceptions to the HTTP error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return APIError(400, f"{exc.field}: {exc.message}", param=exc.field)
    if isinstance(exc, AdmissionError):
        retry = retry_after(exc.retry_after_s)
        return APIError(429, f"server is at capacity: {exc}; retry after {retry} s",
                        code="rate_limit_exceeded", headers={"Retry-After": retry})
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"engine unavailable: {exc}", code="engine_dead")
    if isinstance(exc, EngineInternalError):
        return APIError(500, f"engine error: {exc}", code="internal_error")
    logger.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


# Pydantic labels union members with tags such as "str", "list[int]" or "function-after[...]";
# these are not field names, so the path stops there.
_FIELD_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "tuple"}


def field_path(loc: tuple) -> Optional[str]:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and _FIELD_PART.match(part) and part.lower() not in _TYPE_TAGS:
            path += f".{part}" if path else part
        else:
            break
    return path or None


def from_pydantic(errors: list[dict]) -> APIError:
    first = errors[0]
    param = field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", param="body")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        msg = "is required"
    return APIError(400, f"{param or 'body'}: {msg}", param=param or "body")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError):
        return from_pydantic(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    async def _mapped(_: Request, exc: Exception):
        return to_api_error(exc).response()

    # Registered one by one: a handler for plain `Exception` runs in Starlette's outermost
    # middleware, which re-raises after answering and so drops the keep-alive connection.
    for exc_type in (ValidationError, AdmissionError, EngineDeadError, EngineInternalError):
        app.add_exception_handler(exc_type, _mapped)
    app.add_exception_handler(Exception, _mapped)
