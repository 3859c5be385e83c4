"""The scheduler alone, without a model: order, preemption, budgets, stops, timeouts, aborts,
and its invariants over random sequences of add / schedule / update / abort / expire."""

import math
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from brownout.config import SchedulerConfig
from brownout.engine.block_manager import BlockManager
from brownout.engine.request import Request, Status
from brownout.engine.scheduler import Scheduler
from brownout.types import FinishReason, RunnerOutput, SamplingParams

EOS = 0
LONG = SamplingParams(max_tokens=100, ignore_eos=True)


def _scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=8, policy="fcfs", chunked=True,
               timeout=None, max_model_len=None, eos=(EOS,)):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                             enable_chunked_prefill=chunked, queue_timeout_s=timeout)
    return Scheduler(config, BlockManager(num_blocks, block_size), max_model_len, eos)


def _add(sched, rid, n_prompt, params=LONG, arrival=0.0, priority=0):
    req = Request(rid, list(range(1, n_prompt + 1)), params, arrival, priority)
    sched.add(req)
    return req


def _step(sched, token=7, now=0.0):
    """Schedule a step and feed it back as if the runner sampled `token` for every request."""
    out = sched.schedule()
    sampled = {s.request_id: token for s in out.seqs if s.sample}
    return out, sched.update_from_output(out, RunnerOutput(sampled=sampled), now)


def _ids(out):
    return [s.request_id for s in out.seqs]


def test_priority_order_is_priority_then_arrival_then_addition():
    sched = _scheduler(policy="priority")
    _add(sched, "late-urgent", 2, arrival=3.0, priority=0)
    _add(sched, "low", 2, arrival=0.0, priority=2)
    _add(sched, "early-urgent", 2, arrival=1.0, priority=0)
    _add(sched, "mid", 2, arrival=0.5, priority=1)
    _add(sched, "early-urgent-too", 2, arrival=1.0, priority=0)  # same arrival: added later
    out = sched.schedule()
    assert _ids(out) == ["early-urgent", "early-urgent-too", "late-urgent", "mid", "low"]


def test_fcfs_orders_by_arrival_stamp_not_by_addition():
    sched = _scheduler(max_seqs=1)
    _add(sched, "second", 2, arrival=2.0)
    _add(sched, "first", 2, arrival=1.0)  # stamped earlier, reached the scheduler later
    _add(sched, "third", 2, arrival=3.0)
    assert _ids(sched.schedule()) == ["first"]


def test_victim_is_the_lowest_priority_running_request():
    sched = _scheduler(num_blocks=4, block_size=4, policy="priority")
    for rid, prio in (("a", 0), ("c", 1), ("b", 2)):
        _add(sched, rid, 4, priority=prio)  # one block each: one block stays free
    out, _ = _step(sched)
    assert _ids(out) == ["a", "c", "b"]
    out, _ = _step(sched)  # "a" takes the free block; "c" needs one too: "b" goes, not "c"
    assert out.preempted == ["b"] and _ids(out) == ["a", "c"]
    assert sched.requests["b"].status is Status.WAITING and sched.requests["b"].num_computed == 0
    assert sched.num_preemptions == 1 and sched.requests["b"].metrics.num_preemptions == 1


def test_victim_is_never_a_request_already_scheduled_in_the_step():
    sched = _scheduler(num_blocks=3, block_size=4, policy="priority")
    _add(sched, "low", 4, priority=5)
    _step(sched)
    _add(sched, "high", 4, priority=0)
    out, _ = _step(sched)  # "low" grows to two blocks, "high" takes the last one
    assert _ids(out) == ["low", "high"] and sched.blocks.num_free == 0
    out, _ = _step(sched)  # "low" fits; "high" needs a block and only it is left to preempt
    assert out.preempted == ["high"] and _ids(out) == ["low"]


def test_no_admission_in_a_step_that_preempted():
    sched = _scheduler(num_blocks=2, block_size=4)
    _add(sched, "a", 4)
    _add(sched, "b", 4)
    _step(sched)
    _add(sched, "c", 1)
    out, _ = _step(sched)  # "a" needs a block: "b" is preempted, and nobody is admitted
    assert out.preempted == ["b"] and _ids(out) == ["a"]


