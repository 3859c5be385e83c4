"""Incremental detokenisation with stop-string handling.

Decodes a short window of recent tokens each step and emits only text that is final: a
trailing replacement character (an incomplete UTF-8 sequence) waits for the next token, and
when stop strings are set the last `len(longest stop) - 1` characters are held back until
it is certain they do not start a stop string.

With a fast tokenizer whose decode needs no Python post-processing, the window is decoded by
the `tokenizers` library's own `DecodeStream` (one native call per token; the engine runs
this for every running request every step, and the Python path costs ~4x more).
"""

from __future__ import annotations

from typing import Optional

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output so leading spaces come out right


def _decode_stream(tokenizer, context: list[int]):
    """(DecodeStream seeded with the prompt context, backend tokenizer), or None when the
    tokenizer has no native backend or its Python decode does more (space clean-up)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if backend.decode(context, skip_special_tokens=True).endswith("\ufffd"):
        return None  # a context cut inside a character: the Python window handles it
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=True), backend
    except (ImportError, TypeError):  # tokenizers without a seeded DecodeStream
        return None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.stream = _decode_stream(tokenizer, self.ids) if tokenizer is not None else None
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded output text
        self.emitted = 0  # characters of self.text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        if self.stream is not None:
            stream, backend = self.stream
            chunk = stream.step(backend, token_id)
            if chunk:
                self.text += chunk
            return
        self.ids.append(token_id)
        if self.tokenizer is None:
            return
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def find_stop(self) -> Optional[int]:
        """Index in `text` where the output must end because of a stop string, if any."""
        start = max(0, self.emitted - self.hold)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(s))
        if best is None:
            return None
        return best[0] + (best[1] if self.include_stop else 0)

    def flush(self, finished: bool, cut: Optional[int] = None) -> str:
        """Text that became final since the last call."""
        if cut is not None:
            self.text = self.text[:cut]
            end = len(self.text)
        elif finished:
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - (self.hold if self.stop else 0))
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
