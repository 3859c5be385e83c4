"""Prompt and output-length sources for load benchmarks, and the request list they make.

SPEC strings, `KIND:key=value,...`:
  synthetic[:prompt_len=128,output_len=64]   random common words, about one token each
  sharegpt:path=P[,output_len=128]           ShareGPT first user turns (a JSON list of
                                             {"conversations": [{"value": ...}, ...]} or of strings)
  alpaca:path=P[,tokenizer=T,max_output=1024] AlpacaEval outputs: {"instruction", "output"};
                                             the real answer's length in tokens becomes
                                             max_tokens (counted with `tokenizer`, a
                                             tokenizer.json, or words * 1.3 without one)
Length hints from the workload win: a trace's GeneratedTokens sets max_tokens for every
source, its ContextTokens sets the prompt length of synthetic prompts (real prompts are
used as they are). Files are read only when their source is chosen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from brownout.bench.workloads import Arrival, parse_spec
from brownout.types import ValidationError

logger = logging.getLogger(__name__)

# Common English words: each is a single token for typical BPE vocabularies.
_WORDS = ("the of and to in is was for on that with as by at from his her they this which "
          "be or are an had not but were have one all their there been has when more who "
          "will would time out so up said into them some can what other its about than "
          "only over new years may after most first also any could these two people made "
          "many then well such even back where much because good through long little city "
          "work life day world just great water house light place every small under war "
          "right old own hand part high year between large end state come never each same "
          "name still three found down side power left point line sun river king").split()


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    output_len: Optional[int] = None  # the source's suggestion for max_tokens
    prompt_len: Optional[int] = None  # estimated prompt tokens


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    send_time_s: float
    prompt: str
    max_tokens: int
    prompt_len_hint: Optional[int] = None


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Tokens in `text`: `tokenizer.encode` (or a callable) if given, else words * 1.3."""
    if tokenizer is None:
        return max(1, round(len(text.split()) * 1.3))
    enc = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
    ids = getattr(enc, "ids", enc)  # `tokenizers` returns an Encoding
    return max(1, len(ids))


def synthetic_text(num_tokens: int, rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, size=max(1, int(num_tokens))).tolist())


class PromptSource:
    """Draws prompts in a seeded random order, cycling through the pool without repeats."""

    name = "base"
    default_output_len = 128

    def __init__(self, pool: Sequence[Prompt]):
        if not pool:
            raise ValidationError(f"prompts.{self.name}", "no usable prompts")
        self.pool = list(pool)

    def draw(self, n: int, rng: np.random.Generator, hints: Sequence[Optional[int]]) -> list[Prompt]:
        order = np.concatenate([rng.permutation(len(self.pool))
                                for _ in range(-(-n // len(self.pool)))])[:n]
        return [self.pool[i] for i in order]


class SyntheticSource(PromptSource):
    name = "synthetic"

    def __init__(self, prompt_len: int = 128, output_len: int = 64):
        self.prompt_len, self.default_output_len = prompt_len, output_len

    def draw(self, n, rng, hints):
        out = []
        for hint in list(hints) + [None] * (n - len(hints)):
            length = hint or self.prompt_len
            out.append(Prompt(synthetic_text(length, rng), self.default_output_len, length))
        return out[:n]


def _load_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"prompts.{what}.path", f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValidationError(f"prompts.{what}.path", f"{path} must hold a JSON list")
    return data


class ShareGPTSource(PromptSource):
    name = "sharegpt"

    def __init__(self, path: str | Path, output_len: int = 128):
        self.default_output_len = output_len
        pool = []
        for item in _load_json_list(path, self.name):
            if isinstance(item, str):
                text = item
            else:
                turns = item.get("conversations") or []
                text = turns[0].get("value", "") if turns else ""
            if text.strip():
                pool.append(Prompt(text, output_len, count_tokens(text)))
        super().__init__(pool)


class AlpacaSource(PromptSource):
    name = "alpaca"

    def __init__(self, path: str | Path, tokenizer: Any = None, max_output: int = 1024):
        pool = []
        for item in _load_json_list(path, self.name):
            text, answer = item.get("instruction", ""), item.get("output", "")
            if text.strip() and answer.strip():
                out_len = min(count_tokens(answer, tokenizer), max_output)
                pool.append(Prompt(text, out_len, count_tokens(text, tokenizer)))
        super().__init__(pool)


def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # an optional dependency for this one option
        raise ValidationError("prompts.alpaca.tokenizer", "needs the `tokenizers` package") from e
    return Tokenizer.from_file(path)


def make_source(spec: str, tokenizer: Any = None) -> PromptSource:
    """A prompt source from a SPEC string (see the module docstring)."""
    kind, p = parse_spec(spec, "prompts")
    allowed = {"synthetic": {"prompt_len", "output_len"}, "sharegpt": {"path", "output_len"},
               "alpaca": {"path", "tokenizer", "max_output"}}
    if kind not in allowed:
        raise ValidationError("prompts", f"unknown source {kind!r}; allowed: {', '.join(allowed)}")
    unknown = set(p) - allowed[kind]
    if unknown:
        raise ValidationError(f"prompts.{sorted(unknown)[0]}",
                              f"unknown key for {kind!r}; allowed: {', '.join(sorted(allowed[kind]))}")
    ints = {k: _positive_int(k, v) for k, v in p.items() if k in ("prompt_len", "output_len", "max_output")}
    if kind == "synthetic":
        return SyntheticSource(**ints)
    if "path" not in p:
        raise ValidationError(f"prompts.{kind}.path", "required")
    if kind == "sharegpt":
        return ShareGPTSource(p["path"], **ints)
    if "tokenizer" in p:
        tokenizer = _load_tokenizer(p["tokenizer"])
    return AlpacaSource(p["path"], tokenizer, **ints)


def _positive_int(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValidationError(f"prompts.{key}", f"must be an integer, got {value!r}")
    if n < 1:
        raise ValidationError(f"prompts.{key}", f"must be >= 1, got {n}")
    return n


def build_requests(arrivals: Sequence[Arrival], source: PromptSource, seed: int = 0,
                   max_tokens_cap: Optional[int] = None) -> list[BenchRequest]:
    """Pair each arrival with a prompt; max_tokens from the arrival's hint, else the source."""
    rng = np.random.default_rng(seed + 1)  # independent of the arrival stream's seed use
    prompts = source.draw(len(arrivals), rng, [a.prompt_len for a in arrivals])
    out = []
    for i, (arrival, prompt) in enumerate(zip(arrivals, prompts)):
        max_tokens = arrival.output_len or prompt.output_len or source.default_output_len
        if max_tokens_cap:
            max_tokens = min(max_tokens, max_tokens_cap)
        out.append(BenchRequest(i, float(arrival.send_time_s), prompt.text, max(1, int(max_tokens)),
                                prompt.prompt_len))
    return out

