"""Tokens as the API shows them: each token's raw bytes, and the tokenizer queries the HTTP
process asks for (/tokenize, /detokenize, /tokenizer_info).

A byte-level BPE token may hold part of a UTF-8 character, so its decoded text alone is
'\\ufffd'; its raw bytes are what concatenate to the text. This module is torch-free at import
time (the worker process imports it before it builds the engine).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from brownout.types import ValidationError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte-fallback pieces
_SPIECE_SPACE = "\u2581"  # SentencePiece's word-start marker, a space in the text


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE table (character of a token -> the byte it stands for): the
    printable bytes stand for themselves, the others for 256 + their rank. Written here as
    the layering keeps transformers, which has it, out of the worker's imports."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + rank): b for rank, b in enumerate(others)})
    return table


def _decoder_type(tokenizer) -> Optional[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ if decoder is not None else None


class TokenBytes:
    """token id -> the token's raw bytes (those of its text when no finer rule applies)."""

    def __init__(self, tokenizer, decode_one: Callable[[int], str]):
        self.tokenizer = tokenizer
        self.decode_one = decode_one
        self.added = {int(i): str(t) for i, t in
                      (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
        self.byte_decoder: Optional[dict[str, int]] = None
        if tokenizer is not None and _decoder_type(tokenizer) == "ByteLevel":
            self.byte_decoder = byte_level_alphabet()

    def __call__(self, token_id: int) -> bytes:
        if self.tokenizer is None:
            return b""
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self.byte_decoder is not None and all(c in self.byte_decoder for c in piece):
                return bytes(self.byte_decoder[c] for c in piece)
            fallback = _BYTE_FALLBACK.match(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            if self.byte_decoder is None and _SPIECE_SPACE in piece:
                return piece.replace(_SPIECE_SPACE, " ").encode("utf-8")
        return self.decode_one(token_id).encode("utf-8")


def _tokenizer(engine: Any):
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise ValidationError("model", "this model has no tokenizer")
    return tokenizer


def _tokenize(engine: Any, payload: dict) -> dict:
    tokenizer = _tokenizer(engine)
    messages = payload.get("messages")
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValidationError("messages", "this model has no chat template")
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=payload.get("add_generation_prompt", True))
        except Exception as exc:  # jinja errors on odd messages: the client's fault
            raise ValidationError("messages", f"cannot apply the chat template: {exc}") from exc
    else:
        text = payload["prompt"]
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=payload.get("add_special_tokens", True))]
    out = {"count": len(ids), "max_model_len": int(engine.max_model_len), "tokens": ids}
    if payload.get("return_token_strs"):
        out["token_strs"] = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return out


def _detokenize(engine: Any, payload: dict) -> dict:
    tokenizer = _tokenizer(engine)
    ids = payload["tokens"]
    vocab = int(engine.spec.vocab_size) if getattr(engine, "spec", None) is not None else len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValidationError("tokens", f"token ids must be in [0, {vocab - 1}], got {bad[0]}")
    return {"prompt": tokenizer.decode(ids)}


def _tokenizer_info(engine: Any, payload: dict) -> dict:
    tokenizer = _tokenizer(engine)
    info = {"tokenizer_class": type(tokenizer).__name__,
            "model_max_length": int(engine.max_model_len),
            "chat_template": getattr(tokenizer, "chat_template", None)}
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        info[name] = None if value is None else str(value)
    return info


QUERIES = {"tokenize": _tokenize, "detokenize": _detokenize, "tokenizer_info": _tokenizer_info}


def tokenizer_query(engine: Any, kind: str, payload: dict) -> Any:
    """The answer to one tokenizer query; ValidationError for a bad one."""
    if kind not in QUERIES:
        raise ValidationError("kind", f"unknown query {kind!r}")
    return QUERIES[kind](engine, payload)