def test_chunked_prefill_off_keeps_prompts_whole():
    chunked, whole = _scheduler(budget=8), _scheduler(budget=8, chunked=False)
    for sched in (chunked, whole):
        _add(sched, "r0", 6)
        _add(sched, "r1", 5)
    out = chunked.schedule()
    assert [len(s.token_ids) for s in out.seqs] == [6, 2] and not out.seqs[1].sample
    out = whole.schedule()  # "r1" does not fit the 2 tokens left: it waits for the next step
    assert _ids(out) == ["r0"] and out.num_prefill_tokens == 6


def test_token_budget_splits_prefill_and_counts_decodes():
    sched = _scheduler(budget=10)
    for i in range(3):
        _add(sched, f"r{i}", 6)
    out, new = _step(sched)
    assert [len(s.token_ids) for s in out.seqs] == [6, 4] and out.num_prefill_tokens == 10
    assert [t.request.request_id for t in new] == ["r0"] and new[0].first
    out, _ = _step(sched)  # r0 decodes, r1 ends its prompt, r2 starts with what is left
    assert [len(s.token_ids) for s in out.seqs] == [1, 2, 6]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 8


def test_stops_on_eos_stop_ids_max_tokens_and_context():
    sched = _scheduler(max_model_len=8)
    eos = _add(sched, "eos", 3, SamplingParams(max_tokens=10))
    ignored = _add(sched, "ignored", 3, SamplingParams(max_tokens=2, ignore_eos=True))
    stop_id = _add(sched, "stop-id", 3, SamplingParams(max_tokens=10, ignore_eos=True,
                                                       stop_token_ids=[EOS]))
    context = _add(sched, "context", 6, SamplingParams(max_tokens=10, ignore_eos=True))
    _, new = _step(sched, token=EOS)
    assert eos.finish_reason is FinishReason.STOP and stop_id.finish_reason is FinishReason.STOP
    assert not ignored.finished and not context.finished
    _, new = _step(sched, token=EOS)
    assert ignored.finish_reason is FinishReason.LENGTH  # max_tokens
    assert context.finish_reason is FinishReason.LENGTH and context.num_tokens == 8
    assert {t.request.request_id for t in new} == {"ignored", "context"}
    assert not sched.requests and sched.blocks.num_used == 0


def test_queue_timeout_drops_only_requests_that_never_produced_a_token():
    sched = _scheduler(timeout=1.0, max_seqs=1)
    _add(sched, "old", 3, arrival=0.0)
    _add(sched, "new", 3, arrival=0.5)
    assert sched.expire_waiting(now=1.0) == []
    _step(sched, now=1.0)  # "old" runs and decodes
    expired = sched.expire_waiting(now=1.6)
    assert [r.request_id for r in expired] == ["new"]
    assert expired[0].finish_reason is FinishReason.TIMEOUT and expired[0].finished
    assert sched.view.num_waiting == 0 and sched.view.waiting_tokens == 0
    assert sched.expire_waiting(now=100.0) == []  # a running request never times out
    assert list(sched.requests) == ["old"]


def test_abort_frees_blocks_and_drops_the_in_flight_token():
    sched = _scheduler(max_seqs=8)
    _add(sched, "run", 5)
    _add(sched, "other", 3)
    _step(sched)
    out = sched.schedule()  # both in the launched step
    finished = sched.finish_requests(["run", "unknown", "run"], FinishReason.ABORT)
    assert [r.request_id for r in finished] == ["run"] and finished[0].finish_reason is FinishReason.ABORT
    new = sched.update_from_output(out, RunnerOutput(sampled={"run": 7, "other": 7}), now=0.0)
    assert [t.request.request_id for t in new] == ["other"]  # the aborted one's token is dropped
    assert finished[0].output_token_ids == [7] and finished[0].num_computed == 5
    assert sched.blocks.table("run") == [] and sched.view.num_running == 1


