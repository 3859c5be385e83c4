"""A torch-free stand-in for LLMEngine with the same interface, for fast client tests.

Bytes are tokens (id = byte + 3, eos = 2); each step emits one token per running request,
cycling through "abc ". It honours max_tokens, stop strings, logprobs, prompt logprobs,
a bounded waiting queue (AdmissionError) and reports a KV usage that returns to 0 when
every request is gone. A prompt of "crash" kills the process, to test engine death.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from brownout.types import FinishReason, Logprob, RequestMetrics, RequestOutput, StepStats
from brownout.types import ValidationError

EOS = 2
CYCLE = b"abc "


class AdmissionError(RuntimeError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: object
    metrics: RequestMetrics
    out: list[int] = field(default_factory=list)
    sent_prompt_logprobs: bool = False


class FakeEngine:
    def __init__(self, config):
        self.config = config
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = config.load.max_model_len or 256
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_waiting = config.scheduler.max_waiting_requests
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.last_step_stats = None
        self.preemptions = 0

    def apply_chat_template(self, messages):
        if not messages:
            raise ValidationError("messages", "must not be empty")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.tokenizer.encode(text)

    def add_request(self, request_id, prompt, params, arrival_time=None, priority=0):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if prompt == "crash":
            os._exit(3)
        if len(self.waiting) >= self.max_waiting:
            raise AdmissionError("waiting queue full", retry_after_s=0.5)
        req = _Req(request_id, ids, params, RequestMetrics(arrival_time or time.monotonic()))
        self.waiting.append(req)
        return ids

    def abort_request(self, request_id):
        self.waiting = [r for r in self.waiting if r.rid != request_id]
        self.running = [r for r in self.running if r.rid != request_id]

    def has_unfinished_requests(self):
        return bool(self.waiting or self.running)

    def _output(self, req: _Req, now: float) -> RequestOutput:
        tok = CYCLE[len(req.out) % len(CYCLE)] + 3
        req.out.append(tok)
        lp = None
        if req.params.logprobs is not None:
            lp = [Logprob(tok, -0.5, {tok: -0.5, EOS: -1.5})]
        out = RequestOutput(req.rid, req.prompt, [tok], self.tokenizer.decode([tok]), list(req.out),
                            new_logprobs=lp or [])
        if req.params.prompt_logprobs is not None and not req.sent_prompt_logprobs:
            req.sent_prompt_logprobs = True
            out.prompt_logprobs = [None] + [Logprob(t, -1.0, {t: -1.0}) for t in req.prompt[1:]]
        text = self.tokenizer.decode(req.out)
        stop = any(s in text for s in req.params.stop)
        if stop or len(req.out) >= req.params.max_tokens:
            out.finished = True
            out.finish_reason = FinishReason.STOP if stop else FinishReason.LENGTH
            req.metrics.finished_time = now
            out.metrics = req.metrics
        req.metrics.first_token_time = req.metrics.first_token_time or now
        req.metrics.last_token_time = now
        return out

    def step(self):
        start = time.monotonic()
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.pop(0)
            req.metrics.first_scheduled_time = start
            self.running.append(req)
        time.sleep(0.005)
        now = time.monotonic()
        outs = [self._output(r, now) for r in self.running]
        finished = {o.request_id for o in outs if o.finished}
        self.running = [r for r in self.running if r.rid not in finished]
        self.last_step_stats = StepStats(start, now - start, 0, len(outs), len(outs), False, 1.0,
                                         [3, 5], len(self.waiting), len(self.running))
        return outs

    def snapshot(self):
        used = sum(len(r.prompt) + len(r.out) for r in self.running)
        return dict(num_running=len(self.running), num_waiting=len(self.waiting),
                    kv_usage=min(1.0, used / 4096), tau_prefill=1.0, tau_decode=1.0,
                    num_preemptions_total=self.preemptions, slo_violations={"ttft": 0})
