"""The engine's record of one request: tokens, progress through the KV cache, timings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from brownout.types import FinishReason, Logprob, RequestMetrics, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request. Its progress (status, computed and output tokens, finish reason, prompt
    logprobs) changes only in the scheduler, so one owner decides every move; the output
    path keeps its own fields (`detok_state`, `prompt_logprobs_sent`)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: Optional[FinishReason] = None
    metrics: RequestMetrics = None  # type: ignore[assignment]
    prompt_logprobs: list[Optional[Logprob]] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    detok_state: object = None  # owned by the detokenizer
    seq: int = 0  # the order the scheduler got it in: breaks ties of arrival time
    predicted_wait_s: Optional[float] = None  # TTFT admission's prediction, checked at the first token
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full prompt blocks

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """all_token_ids[start:start + n] without building the whole list."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start:start + n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
