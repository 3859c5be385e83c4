"""Request bodies parsed with limits, so no JSON a client sends can fail the server.

`load_json` refuses (400, naming the field where there is one):
- text that is not UTF-8/16/32 or not JSON;
- nesting deeper than MAX_JSON_DEPTH (measured by a flat scan before parsing, so json's
  recursive parser never sees a document deep enough to exhaust the stack);
- number literals longer than MAX_NUMBER_CHARS (CPython refuses to convert integers of more
  than 4300 digits with a ValueError, and long literals are costly to convert);
- floats that are not finite: NaN and Infinity (not JSON, but Python's parser takes them)
  and literals such as 1e400 that overflow to infinity;
- strings and keys that are not valid Unicode text (a lone surrogate such as "\\ud800"
  parses, then fails every encoder downstream, the tokenizer's included).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from brownout.api.errors import APIError, field_path

# Request bodies nest 5 levels at most (messages[i].content[j].text); far deeper input is
# refused before json's recursive parser runs.
MAX_JSON_DEPTH = 32
# Characters of one number literal: 2**64 has 20 digits and a float's shortest repr at
# most 24, so longer literals are never a legitimate value of any field.
MAX_NUMBER_CHARS = 100

# A JSON string (escapes included), an opening bracket, or a closing one.
_SCAN = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|([\[{])|([\]}])')
_OPEN, _CLOSE = 2, 3  # group numbers in _SCAN
# Element types that hold nothing to check (ints are range-checked by the schemas).
_PLAIN_TYPES = frozenset({int, bool, type(None)})


class _OversizeNumber:
    """Stands in for a number literal too long to convert; reported with its field."""

    __slots__ = ("chars",)

    def __init__(self, literal: str):
        self.chars = len(literal)


def _parse_int(literal: str):
    return _OversizeNumber(literal) if len(literal) > MAX_NUMBER_CHARS else int(literal)


def _parse_float(literal: str):
    return _OversizeNumber(literal) if len(literal) > MAX_NUMBER_CHARS else float(literal)


def _parse_constant(name: str) -> float:
    return float(name)  # NaN, Infinity, -Infinity: refused with their field by the walk


def _decode(raw: bytes) -> str:
    try:  # as json.loads decodes bytes; lone surrogates are reported with their field
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 text: {exc.reason} at byte "
                            f"{exc.start}", param="body") from None


def _check_depth(text: str) -> None:
    depth = 0
    for match in _SCAN.finditer(text):
        group = match.lastindex
        if group == _OPEN:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                               param="body")
        elif group == _CLOSE:
            depth -= 1


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem(value: Any) -> Optional[str]:
    """What is wrong with one scalar, or None."""
    if isinstance(value, str):
        if not _is_text(value):
            return "is not valid Unicode text (it holds a lone surrogate such as \\ud800)"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
    elif isinstance(value, _OversizeNumber):
        return f"number literal has {value.chars} characters; at most {MAX_NUMBER_CHARS} are accepted"
    return None


def _first_problem(data: Any) -> Optional[tuple[tuple, str]]:
    """(path, message) of the first bad scalar or key; iterative (depth is already bounded)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key in node:
                if not _is_text(key):
                    return path, "has a key that is not valid Unicode text (a lone surrogate)"
            items = node.items()
        elif set(map(type, node)) <= _PLAIN_TYPES:  # e.g. a long list of token ids
            continue
        else:
            items = enumerate(node)
        for key, value in items:
            if isinstance(value, (dict, list)):
                stack.append((value, path + (key,)))
                continue
            problem = _problem(value)
            if problem is not None:
                return path + (key,), problem
    return None


def load_json(raw: bytes) -> dict:
    """The request body as a JSON object, within the limits above; else APIError 400."""
    text = _decode(raw)
    _check_depth(text)
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except ValueError as exc:  # JSONDecodeError and any conversion error
        raise APIError(400, f"request body is not valid JSON: {exc}", param="body") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", param="body")
    found = _first_problem(data)
    if found is not None:
        path, problem = found
        param = field_path(path) or "body"
        raise APIError(400, f"{param}: {problem}", param=param)
    return data
