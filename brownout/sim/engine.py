"""One engine under load on a virtual clock: the real scheduler, admission and controller,
with each model step replaced by a latency drawn from a step-cost profile.

The step loop follows `LLMEngine.step`: at the end of a step its output is collected
(admission and the controller observe it, the scheduler takes one token per sampling
sequence), queue timeouts expire, and the next step is scheduled, its tau chosen and its
end drawn from the profile. Requests reach the engine the profile's request path time after
the client sent them and each token reaches the client its path time after the engine made
it (each a fixed time plus a time per request running in the engine then). The
per-request records are the bench client's (`brownout.bench.client`), in client time, and
`scrape` returns what the bench client reads from /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from brownout.config import SchedulerConfig, SLOConfig
from brownout.control import PlannedStep, make_controller
from brownout.control.prices import PriceTable
from brownout.engine.admission import Admission
from brownout.engine.block_manager import BlockManager
from brownout.engine.outputs import time_per_output_token
from brownout.engine.request import Request, Status
from brownout.engine.scheduler import NewToken, Scheduler
from brownout.sim.clock import EventQueue, VirtualClock
from brownout.sim.profile import StepCostProfile, StepShape
from brownout.types import (AdmissionError, FinishReason, RunnerOutput, SamplingParams,
                            SchedulerOutput, StepStats)

# every simulated token has this id; requests ignore EOS, so only max_tokens ends them
SIM_TOKEN_ID = 0
# the HTTP status the server answers a refused or timed-out request with (admission, queue timeout)
REFUSED_STATUS = 429
# the HTTP status of a request the engine cannot take at all (a prompt over the context)
BAD_REQUEST_STATUS = 400


@dataclass
class SimSetup:
    """Everything a simulated run depends on besides the workload."""

    profile: StepCostProfile
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    max_model_len: Optional[int] = None
    seed: int = 0
    fixed_tau: float = 1.0  # the `fixed` policy's tau (`--fixed-tau`)
    replicas: int = 1  # engines behind a router (`brownout.sim.fleet`)
    router: str = "least_loaded"
    prices: Optional[PriceTable] = None  # rung prices: expert shedding and the accuracy spent
    # exempt tokens keep their experts inside a dimmed step, as the engine does; False: a
    # step holding an exempt request runs undimmed as a whole
    exempt_per_token: bool = True


@dataclass
class SimRequest:
    """A request as the bench client sends it: when, how long its prompt, how many tokens."""

    index: int
    send_time_s: float
    prompt_tokens: int
    max_tokens: int
    prompt_len_hint: Optional[int] = None
    priority: int = 0  # as the API's `priority` (lower is more important)


@dataclass
class _Record:
    rec: dict[str, Any]
    request: Optional[Request] = None
    token_times: list[float] = field(default_factory=list)


class SimEngine:
    """Drives `Scheduler`, `Admission` and the SLO controller on an `EventQueue`."""

    def __init__(self, profile: StepCostProfile, sched_config: SchedulerConfig, slo: SLOConfig,
                 seed: int = 0, max_model_len: Optional[int] = None, fixed_tau: float = 1.0,
                 clock: Optional[VirtualClock] = None, events: Optional[EventQueue] = None,
                 prices: Optional[PriceTable] = None, exempt_per_token: bool = True):
        """`clock` and `events`: shared with other engines (replicas behind a router);
        `prices`: the rungs' accuracy prices (shedding, and the accuracy spent)."""
        self.profile = profile
        self.clock = VirtualClock() if clock is None else clock
        self.events = EventQueue(self.clock) if events is None else events
        self.rng = np.random.default_rng(seed)
        self.blocks = BlockManager(profile.num_blocks, profile.block_size)
        self.scheduler = Scheduler(sched_config, self.blocks, max_model_len)
        self.admission = Admission(sched_config, slo.ttft_s, self.scheduler.view)
        self.controller = make_controller(slo, clock=self.clock, fixed_tau=fixed_tau)
        if prices is not None:
            self.controller.enable_ladder(prices)
        budget = sched_config.max_num_batched_tokens
        self.controller.set_step_sizes(budget, profile.graph_buckets.get("prefill_tokens", ()))
        self.policy = slo.policy  # the profile's host gap between steps may differ by policy
        self.exempt_priority = slo.dim_exempt_priority
        self.controller.exempt_per_token = exempt_per_token
        self.records: dict[str, _Record] = {}
        self.busy = False
        self.step_count = {"prefill": 0, "decode": 0}
        self.step_sum = {"prefill": 0.0, "decode": 0.0}

    # ---- requests ------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> None:
        """Schedule a request's send; it reaches the engine the path's time later."""
        self._record(req)
        self.events.at(req.send_time_s, self._send, req)

    def _send(self, req: SimRequest) -> None:
        self.events.at(self.clock() + self.profile.request_in(self.scheduler.view.num_running),
                       self._arrive, req)

    def _out(self) -> float:
        """Engine to client now."""
        return self.profile.request_out(self.scheduler.view.num_running)

    def accept(self, req: SimRequest) -> None:
        """A request that reaches the engine now (a router chose it)."""
        self._record(req)
        self._arrive(req)

    def _record(self, req: SimRequest) -> None:
        rec = {"index": req.index, "scheduled": req.send_time_s, "first_sent": req.send_time_s,
               "sent": req.send_time_s, "first_token": None, "token_times": [], "done": None,
               "status": None, "error": None, "rejected": False, "retry_after": None,
               "output_tokens": 0, "prompt_tokens": req.prompt_tokens,
               "max_tokens": req.max_tokens, "prompt_len_hint": req.prompt_len_hint,
               "finish_reason": None, "attempts": 1}
        self.records[str(req.index)] = _Record(rec)

    def _arrive(self, req: SimRequest) -> None:
        now = self.clock()
        rid = str(req.index)
        record = self.records[rid]
        try:
            predicted = self.admission.admit(req.prompt_tokens, now, now,
                                             self.controller.prefill_speedup, req.priority)
        except AdmissionError as e:
            record.rec.update(status=REFUSED_STATUS, error=str(e), rejected=True,
                              retry_after=e.retry_after_s, done=now + self._out())
            return
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)
        request = Request(rid, [SIM_TOKEN_ID] * req.prompt_tokens, params, now, req.priority,
                          predicted_wait_s=predicted)
        try:
            self.scheduler.add(request)
        except ValueError as e:  # a prompt longer than the context: the server answers 400
            record.rec.update(status=BAD_REQUEST_STATUS, error=str(e),
                              done=now + self._out())
            return
        record.request = request
        if not self.busy:
            self._schedule_next()

    # ---- the step loop -------------------------------------------------------------------
    def _schedule_next(self) -> None:
        now = self.clock()
        for req in self.scheduler.expire_waiting(now):
            self._complete(req, now)
        view = self.scheduler.view
        self.admission.set_running_cap(self.controller.running_cap(view))
        sched = self.scheduler.schedule(self.controller.choose_token_budget(view))
        if not sched.seqs:
            self.busy = False
            return
        self.busy = True
        shape = StepShape.of(sched)
        planned = _planned(self.scheduler, sched, self.exempt_priority)
        rungs = self.controller.choose_rungs(planned)
        top_k = rungs.top_k if rungs.top_k is not None and rungs.top_k < self.profile.routing.top_k \
            else None
        exempt = 0
        if planned.exempt and self.controller.exempt_per_token:
            exempt = sum(len(s.token_ids) for s in sched.seqs
                         if self.scheduler.requests[s.request_id].priority <= self.exempt_priority)
        latency = self.profile.step_latency_s(shape, rungs.tau, self.rng, top_k, exempt)
        queue_left = self.scheduler.view.num_waiting > 0
        self.events.at(now + latency, self._collect, sched, shape, rungs.tau, now, queue_left, top_k,
                       exempt)

    def _collect(self, sched: SchedulerOutput, shape: StepShape, tau: float, start: float,
                 queue_left: bool, top_k: Optional[int] = None, exempt: int = 0) -> None:
        now = self.clock()
        latency = now - start
        self.admission.observe_step(sched.num_prefill_tokens, latency, queue_left)
        sampled = {s.request_id: SIM_TOKEN_ID for s in sched.seqs if s.sample}
        touched = self.profile.experts_touched(shape, tau, top_k, exempt)
        new_tokens = self.scheduler.update_from_output(
            sched, RunnerOutput(sampled=sampled, experts_touched=touched, tau=tau, top_k=top_k), now)
        for t in new_tokens:
            self._token(t, now)
        view = self.scheduler.view
        stats = StepStats(start_time=start, latency_s=latency,
                          num_prefill_tokens=sched.num_prefill_tokens,
                          num_decode_tokens=sched.num_decode_tokens, batch_size=len(sched.seqs),
                          has_prefill=sched.has_prefill, tau=tau, experts_touched=touched,
                          num_waiting=view.num_waiting, num_running=view.num_running,
                          kv_usage=self.blocks.usage, top_k=top_k, exempt_tokens=exempt)
        self.controller.observe_step(stats)
        self.step_count[shape.phase] += 1
        self.step_sum[shape.phase] += latency
        self.busy = True  # the host gap belongs to the engine: arrivals do not start a step
        self.events.at(now + self.profile.host_gap(self.policy, view.num_running), self._schedule_next)

    def _token(self, new: NewToken, now: float) -> None:
        record = self.records[new.request.request_id]
        record.token_times.append(now + self._out())
        if new.first:
            self.admission.observe_first_token(new.request, now)
        if new.request.finished:
            self._complete(new.request, now)

    def _complete(self, req: Request, now: float) -> None:
        record = self.records[req.request_id]
        m = req.metrics
        m.finished_time = now
        self.admission.observe_finish(now, held_slot=m.first_scheduled_time is not None)
        n_out = len(req.output_token_ids)
        self.controller.observe_request(m.ttft, time_per_output_token(req, now), now)
        out = self._out()
        rec = record.rec
        if req.finish_reason is FinishReason.TIMEOUT:
            rec.update(status=REFUSED_STATUS, rejected=True, error="queue timeout",
                       retry_after=max(1.0, round(now - m.arrival_time)), done=now + out)
            return
        rec.update(status=200, token_times=record.token_times, output_tokens=n_out,
                   first_token=record.token_times[0] if record.token_times else None,
                   done=now + out, finish_reason=req.finish_reason.value)

    def pending(self) -> bool:
        """Whether any request is still on its way, queued or running."""
        return any(r.rec["done"] is None for r in self.records.values())

    # ---- what the bench client scrapes ---------------------------------------------------
    def scrape(self) -> dict[str, Any]:
        view, ctl = self.scheduler.view, self.controller
        brownout = {f"brownout_slo_violations_total,kind={k}": float(v)
                    for k, v in ctl.violations.items()}
        brownout["brownout_requests_refused_slo_total"] = float(self.admission.num_refused_slo)
        brownout["brownout_step_token_budget"] = float(
            ctl.token_budget or self.scheduler.config.max_num_batched_tokens)
        brownout["brownout_running_cap"] = float(view.max_running)
        brownout["brownout_exempt_steps_total"] = float(ctl.num_exempt_steps)
        k = self.profile.routing.top_k
        for phase, top_k in (("prefill", ctl.top_k_prefill), ("decode", ctl.top_k_decode)):
            brownout[f"brownout_top_k,phase={phase}"] = float(top_k or k)
        for weighting, value in (ctl.accuracy_spent() or {}).items():
            brownout[f"brownout_accuracy_spent,weighting={weighting.removesuffix('_weighted')}"] = value
        for phase in ("prefill", "decode"):
            brownout[f"brownout_step_latency_seconds_count,phase={phase}"] = float(self.step_count[phase])
            brownout[f"brownout_step_latency_seconds_sum,phase={phase}"] = self.step_sum[phase]
        return {"t": self.clock(), "running": float(view.num_running),
                "waiting": float(view.num_waiting), "kv_cache_usage": self.blocks.usage,
                "tau_prefill": ctl.tau_prefill, "tau_decode": ctl.tau_decode, "brownout": brownout}

    def request_records(self) -> list[dict[str, Any]]:
        """Every request's record, in index order; one still unfinished has no `done`."""
        out = []
        for key in sorted(self.records, key=int):
            r = self.records[key]
            if r.request is not None and r.request.status is not Status.FINISHED:
                r.rec.update(error="unfinished at the end of the simulation")
            out.append(r.rec)
        return out


def _planned(scheduler: Scheduler, sched: SchedulerOutput,
             exempt_priority: Optional[int] = None) -> PlannedStep:
    view = scheduler.view
    return PlannedStep(num_prefill_tokens=sched.num_prefill_tokens,
                       num_decode_tokens=sched.num_decode_tokens, batch_size=len(sched.seqs),
                       num_waiting=view.num_waiting, waiting_tokens=view.waiting_tokens,
                       has_prefill=sched.has_prefill,
                       exempt=scheduler.holds_priority(sched, exempt_priority),
                       prefill_queue=scheduler.prefill_queue() if sched.has_prefill else ())