def test_a_reused_id_is_not_advanced_by_the_step_in_flight():
    sched = _scheduler()
    _add(sched, "x", 4)
    out = sched.schedule()
    sched.finish_requests(["x"], FinishReason.ABORT)
    again = _add(sched, "x", 4)
    assert sched.update_from_output(out, RunnerOutput(sampled={"x": 7}), now=0.0) == []
    assert again.num_computed == 0 and again.output_token_ids == []


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_removal_from_the_waiting_queue_keeps_the_order(policy):
    sched = _scheduler(policy=policy, max_seqs=30, budget=1000)
    reqs = [_add(sched, f"r{i}", 2, arrival=float(i % 7), priority=i % 3) for i in range(200)]
    sched.finish_requests([r.request_id for r in reqs if r.seq % 4], FinishReason.ABORT)
    kept = sorted((r for r in reqs if r.seq % 4 == 0), key=sched.waiting.key)
    assert _ids(sched.schedule()) == [r.request_id for r in kept[:30]]
    assert len(sched.waiting) == sched.view.num_waiting == len(kept) - 30


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_prefill_queue_lists_prompts_in_the_order_they_are_served(policy):
    """Running prompts still prefilling first (what this step has not computed yet counted),
    then the waiting ones in queue order; a preempted request that already has its first
    token carries no deadline of its own (+inf)."""
    sched = _scheduler(policy=policy, budget=10, max_seqs=4, num_blocks=64)
    _add(sched, "long", 25, arrival=0.0, priority=1)
    _step(sched, now=0.1)  # 10 of its 25 prompt tokens computed
    _add(sched, "late", 6, arrival=2.0, priority=1)
    _add(sched, "urgent", 4, arrival=3.0, priority=0)
    _add(sched, "early", 5, arrival=1.0, priority=1)
    waiting = [("urgent", 4, 3.0), ("early", 5, 1.0), ("late", 6, 2.0)] if policy == "priority" \
        else [("early", 5, 1.0), ("late", 6, 2.0), ("urgent", 4, 3.0)]
    assert sched.prefill_queue() == ((15, 0.0),) + tuple((n, a) for _, n, a in waiting)
    assert [r.request_id for r in sched.waiting.in_order()] == [rid for rid, _, _ in waiting]
    # a request with output tokens back in the queue: its tokens are ahead, no deadline
    done = _scheduler(budget=64)
    req = _add(done, "d", 3, arrival=0.5)
    _step(done)
    done._preempt(req)
    assert done.prefill_queue() == ((4, math.inf),)


