"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Types are checked here (a string where a number belongs is a 400, not a silent cast);
value ranges are checked by `SamplingParams` and by `to_sampling_params`, which raise
`ValidationError` naming the field and the allowed range. Unknown fields are ignored,
as OpenAI clients send fields we do not use (user, metadata, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from brownout.types import SamplingParams, ValidationError

# Integer fields hold what a signed 64-bit integer holds: the engine and the sampler pass
# them to numpy and torch, which hold no more.
Int = Annotated[StrictInt, Field(ge=-2**63, le=2**63 - 1)]
# torch.Generator.manual_seed takes any seed in [-2**63, 2**64 - 1] (a negative seed is
# taken modulo 2**64) and raises past it, in the engine process.
Seed = Annotated[StrictInt, Field(ge=-2**63, le=2**64 - 1)]
Number = Union[StrictInt, StrictFloat]  # finite: the body parser refuses inf and nan
Stop = Union[StrictStr, list[StrictStr], None]
MAX_PROMPTS_PER_REQUEST = 64  # each prompt is queued in the engine as a request of its own
# Samples (`n`, `best_of`) of one prompt: each is an engine request of its own, so a request
# holds at most MAX_PROMPTS_PER_REQUEST engine requests in all (prompts x samples).
MAX_N = 16
SEED_MODULUS = 2**64  # torch's seeds are taken modulo 2**64; SeedSequence wants them >= 0


def sample_seeds(seed: Optional[int], count: int) -> list[Optional[int]]:
    """The seed of each of `count` samples of one prompt. Sample 0 keeps the request's seed
    (so n = 1 samples as before); sample i > 0 gets the seed numpy's SeedSequence derives
    from (seed mod 2**64, i): samples differ from each other and from requests with nearby
    seeds, and the same `seed` and `n` give the same samples. No seed: all unseeded."""
    if seed is None:
        return [None] * count
    base = seed % SEED_MODULUS
    return [seed] + [int(np.random.SeedSequence([base, i]).generate_state(1, np.uint64)[0])
                     for i in range(1, count)]


def fan_out(params: SamplingParams, count: int) -> list[SamplingParams]:
    """The sampling params of each of `count` samples: the same but for their seeds."""
    return [dataclasses.replace(params, seed=s) for s in sample_seeds(params.seed, count)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Common(_Body):
    """Fields shared by completions and chat completions."""

    model: Optional[StrictStr] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: Int = 1
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[Int] = None  # extension (vLLM)
    seed: Optional[Seed] = None
    stop: Stop = None
    stop_token_ids: Optional[list[Int]] = None  # extension
    ignore_eos: StrictBool = False  # extension
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    priority: Int = 0  # extension: lower runs first under the priority policy

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise ValidationError("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise ValidationError("stream_options", "is only allowed when stream is true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValidationError(name, "is not supported (only 0)")
        if self.logit_bias:
            raise ValidationError("logit_bias", "is not supported")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, logprobs: Optional[int],
                 prompt_logprobs: Optional[int] = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def check_max_tokens(name: str, value: int, limit: int, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not lo <= value <= limit:
        raise ValidationError(name, f"must be in [{lo}, {limit}], got {value}")


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[Int], list[StrictStr], list[list[Int]]]
    max_tokens: Optional[Int] = 16
    logprobs: Optional[Int] = None
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None
    best_of: Optional[Int] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise ValidationError("prompt", "must not be empty")
        elif isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise ValidationError("prompt", f"at most {MAX_PROMPTS_PER_REQUEST} prompts per "
                                            f"request, got {len(prompts)}")
        for one in prompts:
            if len(one) == 0:
                raise ValidationError("prompt", "must not be empty")
            if isinstance(one, list) and any(t < 0 for t in one):
                raise ValidationError("prompt", "token ids must be >= 0")
        return prompts

    def to_sampling_params(self, max_tokens_limit: int) -> SamplingParams:
        """Sampling for each prompt. `max_tokens=0` (echo scoring) runs one token, later dropped."""
        self.check_common()
        if self.suffix:
            raise ValidationError("suffix", "is not supported")
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_N:
                raise ValidationError("best_of", f"must be in [n, {MAX_N}] (n={self.n}), "
                                                 f"got {self.best_of}")
            if self.stream and self.best_of > self.n:
                raise ValidationError("best_of", "cannot be streamed: the best samples are known "
                                                 "only when all have finished")
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        check_max_tokens("max_tokens", max_tokens, max_tokens_limit, allow_zero=self.echo)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValidationError("logprobs", f"must be in [0, 20], got {self.logprobs}")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        logprobs = self.logprobs
        if logprobs is None and self.num_samples > self.n:
            logprobs = 0  # best_of ranks the samples by their tokens' logprobs
        return self.sampling(max(1, max_tokens), logprobs, prompt_logprobs)

    @property
    def num_samples(self) -> int:
        """Samples generated per prompt: `best_of` (the best `n` are returned) or `n`."""
        return self.best_of or self.n


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: Optional[StrictStr] = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(...)
    max_tokens: Optional[Int] = None
    max_completion_tokens: Optional[Int] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[Int] = None

    def to_sampling_params(self, max_tokens_limit: int) -> tuple[SamplingParams, bool]:
        """Sampling params and whether max_tokens was defaulted (then fit to the context)."""
        self.check_common()
        if not self.messages:
            raise ValidationError("messages", "must contain at least one message")
        name, value = "max_completion_tokens", self.max_completion_tokens
        if value is None:
            name, value = "max_tokens", self.max_tokens
        defaulted = value is None
        if not defaulted:
            check_max_tokens(name, value, max_tokens_limit)
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValidationError("top_logprobs", "requires logprobs to be true")
            if not 0 <= self.top_logprobs <= 20:
                raise ValidationError("top_logprobs", f"must be in [0, 20], got {self.top_logprobs}")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling(max_tokens_limit if defaulted else value, logprobs), defaulted


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's shape): a text `prompt`, or chat `messages` templated first.
    `add_special_tokens` defaults as vLLM's does: true for a prompt, false for messages (the
    chat template writes them)."""

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[StrictBool] = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    def payload(self) -> dict:
        if (self.prompt is None) == (self.messages is None):
            raise ValidationError("prompt", "give exactly one of prompt and messages")
        if self.messages is not None and not self.messages:
            raise ValidationError("messages", "must contain at least one message")
        chat = self.messages is not None
        add_special = (not chat) if self.add_special_tokens is None else self.add_special_tokens
        payload = {"add_special_tokens": add_special, "return_token_strs": self.return_token_strs}
        if chat:
            return {**payload, "messages": [m.as_dict() for m in self.messages],
                    "add_generation_prompt": self.add_generation_prompt}
        return {**payload, "prompt": self.prompt}


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model: Optional[StrictStr] = None
    tokens: list[Int]
