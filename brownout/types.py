"""Plain data types shared by every layer: sampling parameters, requests, step contracts.

Nothing here imports torch, so the HTTP layer, the controller and the bench client can
use these types without loading a model. The scheduler->runner contract is
`SchedulerOutput` (one per step) and the runner->engine answer is `RunnerOutput`.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Optional

# Stop strings are searched for in every step's new text: a short list keeps that cheap.
MAX_STOP_STRINGS = 16
# Top alternatives per token: the most OpenAI's API allows.
MAX_LOGPROBS = 20


class ValidationError(ValueError):
    """A bad parameter from a user. `field` names it; the message says the allowed range."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class AdmissionError(RuntimeError):
    """The engine refuses a request now (its queue is full, or the request's first token could
    not come within the TTFT SLO); the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineBrokenError(RuntimeError):
    """Engine steps keep failing whatever requests they hold: the engine, not a request, is
    at fault, and its process should end so that a fresh one replaces it."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # client went away or request was cancelled
    TIMEOUT = "timeout"  # waited in the queue longer than its queue timeout
    ERROR = "error"  # a step it was in failed; the engine went on without it


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling. Validated on construction (see `validate`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # number of top alternatives per generated token
    prompt_logprobs: Optional[int] = None  # return logprobs of the prompt tokens (echo)
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def _num(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValidationError(name, f"must be a number, got {type(value).__name__}")
            if isinstance(value, float) and math.isnan(value):
                raise ValidationError(name, "must not be NaN")
            return value

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValidationError("max_tokens", "must be an integer >= 1")
        if self.max_tokens < 1:
            raise ValidationError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if _num("temperature", self.temperature) < 0 or math.isinf(self.temperature):
            raise ValidationError("temperature", f"must be in [0, inf), got {self.temperature}")
        top_p = _num("top_p", self.top_p)
        if not (0.0 < top_p <= 1.0):
            raise ValidationError("top_p", f"must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValidationError("top_k", "must be an integer: -1 (off) or >= 1")
        if self.top_k == 0 or self.top_k < -1:
            raise ValidationError("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValidationError("seed", "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValidationError("stop", "must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValidationError("stop", f"at most {MAX_STOP_STRINGS} stop strings, "
                                          f"got {len(self.stop)}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValidationError("stop_token_ids", "must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not 0 <= v <= MAX_LOGPROBS):
                raise ValidationError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob of alternatives


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for one request after a step (incremental)."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # tokens produced in this step (usually one)
    new_text: str  # text made final in this step (stop strings held back until sure)
    output_token_ids: list[int]  # all generated tokens so far
    finished: bool = False
    finish_reason: Optional[FinishReason] = None
    new_logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[Logprob]]] = None  # first one is None
    metrics: Optional["RequestMetrics"] = None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0

    @property
    def queue_time(self) -> Optional[float]:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


# ----------------------------------------------------------------------------------------
# Scheduler -> runner contract (one per step)
# ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]  # the tokens whose K/V this step computes (a prefill chunk or 1 decode token)
    start_pos: int  # number of this request's tokens already in the KV cache
    block_table: list[int]  # KV block ids covering positions [0, start_pos + len(token_ids))
    sample: bool  # True when this chunk reaches the end of the known tokens: sample a token
    sampling: SamplingParams
    output_len: int  # tokens generated so far (seeds the per-request generator offset)
    # prompt tokens that follow each position of this chunk (prompt logprobs); None: not asked
    prompt_logprob_targets: Optional[list[int]] = None
    # its tokens keep tau 1 and the model's k in a dimmed or shed step (a class exempt from
    # dimming, --dim-exempt-priority)
    exempt: bool = False
    # the scheduler's serial number of the request (`Request.seq`): a request that reuses the
    # id of one finished while this step ran is not this one; None: not checked
    req_seq: Optional[int] = None


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    num_prefill_tokens: int  # tokens of requests still in prefill
    num_decode_tokens: int  # one per decoding request
    preempted: list[str] = field(default_factory=list)  # ids preempted while scheduling this step
    # a step planned before the previous one was collected (`Scheduler.schedule_ahead`), one
    # entry a sequence: the row of the previous step's sampled tokens (still on the device)
    # that is its input token, its `token_ids` holding a placeholder; -1 where its tokens are
    # known (a prompt chunk). None: a step whose tokens are all known
    prev_rows: Optional[list[int]] = None

    @property
    def has_prefill(self) -> bool:
        return self.num_prefill_tokens > 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass(frozen=True, slots=True)
class Rungs:
    """The degradation rungs one step runs at, chosen by the SLO controller."""

    tau: float = 1.0  # brownout threshold (1: every expert keeps its tokens)
    top_k: Optional[int] = None  # routed experts kept per token (k' < k sheds); None: the model's k
    # the step's token budget (rung 3), chosen before it was scheduled; None: the configured one
    token_budget: Optional[int] = None


@dataclass(slots=True)
class StepStats:
    """What one engine step cost. The SLO controller sees only these and request timings."""

    start_time: float
    latency_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    batch_size: int
    has_prefill: bool
    tau: float  # brownout threshold used (1.0 when brownout is off)
    experts_touched: list[int] = field(default_factory=list)  # distinct expert slots per MoE layer
    num_waiting: int = 0
    num_running: int = 0
    kv_usage: float = 0.0
    top_k: Optional[int] = None  # routed experts kept per token; None: the model's k (no shedding)
    exempt_tokens: int = 0  # tokens that kept tau 1 and the model's k (an exempt class)

    @property
    def mean_experts_touched(self) -> float:
        return sum(self.experts_touched) / len(self.experts_touched) if self.experts_touched else 0.0


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int]  # request id -> sampled token, for seqs with sample=True
    logprobs: dict[str, Logprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[Optional[Logprob]]] = field(default_factory=dict)
    experts_touched: list[int] = field(default_factory=list)
    tau: float = 1.0
    top_k: Optional[int] = None  # routed experts kept per token; None: the model's k


def now() -> float:
    return time.monotonic()
