"""The engine: requests in, one scheduled step at a time, incremental outputs out.

The step loop is schedule -> choose tau -> launch; collect -> scheduler update -> outputs.
The engine only sequences its parts: the scheduler owns every request's state, `Admission`
decides which arriving requests join the queue, and the SLO controller sees only step stats
and request timings and answers with the brownout threshold for the next step. Used as is by
the offline `LLM` API and, in its own process, by the HTTP server. With `tensor_parallel_size`
N > 1 this process is rank 0 of N: it starts ranks 1..N-1 (brownout.engine.parallel_worker), which run
the same forward on their shard of the model each step; `close()` stops them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Union

from brownout.config import BrownoutConfig, EngineConfig
from brownout.control import PlannedStep, make_controller
from brownout.control.prices import PriceTable, find_price_table
from brownout.defaults import DEMO_MODEL_NAME, default_model_dir
from brownout.engine import outputs
from brownout.engine.admission import Admission
from brownout.engine.block_manager import BlockManager
from brownout.engine.inputs import PromptProcessor, eos_ids, load_tokenizer
from brownout.engine.parallel_group import WorkerGroup
from brownout.engine.request import Request, Status
from brownout.engine.scheduler import NewToken, Scheduler
from brownout.runner.build import build_model_runner
from brownout.runner.cuda_graphs import token_bucket_sizes
from brownout.types import (EngineBrokenError, FinishReason, RequestOutput, SamplingParams,
                            SchedulerOutput, StepStats, ValidationError)

log = logging.getLogger(__name__)

# Steps failing this many times in a row mean the engine itself is broken, not one request's
# parameters: the error propagates, the engine process exits and the server restarts it.
MAX_CONSECUTIVE_STEP_FAILURES = 3


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
        self.tokenizer = load_tokenizer(config, loaded)
        self.model_name = _model_name(config.load.model, loaded.model_dir)
        limit = config.load.max_model_len or self.spec.max_position_embeddings
        self.max_model_len = min(limit, self.spec.max_position_embeddings,
                                 self.runner.num_blocks * config.cache.block_size)
        self.inputs = PromptProcessor(self.tokenizer, self.spec.vocab_size, self.max_model_len)
        self.blocks = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                   enable_caching=config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.max_model_len,
                                   eos_ids(loaded, self.tokenizer))
        self.admission = Admission(config.scheduler, config.slo.ttft_s, self.scheduler.view)
        slo = config.slo
        if slo.policy != "off" and not self.runner.brownout_ready:
            log.warning("SLO policy %r needs united experts (--united-experts); brownout stays off",
                        slo.policy)
            slo = dataclasses.replace(slo, policy="off")
        self.controller = make_controller(slo, clock=clock, fixed_tau=config.brownout.tau_decode)
        prices = rung_price_table(config.brownout, loaded.model_dir, self.spec.top_k)
        if prices is not None:  # measured rung prices: shedding and the accuracy spent
            self.controller.enable_ladder(prices)
        budget = config.scheduler.max_num_batched_tokens
        self.controller.set_step_sizes(budget, token_bucket_sizes(budget))
        self.controller.exempt_per_token = True  # the runner masks exempt tokens per token
        self.last_step_stats: Optional[StepStats] = None
        self.fresh_step_stats: Optional[StepStats] = None  # the step collected by the last call
        self._inflight: Optional[InFlight] = None  # the step launched and not yet collected
        self._failed_steps = 0  # consecutive steps whose launch or collect raised

    # ---- requests ----------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Request]:
        """The unfinished requests by id (the scheduler's; read-only here)."""
        return self.scheduler.requests

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.inputs.apply_chat_template(messages)

    def add_request(self, request_id: str, prompt: Union[str, list[int]], params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0) -> list[int]:
        """Queue a request (ValidationError: bad input; AdmissionError: refused for now)."""
        if request_id in self.scheduler.requests:
            raise ValidationError("request_id", f"{request_id!r} is already in use")
        ids = self.inputs.prompt_ids(prompt)
        arrival = arrival_time or self.clock()
        predicted = self.admission.admit(len(ids), arrival, self.clock(),
                                         self.controller.prefill_speedup, priority)
        req = Request(request_id, ids, params, arrival, priority, predicted_wait_s=predicted)
        outputs.start_detokenizer(self.tokenizer, req)
        self.scheduler.add(req)
        return ids

    def abort_request(self, request_id: str) -> None:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return
        held_slot = req.status is Status.RUNNING
        self.scheduler.finish_requests([request_id], FinishReason.ABORT)
        self.runner.release(request_id)
        self.admission.observe_finish(self.clock(), held_slot)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests) or self._inflight is not None

    # ---- the step loop -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration.

        The model step launched by the previous call is collected first and the scheduler
        takes its tokens (lengths, EOS, stop ids), so it can plan the next step, which is
        launched before the collected step's text is detokenised and its outputs are built:
        on a GPU that host work (and the caller's, until the next call) overlaps the next
        step's GPU work. A stop string found then finishes its request one step late: the
        token the launched step computes for it is dropped.

        With async scheduling, the next step is planned and launched before the previous
        step is collected (`Scheduler.schedule_ahead`), its decodes' input tokens read on the
        device: the collect, the scheduler's update and the planning then overlap the GPU
        too, and a request that the collected step's token ends (EOS, a stop id) has one
        token computed and dropped, as with a stop string."""
        self.fresh_step_stats = None
        outs = [self._finish(r) for r in self.scheduler.expire_waiting(self.clock())]
        new_tokens, collected_at = [], 0.0
        prev, ahead = self._inflight, None
        if prev is not None:
            ahead = self._launch_ahead(prev)
            step_requests = self._step_requests(prev.sched)
            try:
                new_tokens, collected_at = self._collect(prev)
            except Exception:
                outs += self._fail_step(step_requests, "collect")
            if ahead is not None:  # its GPU work starts when the collected step's ends
                ahead.start = max(ahead.start, collected_at)
        if ahead is None:
            scheduler_output = self._schedule()
            if scheduler_output.seqs:
                step_requests = self._step_requests(scheduler_output)
                try:
                    self._launch(scheduler_output)
                except Exception:
                    outs += self._fail_step(step_requests, "launch")
        return outs + [self._emit_or_fail(t, collected_at) for t in new_tokens]

    def _launch_ahead(self, prev: "InFlight") -> Optional["InFlight"]:
        """Plan and launch the step after `prev` before collecting it; None when async
        scheduling is off, the engine spans several ranks, the plan needs `prev`'s results
        (`Scheduler.schedule_ahead`) or the launch failed. A failed launch ends no request:
        the next step is planned again after the collect, from the same scheduler state (the
        plan only allocated blocks and admitted requests, which that plan keeps), so a fault
        of a request's own fails it there, and one of the launch ahead alone costs nothing."""
        if not self.config.scheduler.async_scheduling or self.workers is not None:
            return None
        scheduler_output = self._schedule(prev)
        if scheduler_output is None:
            return None
        try:
            return self._launch(scheduler_output, prev)
        except Exception:
            log.exception("a step planned ahead failed to launch; planning it after the collect")
            return None

    def _schedule(self, prev: Optional["InFlight"] = None) -> Optional[SchedulerOutput]:
        """The next step, under the controller's running cap and token budget (rungs 4, 3);
        with `prev`, planned before `prev` is collected (None: it cannot be)."""
        view = self.scheduler.view
        self.admission.set_running_cap(self.controller.running_cap(view))
        budget = self.controller.choose_token_budget(view)
        if prev is None:
            return self.scheduler.schedule(budget)
        return self.scheduler.schedule_ahead(prev.sched, budget)

    # ---- a failed step ends its own requests -----------------------------------------
    def _step_requests(self, scheduler_output: SchedulerOutput) -> list[Request]:
        """The unfinished requests of a step, kept before it runs: those a failed step ends."""
        reqs = ((self.scheduler.requests.get(s.request_id), s.req_seq) for s in scheduler_output.seqs)
        return [r for r, seq in reqs if r is not None and seq in (None, r.seq)]

    def _fail_step(self, reqs: list[Request], phase: str) -> list[RequestOutput]:
        """Finish the requests of a step whose launch or collect raised with an error, free
        their blocks and runner state, and let the others go on; EngineBrokenError when steps
        keep failing (MAX_CONSECUTIVE_STEP_FAILURES)."""
        self._failed_steps += 1
        log.exception("step %s failed; ending its %d request(s) with an error: %s", phase,
                      len(reqs), ", ".join(r.request_id for r in reqs))
        if self._failed_steps >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineBrokenError(f"{self._failed_steps} steps in a row failed")
        if self.workers is not None:  # ranks 1..N-1 may be inside the step's collectives
            raise EngineBrokenError("a failed step leaves the tensor-parallel ranks out of step")
        return self._fail_requests(reqs)

    def _fail_requests(self, reqs: list[Request]) -> list[RequestOutput]:
        self.scheduler.finish_requests([r.request_id for r in reqs], FinishReason.ERROR)
        outs = []
        for req in reqs:
            out = outputs.empty_output(req)
            self._complete(req, out, self.clock(), FinishReason.ERROR)
            outs.append(out)
        return outs

    def _emit_or_fail(self, new: NewToken, now: float) -> RequestOutput:
        """The token's output; a request whose token cannot be turned into text ends with an error."""
        try:
            return self._emit(new, now)
        except Exception:
            log.exception("output of request %s failed; ending it with an error",
                          new.request.request_id)
            return self._fail_requests([new.request])[0]

    def fail_all(self) -> list[RequestOutput]:
        """End every unfinished request with an error (an engine step failed outside any
        one request's part): the engine is empty and serves new requests afterwards."""
        self._inflight = None
        return self._fail_requests(list(self.scheduler.requests.values()))

    def _launch(self, scheduler_output: SchedulerOutput, prev: Optional["InFlight"] = None) -> "InFlight":
        start = self.clock()
        planned = self._planned(scheduler_output)
        if planned.exempt:
            self._mark_exempt(scheduler_output)
        rungs = self.controller.choose_rungs(planned)
        if prev is None:
            pending = self.runner.launch(scheduler_output, rungs)
        else:
            pending = self.runner.launch(scheduler_output, rungs, prev=prev.pending)
        self._inflight = InFlight(scheduler_output, pending, start, self.scheduler.view.num_waiting > 0)
        return self._inflight

    def _mark_exempt(self, scheduler_output: SchedulerOutput) -> None:
        """Flag the sequences of an exempt class: the runner keeps their tokens undimmed."""
        limit = self.config.slo.dim_exempt_priority
        for s in scheduler_output.seqs:
            req = self.scheduler.requests.get(s.request_id)
            s.exempt = req is not None and req.priority <= limit

    def _collect(self, step: "InFlight") -> tuple[list[NewToken], float]:
        scheduler_output, pending, start, queue_left = step.sched, step.pending, step.start, step.queue_left
        if self._inflight is step:
            self._inflight = None
        runner_output = self.runner.collect(pending)
        now = self.clock()
        self._failed_steps = 0
        self.admission.observe_step(scheduler_output.num_prefill_tokens, now - start, queue_left)
        new_tokens = self.scheduler.update_from_output(scheduler_output, runner_output, now)
        for t in new_tokens:
            if t.first:
                self.admission.observe_first_token(t.request, now)
        view = self.scheduler.view
        stats = StepStats(start_time=start, latency_s=now - start,
                          num_prefill_tokens=scheduler_output.num_prefill_tokens,
                          num_decode_tokens=scheduler_output.num_decode_tokens,
                          batch_size=len(scheduler_output.seqs),
                          has_prefill=scheduler_output.has_prefill, tau=runner_output.tau,
                          experts_touched=runner_output.experts_touched,
                          num_waiting=view.num_waiting, num_running=view.num_running,
                          kv_usage=self.blocks.usage, top_k=runner_output.top_k,
                          exempt_tokens=sum(len(s.token_ids) for s in scheduler_output.seqs
                                            if s.exempt))
        self.last_step_stats = self.fresh_step_stats = stats
        self.controller.observe_step(stats)
        return new_tokens, now

    def _planned(self, scheduler_output: SchedulerOutput) -> PlannedStep:
        view = self.scheduler.view
        return PlannedStep(num_prefill_tokens=scheduler_output.num_prefill_tokens,
                           num_decode_tokens=scheduler_output.num_decode_tokens,
                           batch_size=len(scheduler_output.seqs), num_waiting=view.num_waiting,
                           waiting_tokens=view.waiting_tokens,
                           has_prefill=scheduler_output.has_prefill,
                           exempt=self.scheduler.holds_priority(
                               scheduler_output, self.config.slo.dim_exempt_priority),
                           prefill_queue=self.scheduler.prefill_queue()
                           if scheduler_output.has_prefill else ())

    def _emit(self, new: NewToken, now: float) -> RequestOutput:
        """Detokenise an accepted token, finish its request on a stop string, build the output."""
        req = new.request
        cut = outputs.detokenize(req, new.token_id)
        if cut is not None:
            self.scheduler.finish_requests([req.request_id], FinishReason.STOP)
        out = outputs.token_output(new, cut)
        if req.finished:  # a stop string wins over EOS or length in the same token
            reason = FinishReason.STOP if cut is not None else req.finish_reason
            self._complete(req, out, now, reason)
        return out

    def _finish(self, req: Request) -> RequestOutput:
        """The last output of a request finished outside a step's tokens (queue timeout)."""
        out = outputs.empty_output(req)
        self._complete(req, out, self.clock(), req.finish_reason)
        return out

    def _complete(self, req: Request, out: RequestOutput, now: float,
                  reason: Optional[FinishReason]) -> None:
        self.runner.release(req.request_id)
        outputs.close_output(out, req, reason, now)
        self.admission.observe_finish(now, held_slot=req.metrics.first_scheduled_time is not None)
        self.controller.observe_request(req.metrics.ttft, outputs.time_per_output_token(req, now), now)

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (nothing to do otherwise)."""
        if self.workers is not None:
            self.workers.close()

    def snapshot(self) -> dict:
        view, sched = self.scheduler.view, self.scheduler
        return dict(num_running=view.num_running, num_waiting=view.num_waiting,
                    kv_usage=self.blocks.usage, tau_prefill=self.controller.tau_prefill,
                    tau_decode=self.controller.tau_decode,
                    top_k_prefill=self.controller.top_k_prefill or self.spec.top_k,
                    top_k_decode=self.controller.top_k_decode or self.spec.top_k,
                    accuracy_spent=self.controller.accuracy_spent(),
                    step_token_budget=(self.controller.token_budget
                                       or self.config.scheduler.max_num_batched_tokens),
                    exempt_steps_total=self.controller.num_exempt_steps,
                    num_preemptions_total=sched.num_preemptions,
                    prompt_tokens_total=sched.num_prompt_tokens_total,
                    generation_tokens_total=sched.num_generation_tokens_total,
                    prefix_cache_queries_total=sched.num_prefix_cache_queries,
                    prefix_cache_hits_total=sched.num_prefix_cache_hits,
                    slo_violations=dict(self.controller.violations),
                    brownout_ready=self.runner.brownout_ready,
                    **self.admission.snapshot(self.clock()))


@dataclasses.dataclass
class InFlight:
    """A launched step the engine has not collected yet."""

    sched: SchedulerOutput
    pending: object  # the runner's handle (`PendingStep`)
    start: float  # when its GPU work could start: its launch, or the collect of the step before
    queue_left: bool  # requests were left waiting when it was planned


def rung_price_table(brownout: BrownoutConfig, model_dir: Optional[Path], top_k: int) -> Optional[PriceTable]:
    """The rung prices: the file `--rung-prices` names (for a model of `top_k` routed experts,
    else a ValidationError), else the first found beside the united experts or the demo model."""
    if brownout.rung_prices is not None:
        table = PriceTable.load(Path(brownout.rung_prices))
        if table.model_top_k != top_k:
            raise ValidationError("rung_prices", f"the table prices a model of top-k {table.model_top_k}; "
                                                 f"this model routes each token to {top_k} experts")
        return table
    return find_price_table(_price_dirs(brownout.united_experts, model_dir), top_k)


def _price_dirs(united: Optional[str], model_dir: Optional[Path]) -> list[Path]:
    """Where the rung prices may lie: beside the united experts, then the demo model's own."""
    dirs = [Path(united)] if united and Path(united).is_dir() else []
    demo = Path(default_model_dir())
    if model_dir is not None and model_dir.resolve() == demo.resolve():
        dirs.append(demo.parent)
    return dirs


def _model_name(model: str, model_dir: Optional[Path]) -> str:
    if model_dir is None:
        return model  # a dummy preset
    if model_dir.resolve() == Path(default_model_dir()).resolve():
        return DEMO_MODEL_NAME
    return model_dir.name


