"""Logprobs in the OpenAI API's two formats, with token strings that concatenate to the text.

A byte-level BPE token may hold only part of a UTF-8 character. Each token's string is its
piece of the text: its raw bytes decoded incrementally after the tokens before it, so a token
that starts a character has an empty string and the token that completes it carries the whole
character (the incremental detokenisation vLLM applies to prompt logprobs). Concatenated, the
strings are the text, and `text_offset` indexes it. Chat logprobs also give each token's raw
`bytes`, which concatenate to the text's UTF-8 bytes.

Completions (legacy): `top_logprobs` holds the top `logprobs` alternatives plus the sampled
token, so up to logprobs + 1 entries; with `logprobs: 0` it holds just the sampled token, as
OpenAI and vLLM return it. Chat: `top_logprobs` holds the `top_logprobs` most likely tokens.
"""

from __future__ import annotations

import codecs
from typing import Optional

from brownout.api.engine_client import TokenLogprob

Entry = tuple[str, Optional[float], Optional[dict[str, float]]]  # token string, logprob, top


class TokenPieces:
    """One choice's token strings: its tokens' bytes decoded one after another."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token_bytes: Optional[bytes], text: str) -> str:
        """The text this token adds; `text` (its own decoded text) when its bytes are unknown."""
        if not token_bytes:
            return text
        return self._decoder.decode(token_bytes)


def _top_dict(lp: TokenLogprob, piece: str) -> dict[str, float]:
    top = {lp.top_texts.get(t, str(t)): v for t, v in lp.top.items() if t != lp.token_id}
    top[piece] = lp.logprob  # the sampled token is always listed, under its own string
    return dict(sorted(top.items(), key=lambda kv: -kv[1]))


def legacy_entry(pieces: TokenPieces, lp: Optional[TokenLogprob], token_bytes: Optional[bytes],
                 text: str) -> Entry:
    """One token of the completions format; no logprob (the first prompt token) gives nulls."""
    piece = pieces.piece(token_bytes, text)
    if lp is None:
        return (piece, None, None)
    return (piece, lp.logprob, _top_dict(lp, piece))


def prompt_entries(pieces: TokenPieces, token_texts: Optional[list[str]],
                   token_bytes: Optional[list[bytes]], prompt_logprobs) -> list[Entry]:
    texts = token_texts or []
    raw = token_bytes or [b""] * len(texts)
    plps = prompt_logprobs or []
    return [legacy_entry(pieces, plps[i] if i < len(plps) else None, raw[i], texts[i])
            for i in range(len(texts))]


def output_entries(pieces: TokenPieces, logprobs: list[TokenLogprob]) -> list[Entry]:
    return [legacy_entry(pieces, lp, lp.token_bytes, lp.text) for lp in logprobs]


def legacy(entries: list[Entry], offset: int, text_len: Optional[int] = None) -> dict:
    """The completions `logprobs` object; offsets start at `offset` and, given the returned
    text's length, never pass it."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece, lp, top in entries:
        out["tokens"].append(piece)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset if text_len is None else min(offset, text_len))
        offset += len(piece)
    return out


def _chat_token(text: str, logprob: float, raw: bytes) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(raw or text.encode("utf-8"))}


def chat_content(pieces: TokenPieces, logprobs: list[TokenLogprob], top_n: int) -> list[dict]:
    """The chat `logprobs.content` list for these generated tokens."""
    content = []
    for lp in logprobs:
        entry = _chat_token(pieces.piece(lp.token_bytes, lp.text), lp.logprob, lp.token_bytes)
        tops = sorted(lp.top.items(), key=lambda kv: -kv[1])[:top_n]
        entry["top_logprobs"] = [_chat_token(lp.top_texts.get(t, ""), v, lp.top_bytes.get(t, b""))
                                 for t, v in tops]
        content.append(entry)
    return content
