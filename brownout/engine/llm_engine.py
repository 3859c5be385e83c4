"""The engine: requests in, one scheduled step at a time, incremental outputs out.

The step loop is schedule -> choose tau -> run -> postprocess. The SLO controller sees only
step stats and request timings and answers with the brownout threshold for the next step.
Used as is by the offline `LLM` API and, in its own process, by the HTTP server.
With `tensor_parallel_size` N > 1 this process is rank 0 of N: it starts ranks 1..N-1
(brownout.distributed), which run the same forward on their shard of the model each step;
the scheduler, the controller and sampling stay here. `close()` stops them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Union

from brownout.config import EngineConfig
from brownout.defaults import DEMO_MODEL_NAME, default_model_dir, default_united_dir  # noqa: F401
from brownout.control import PlannedStep, make_controller
from brownout.engine.admission import (PrefillRate, SlotRate, WaitFeedback, admission_wait,
                                      refuse_for, slot_wait)
from brownout.engine.block_manager import BlockManager
from brownout.engine.detokenizer import IncrementalDetokenizer
from brownout.engine.parallel_group import WorkerGroup
from brownout.engine.request import Request, Status
from brownout.engine.scheduler import Scheduler
from brownout.runner.build import build_model_runner
from brownout.types import (FinishReason, RequestOutput, RunnerOutput, SamplingParams,
                            SchedulerOutput, StepStats, ValidationError)

log = logging.getLogger(__name__)



class AdmissionError(RuntimeError):
    """The engine refuses a request now (queue full, or its first token could not come within
    the TTFT SLO); the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LLMEngine:
    def __init__(self, config: EngineConfig, clock=time.monotonic):
        self.config = config
        self.clock = clock
        self.workers = None  # ranks 1..N-1 of a tensor-parallel engine
        if config.load.tensor_parallel_size > 1:
            self.workers = WorkerGroup(config)
        try:
            loaded, runner = build_model_runner(config, self.workers and self.workers.parallel)
        except BaseException:
            self.close()
            raise
        self.spec = loaded.spec
        self.runner = runner if self.workers is None else self.workers.wrap(runner)
        self.tokenizer = _load_tokenizer(config, loaded)
        self.model_name = _model_name(config.load.model, loaded.model_dir)
        limit = config.load.max_model_len or self.spec.max_position_embeddings
        self.max_model_len = min(limit, self.spec.max_position_embeddings,
                                 self.runner.num_blocks * config.cache.block_size)
        self.eos_ids = _eos_ids(loaded, self.tokenizer)
        self.blocks = BlockManager(self.runner.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        slo = config.slo
        if slo.policy != "off" and not self.runner.brownout_ready:
            log.warning("SLO policy %r needs united experts (--united-experts); brownout stays off",
                        slo.policy)
            slo = dataclasses.replace(slo, policy="off")
        self.controller = make_controller(slo, clock=clock, fixed_tau=config.brownout.tau_decode)
        self.requests: dict[str, Request] = {}
        self.last_step_stats: Optional[StepStats] = None
        self.fresh_step_stats: Optional[StepStats] = None  # the step collected by the last call
        self._inflight = None  # (SchedulerOutput, launched step, start time, requests left waiting)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._step_time_ema = 0.05
        self.prefill_rate = PrefillRate()
        self.wait_feedback = WaitFeedback()
        self.slot_rate = SlotRate()  # sequence slots freed per second
        self.num_refused_slo = 0  # requests refused because their TTFT could not be met

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValidationError("prompt", "this model has no tokenizer: send token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValidationError("prompt", "must be a string or a list of integer token ids")
        return list(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValidationError("messages", "must be a non-empty list of {role, content}")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValidationError("messages", "this model has no chat template")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors on odd messages: the client's fault
            raise ValidationError("messages", f"cannot apply the chat template: {exc}") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add_request(self, request_id: str, prompt: Union[str, list[int]], params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0) -> list[int]:
        if request_id in self.requests:
            raise ValidationError("request_id", f"{request_id!r} is already in use")
        ids = self.encode(prompt)
        if not ids:
            raise ValidationError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValidationError("prompt", f"has {len(ids)} tokens; the model's context allows at most "
                                            f"{self.max_model_len - 1} prompt tokens")
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise ValidationError("prompt", f"token ids must be in [0, {self.spec.vocab_size - 1}]")
        sched = self.config.scheduler
        if len(self.scheduler.waiting) >= sched.max_waiting_requests or \
                self.scheduler.num_waiting_tokens + len(ids) > sched.max_waiting_tokens:
            raise AdmissionError("the waiting queue is full", self._retry_after())
        arrival = arrival_time or self.clock()
        predicted = self._check_ttft_admission(len(ids), arrival)
        req = Request(request_id, ids, params, arrival, priority, predicted_wait_s=predicted)
        req.detok_state = IncrementalDetokenizer(self.tokenizer, ids, params.stop,
                                                 params.include_stop_str_in_output)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return ids

    def _check_ttft_admission(self, num_tokens: int, arrival: float) -> Optional[float]:
        """Refuse (AdmissionError) a request whose first token would come too late; return
        the predicted wait of one admitted with a prediction (None: no prediction made)."""
        factor = self.config.scheduler.admission_ttft_factor
        rate = self.prefill_rate.tokens_per_s  # at the tau the controller runs now
        if factor is None or rate is None:  # no rate yet: no queue worth refusing for
            return None
        # refuse only what even the lowest tau could not serve in time
        rate *= self.controller.prefill_speedup()
        ahead = self.scheduler.num_waiting_tokens + sum(
            max(0, len(r.prompt_token_ids) - r.num_computed) for r in self.scheduler.running)
        limit = factor * self.config.slo.ttft_s
        now = self.clock()
        slots = self._slot_wait(now)
        wait = admission_wait(ahead, num_tokens, rate, step_s=self._step_time_ema,
                              elapsed_s=now - arrival, slot_wait_s=slots)
        expected = wait + self.wait_feedback.margin(limit)  # corrected by the measured errors
        retry = refuse_for(expected, limit)
        if retry is not None:
            self.num_refused_slo += 1
            raise AdmissionError(f"its first token would come in ~{expected:.2f} s, over the "
                                 f"{limit:.2f} s admission limit ({factor:g} x the TTFT SLO)", retry)
        return wait

    def _slot_wait(self, now: float) -> float:
        """Seconds a request arriving now would wait for a sequence slot."""
        free = self.config.scheduler.max_num_seqs - len(self.scheduler.running)
        return slot_wait(len(self.scheduler.waiting), free, self.slot_rate.per_s(now))

    def _retry_after(self) -> float:
        queued = self.scheduler.num_waiting_tokens + len(self.scheduler.running)
        per_step = self.config.scheduler.max_num_batched_tokens
        return max(1.0, round(queued / per_step * self._step_time_ema, 1))

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req.status == Status.RUNNING:
            self.slot_rate.observe(self.clock())
        self.scheduler.remove(req)
        self.runner.release(request_id)
        req.status = Status.FINISHED
        req.finish_reason = FinishReason.ABORT

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    # ---- the step loop -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration.

        The model step launched by the previous call is collected first and its tokens are
        accepted (lengths, EOS, stop ids), so the scheduler can plan the next step, which is
        launched before the collected step's text is detokenised and its outputs are built:
        on a GPU that host work (and the caller's, until the next call) overlaps the next
        step's GPU work. A stop string found then finishes its request one step late: the
        token the launched step computes for it is dropped."""
        self.fresh_step_stats = None
        outputs = self._expire_waiting()
        accepted = self._collect() if self._inflight is not None else []
        sched = self.scheduler.schedule()
        outputs += [self._finish(r) for r in self._drain_capacity_finished()]
        if sched.seqs:
            start = self.clock()
            tau = self.controller.choose_tau(self._planned(sched))
            self._inflight = (sched, self.runner.launch(sched, tau), start, bool(self.scheduler.waiting))
        outputs += [self._emit(*item) for item in accepted]
        return outputs

    def _collect(self) -> list[tuple]:
        sched, pending, start, queue_left = self._inflight
        self._inflight = None
        result = self.runner.collect(pending)
        now = self.clock()
        latency = now - start
        self._step_time_ema = 0.9 * self._step_time_ema + 0.1 * latency
        self.prefill_rate.observe(sched.num_prefill_tokens, latency, queue_left=queue_left)
        accepted = self._accept(sched, result, now)
        stats = StepStats(start_time=start, latency_s=latency,
                          num_prefill_tokens=sched.num_prefill_tokens,
                          num_decode_tokens=sched.num_decode_tokens, batch_size=len(sched.seqs),
                          has_prefill=sched.has_prefill, tau=result.tau,
                          experts_touched=result.experts_touched,
                          num_waiting=len(self.scheduler.waiting),
                          num_running=len(self.scheduler.running), kv_usage=self.blocks.usage)
        self.last_step_stats = self.fresh_step_stats = stats
        self.controller.observe_step(stats)
        return accepted

    def _planned(self, sched: SchedulerOutput) -> PlannedStep:
        return PlannedStep(num_prefill_tokens=sched.num_prefill_tokens,
                           num_decode_tokens=sched.num_decode_tokens, batch_size=len(sched.seqs),
                           num_waiting=len(self.scheduler.waiting),
                           waiting_tokens=self.scheduler.num_waiting_tokens,
                           has_prefill=sched.has_prefill)

    def _expire_waiting(self) -> list[RequestOutput]:
        timeout = self.config.scheduler.queue_timeout_s
        if timeout is None:
            return []
        now = self.clock()
        expired = [r for r in self.scheduler.waiting
                   if r.num_computed == 0 and not r.output_token_ids and now - r.arrival_time > timeout]
        for req in expired:
            self.scheduler.remove(req)
            req.status, req.finish_reason = Status.FINISHED, FinishReason.TIMEOUT
        return [self._finish(r) for r in expired]

    def _drain_capacity_finished(self) -> list[Request]:
        done, self.scheduler.capacity_finished = self.scheduler.capacity_finished, []
        return [r for r in done if r.request_id in self.requests]

    def _accept(self, sched: SchedulerOutput, result: RunnerOutput, now: float) -> list[tuple]:
        """Progress and sampled tokens of a collected step, before the next is scheduled;
        returns what `_emit` turns into outputs."""
        accepted = []
        for s in sched.seqs:
            req = self.requests.get(s.request_id)
            if req is None or req.finished:  # aborted, or stopped while this step ran
                continue
            req.num_computed += len(s.token_ids)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            if s.request_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[s.request_id])
            if s.start_pos < len(req.prompt_token_ids):
                self.prompt_tokens_total += min(len(s.token_ids), len(req.prompt_token_ids) - s.start_pos)
            token = result.sampled.get(s.request_id)
            if token is None:
                continue
            accepted.append(self._accept_token(req, token, result.logprobs.get(s.request_id), now))
        return accepted

    def _accept_token(self, req: Request, token: int, logprob, now: float) -> tuple:
        """Append a token; finish on EOS, a stop id or length (stop strings: `_emit`)."""
        req.output_token_ids.append(token)
        self.generation_tokens_total += 1
        m = req.metrics
        if m.first_token_time is None and req.predicted_wait_s is not None:
            self.wait_feedback.observe(req.predicted_wait_s, now - m.arrival_time)
        m.first_token_time = m.first_token_time or now
        m.last_token_time = now
        p = req.sampling
        reason = None
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            reason = FinishReason.STOP
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._stop(req, reason)
        return req, token, logprob, now

    def _stop(self, req: Request, reason: FinishReason) -> None:
        """Finish a request (its outputs still go out); a stopped one only gets the reason.
        Its blocks may sit in the launched step: they are reused only after it is collected."""
        if not req.finished:
            req.status = Status.FINISHED
            self.scheduler.remove(req)
        req.finish_reason = reason

    def _emit(self, req: Request, token: int, logprob, now: float) -> RequestOutput:
        """Detokenise an accepted token, look for stop strings, build the output."""
        detok: IncrementalDetokenizer = req.detok_state
        detok.add(token)
        cut = detok.find_stop()
        if cut is not None:  # a stop string wins over EOS or length in the same token
            self._stop(req, FinishReason.STOP)
        done = req.finished
        text = detok.flush(done, cut)
        out = RequestOutput(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                            new_token_ids=[token], new_text=text,
                            output_token_ids=list(req.output_token_ids),
                            new_logprobs=[logprob] if logprob is not None else [])
        p = req.sampling
        if p.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            out.prompt_logprobs = [None] + list(req.prompt_logprobs)
            req.prompt_logprobs_sent = True
        if done:
            self._complete(req, out, now)
        return out

    def _complete(self, req: Request, out: RequestOutput, now: float) -> None:
        self.requests.pop(req.request_id, None)
        self.runner.release(req.request_id)
        req.metrics.finished_time = now
        if req.metrics.first_scheduled_time is not None:  # it held a sequence slot
            self.slot_rate.observe(now)
        out.finished, out.finish_reason, out.metrics = True, req.finish_reason, req.metrics
        m = req.metrics
        n_out = len(req.output_token_ids)
        tpot = (now - m.first_token_time) / (n_out - 1) if n_out > 1 and m.first_token_time else None
        self.controller.observe_request(m.ttft, tpot, now)

    def _finish(self, req: Request) -> RequestOutput:
        out = RequestOutput(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                            new_token_ids=[], new_text="", output_token_ids=list(req.output_token_ids))
        self._complete(req, out, self.clock())
        return out

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (nothing to do otherwise)."""
        if self.workers is not None:
            self.workers.close()

    def snapshot(self) -> dict:
        return dict(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                    kv_usage=self.blocks.usage, tau_prefill=self.controller.tau_prefill,
                    tau_decode=self.controller.tau_decode,
                    num_preemptions_total=self.scheduler.num_preemptions,
                    prompt_tokens_total=self.prompt_tokens_total,
                    generation_tokens_total=self.generation_tokens_total,
                    slo_violations=dict(self.controller.violations),
                    num_refused_slo_total=self.num_refused_slo,
                    admission_margin_s=self.wait_feedback.margin(
                        (self.config.scheduler.admission_ttft_factor or 0.0) * self.config.slo.ttft_s),
                    admission_slot_wait_s=self._slot_wait(self.clock()),
                    brownout_ready=self.runner.brownout_ready)


def _model_name(model: str, model_dir: Optional[Path]) -> str:
    if model_dir is None:
        return model  # a dummy preset
    if model_dir.resolve() == Path(default_model_dir()).resolve():
        return DEMO_MODEL_NAME
    return model_dir.name


def _load_tokenizer(config: EngineConfig, loaded):
    from transformers import AutoTokenizer

    source = config.load.tokenizer or (str(loaded.model_dir) if loaded.model_dir else None)
    if source is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer at %s (%s): prompts must be token ids", source, exc)
        return None


def _eos_ids(loaded, tokenizer) -> set[int]:
    ids = getattr(loaded.hf_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