def test_the_scheduler_imports_no_torch():
    code = ("import sys, brownout.engine.scheduler, brownout.engine.admission; "
            "sys.exit(any(m.split('.')[0] == 'torch' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps (schedule, then the fake runner's tokens back), aborts and queue
    timeouts; a step may stay in flight while requests are aborted or added."""

    @initialize(policy=st.sampled_from(["fcfs", "priority"]), chunked=st.booleans(),
                budget=st.integers(4, 48), max_seqs=st.integers(1, 6),
                num_blocks=st.integers(2, 10), max_model_len=st.integers(8, 64))
    def configure(self, policy, chunked, budget, max_seqs, num_blocks, max_model_len):
        if not chunked:  # whole prompts (and recomputed outputs) must fit one step's budget
            max_model_len = min(max_model_len, budget + 1)
        self.sched = _scheduler(num_blocks=num_blocks, block_size=4, budget=budget,
                                max_seqs=max_seqs, policy=policy, chunked=chunked,
                                timeout=5.0, max_model_len=max_model_len)
        self.inflight = None
        self.now = 0.0
        self.count = 0

    @rule(n=st.integers(1, 64), max_tokens=st.integers(1, 24), priority=st.integers(0, 3),
          ignore_eos=st.booleans(), dt=st.floats(0, 1))
    def add(self, n, max_tokens, priority, ignore_eos, dt):
        self.now += dt
        self.count += 1
        n = min(n, self.sched.max_model_len - 1)
        _add(self.sched, f"r{self.count}", n, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
             arrival=self.now, priority=priority)

    @precondition(lambda self: self.inflight is None)
    @rule()
    def schedule(self):
        out = self.sched.schedule()
        assert sum(len(s.token_ids) for s in out.seqs) <= self.sched.config.max_num_batched_tokens
        assert len(out.seqs) <= self.sched.config.max_num_seqs
        assert out.num_tokens == sum(len(s.token_ids) for s in out.seqs)
        self.inflight = out

    @precondition(lambda self: self.inflight is not None)
    @rule(token=st.integers(0, 9), dt=st.floats(0, 1))
    def update(self, token, dt):
        self.now += dt
        out, self.inflight = self.inflight, None
        sampled = {s.request_id: token for s in out.seqs if s.sample}
        self.sched.update_from_output(out, RunnerOutput(sampled=sampled), self.now)

    @precondition(lambda self: bool(self.sched.requests))
    @rule(pick=st.integers(0, 1000))
    def abort(self, pick):
        if pick % 3:  # a third as often as the other rules, so queues grow and preempt
            return
        ids = sorted(self.sched.requests)
        self.sched.finish_requests([ids[pick % len(ids)]], FinishReason.ABORT)

    @rule(dt=st.floats(0, 2))
    def expire(self, dt):
        self.now += dt
        for req in self.sched.expire_waiting(self.now):
            assert req.finish_reason is FinishReason.TIMEOUT and not req.output_token_ids

    @invariant()
    def counts_and_blocks_agree(self):
        s = self.sched
        waiting, running = list(s.waiting), list(s.running)
        assert not set(waiting) & set(running)
        assert set(waiting) | set(running) == set(s.requests.values())
        assert all(r.status is Status.WAITING for r in waiting)
        assert all(r.status is Status.RUNNING for r in running)
        v = s.view
        assert (v.num_waiting, v.num_running) == (len(waiting), len(running))
        assert v.waiting_tokens == sum(r.num_tokens - r.num_computed for r in waiting)
        assert v.running_prefill_tokens == sum(max(0, len(r.prompt_token_ids) - r.num_computed)
                                               for r in running)
        assert v.num_prefilling == sum(len(r.prompt_token_ids) > r.num_computed for r in running)
        by_class: dict[int, list[int]] = {}
        for r in waiting:
            c = by_class.setdefault(r.priority, [0, 0])
            c[0] += 1
            c[1] += r.num_tokens - r.num_computed
        assert v.waiting_by_priority == by_class
        # the controller's view of the prompts still to prefill: the same tokens, served order
        queue = s.prefill_queue()
        assert sum(t for t, _ in queue) == v.running_prefill_tokens + v.waiting_tokens
        assert list(s.waiting.in_order()) == sorted(waiting, key=s.waiting.key)
        assert v.num_running <= s.config.max_num_seqs
        pending = {q.request_id: len(q.token_ids) for q in self.inflight.seqs} if self.inflight else {}
        bs = s.blocks.block_size
        for r in waiting:
            assert r.num_computed == 0 and s.blocks.table(r.request_id) == []
        for r in running:
            held = r.num_computed + pending.get(r.request_id, 0)
            assert len(s.blocks.table(r.request_id)) == math.ceil(held / bs)
        assert s.blocks.num_used == sum(len(s.blocks.table(r.request_id)) for r in running)

    def teardown(self):
        """With the runner producing tokens, every request finishes and every block frees."""
        if not hasattr(self, "sched"):  # stopped before the first rule
            return
        if self.inflight is not None:
            self.update(token=7, dt=0.0)
        for _ in range(5000):
            if not self.sched.requests:
                break
            _step(self.sched, token=7, now=self.now)
            self.counts_and_blocks_agree()
        assert not self.sched.requests and self.sched.blocks.num_used == 0


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
test_scheduler_invariants = SchedulerMachine.TestCase


def test_prompt_logprobs_survive_a_preemption_after_the_prefill():
    """A request preempted after its prompt's logprobs came back (before its output, which
    carries them, is built) keeps them, and its recompute does not ask for them again; one
    preempted mid-prompt starts them over."""
    sched = _scheduler(budget=64)
    p = SamplingParams(max_tokens=100, ignore_eos=True, prompt_logprobs=1)
    req = _add(sched, "a", 6, p)
    out = sched.schedule()
    assert out.seqs[0].prompt_logprob_targets == [2, 3, 4, 5, 6]
    lps = RunnerOutput(sampled={"a": 7}, prompt_logprobs={"a": ["lp"] * 5})
    sched.update_from_output(out, lps, 0.0)
    sched._preempt(req)
    assert req.prompt_logprobs == ["lp"] * 5
    again = sched.schedule()
    assert again.seqs[0].prompt_logprob_targets is None and again.seqs[0].start_pos == 0
    small = _scheduler(budget=4)
    half = _add(small, "b", 9, p)
    part = small.schedule()  # 4 of its 9 prompt tokens
    small.update_from_output(part, RunnerOutput(sampled={}, prompt_logprobs={"b": ["lp"] * 4}), 0.0)
    assert half.num_computed == 4 and len(half.prompt_logprobs) == 4
    small._preempt(half)  # mid-prompt: its recompute computes them all again
    assert half.prompt_logprobs == []
    assert small.schedule().seqs[0].prompt_logprob_targets == [2, 3, 4, 5]
