"""Bounds on the work one request may queue, checked before it reaches the engine.

The engine tokenises a text prompt before it can measure it in tokens, and each prompt of a
request is queued on its own, so without a bound here one request could make the engine
tokenise megabytes of text or prefill dozens of contexts. Text is bounded in characters:
the context (in tokens) times MAX_CHARS_PER_TOKEN, which no real text averages; token ids
are bounded in count and checked against the vocabulary. The engine's own token-length
check stays: these bounds only keep what reaches it small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from brownout.config import ServerConfig
from brownout.api.engine_client import EngineInfo
from brownout.types import ValidationError

# Characters per token that no real text averages over a prompt: English runs about 4,
# long words and the longest whitespace or punctuation tokens of common BPE vocabularies
# 16 to 32. Text longer than this many characters per allowed token cannot fit.
MAX_CHARS_PER_TOKEN = 32
# Characters a chat template adds around each message (role markers, separators): counted
# per message, so that thousands of empty messages are bounded like text.
MESSAGE_OVERHEAD_CHARS = 16
# By default one request may queue this many prompts of the largest size in all.
REQUEST_CONTEXTS = 4
# Stop token ids one request may give: each generated token is looked up among them.
MAX_STOP_TOKEN_IDS = 256

Prompt = Union[str, list[int]]


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_prompt_tokens: int  # one prompt (the engine's limit)
    max_request_tokens: int  # all prompts of one request
    vocab_size: Optional[int]  # token ids are in [0, vocab_size); None: unknown

    @classmethod
    def of(cls, info: EngineInfo, server: ServerConfig) -> "RequestLimits":
        per_request = server.max_request_tokens or REQUEST_CONTEXTS * info.max_prompt_tokens
        return cls(info.max_prompt_tokens, per_request, info.vocab_size)

    @property
    def max_prompt_chars(self) -> int:
        return self.max_prompt_tokens * MAX_CHARS_PER_TOKEN

    def check_token_ids(self, field: str, ids: list[int]) -> None:
        if not ids:
            return
        hi = self.vocab_size
        if min(ids) < 0 or (hi is not None and max(ids) >= hi):
            bound = f"[0, {hi - 1}]" if hi is not None else ">= 0"
            raise ValidationError(field, f"token ids must be in {bound}")

    def check_prompts(self, prompts: list[Prompt]) -> None:
        """Each prompt fits one context and all of them `max_request_tokens` (text counted
        as its characters / MAX_CHARS_PER_TOKEN)."""
        tokens = chars = 0
        for prompt in prompts:
            if isinstance(prompt, str):
                self._check_chars("prompt", len(prompt))
                chars += len(prompt)
            else:
                if len(prompt) > self.max_prompt_tokens:
                    raise ValidationError("prompt", f"prompt has {len(prompt)} tokens; at most "
                                                    f"{self.max_prompt_tokens} are allowed")
                self.check_token_ids("prompt", prompt)
                tokens += len(prompt)
        queued = tokens + -(-chars // MAX_CHARS_PER_TOKEN)
        if queued > self.max_request_tokens:
            raise ValidationError("prompt", f"the prompts of one request may hold at most "
                                            f"{self.max_request_tokens} tokens in all (text: "
                                            f"{MAX_CHARS_PER_TOKEN} characters per token); "
                                            f"these hold {queued}")

    def check_messages(self, messages: list[dict]) -> None:
        chars = sum(len(m["content"]) + MESSAGE_OVERHEAD_CHARS for m in messages)
        self._check_chars("messages", chars)

    def check_stop_token_ids(self, ids: list[int]) -> None:
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValidationError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids, "
                                                    f"got {len(ids)}")
        self.check_token_ids("stop_token_ids", ids)

    def _check_chars(self, field: str, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise ValidationError(field, f"has {chars} characters; at most {self.max_prompt_chars} "
                                         f"are accepted ({self.max_prompt_tokens} tokens of at most "
                                         f"{MAX_CHARS_PER_TOKEN} characters)")
