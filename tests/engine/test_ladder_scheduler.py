"""The ladder's rungs in the scheduler and admission: the per-step token budget (rung 3), the
running-batch cap (rung 4) and priority classes (rung 5: refusal order, preemption victim,
steps holding an exempt request). No model, no wall clock."""

import pytest

from brownout.config import SchedulerConfig
from brownout.engine.admission import Admission
from brownout.engine.block_manager import BlockManager
from brownout.engine.request import Request, Status
from brownout.engine.scheduler import Scheduler
from brownout.types import AdmissionError, RunnerOutput, SamplingParams

LONG = SamplingParams(max_tokens=100, ignore_eos=True)


def _scheduler(budget=64, max_seqs=8, policy="fcfs", num_blocks=256, admission_factor=None):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                             admission_ttft_factor=admission_factor)
    return Scheduler(config, BlockManager(num_blocks, 4), None, (0,))


def _add(sched, rid, n_prompt, priority=0, arrival=0.0):
    req = Request(rid, list(range(1, n_prompt + 1)), LONG, arrival, priority)
    sched.add(req)
    return req


def _step(sched, token_budget=None):
    out = sched.schedule(token_budget)
    sampled = {s.request_id: 7 for s in out.seqs if s.sample}
    sched.update_from_output(out, RunnerOutput(sampled=sampled), 0.0)
    return out


def _lens(out):
    return {s.request_id: len(s.token_ids) for s in out.seqs}


def test_token_budget_caps_prompt_chunks_and_never_a_decode():
    sched = _scheduler(budget=64)
    for i in range(3):
        _add(sched, f"d{i}", 4)
    _step(sched)  # three prompts prefilled: they decode from now on
    assert sched.view.num_decoding == 3 and sched.view.num_prefilling == 0
    _add(sched, "long", 40)
    out = _step(sched, token_budget=3 + 8)  # decodes first, the prompt gets what is left
    assert _lens(out) == {"d0": 1, "d1": 1, "d2": 1, "long": 8}
    assert sched.view.num_prefilling == 1
    out = _step(sched, token_budget=2)  # smaller than the decodes: no prompt tokens, every decode
    assert _lens(out) == {"d0": 1, "d1": 1, "d2": 1}
    out = _step(sched, token_budget=1000)  # at most the configured budget
    assert _lens(out) == {"d0": 1, "d1": 1, "d2": 1, "long": 32}
    assert sched.view.num_prefilling == 0 and sched.view.num_decoding == 4
    assert out.num_prefill_tokens == 32 and out.num_decode_tokens == 3


def test_no_budget_keeps_the_configured_one():
    a, b = _scheduler(budget=16), _scheduler(budget=16)
    for s in (a, b):
        _add(s, "r0", 10)
        _add(s, "r1", 10)
    assert _lens(a.schedule()) == _lens(b.schedule(16)) == {"r0": 10, "r1": 6}


def test_running_cap_holds_requests_in_the_queue():
    sched = _scheduler(max_seqs=8)
    for i in range(5):
        _add(sched, f"r{i}", 2)
    sched.view.running_cap = 2
    out = _step(sched)
    assert sorted(_lens(out)) == ["r0", "r1"] and sched.view.num_waiting == 3
    assert sched.view.free_slots == 0
    sched.view.running_cap = 20  # above max_num_seqs: max_num_seqs holds
    assert sched.view.max_running == 8
    out = _step(sched)
    assert len(out.seqs) == 5


def test_a_more_important_request_preempts_the_least_important_at_the_cap():
    sched = _scheduler(max_seqs=2, policy="priority")
    _add(sched, "mid", 4, priority=1)
    _add(sched, "low", 4, priority=2)
    _step(sched)
    _add(sched, "urgent", 4, priority=0)
    out = _step(sched)  # the batch is full: the least important running request gives way
    assert out.preempted == ["low"] and sorted(_lens(out)) == ["mid", "urgent"]
    assert sched.requests["low"].status is Status.WAITING
    _add(sched, "same", 4, priority=1)
    out = _step(sched)  # not more important than anyone running: it waits
    assert out.preempted == [] and sched.requests["same"].status is Status.WAITING


def test_fcfs_never_preempts_for_priority():
    sched = _scheduler(max_seqs=1)
    _add(sched, "low", 4, priority=5)
    _step(sched)
    _add(sched, "urgent", 4, priority=0)
    out = _step(sched)
    assert out.preempted == [] and _lens(out) == {"low": 1}


def test_a_step_holds_an_exempt_request_by_priority():
    sched = _scheduler(policy="priority")
    _add(sched, "a", 4, priority=3)
    _add(sched, "b", 4, priority=1)
    out = sched.schedule()
    assert sched.holds_priority(out, 1) and sched.holds_priority(out, 2)
    assert not sched.holds_priority(out, 0) and not sched.holds_priority(out, None)


def _warm(adm, rate_tokens=1000, step_s=0.01, finishes=8):
    """Steps that show a prefill rate of 1e5 tokens/s, and a slot freed every 0.5 s."""
    for _ in range(8):
        adm.observe_step(rate_tokens, step_s, queue_left=True)
    for i in range(finishes):
        adm.observe_finish(i * 0.5, held_slot=True)


def test_admission_refuses_beyond_the_running_cap_with_the_predicted_retry_after():
    sched = _scheduler(max_seqs=8, admission_factor=1.0)
    adm = Admission(sched.config, 1.0, sched.view)
    _warm(adm)
    now = 3.6  # eight finishes in the last 4 s: two slots a second
    for i in range(4):
        _add(sched, f"r{i}", 4)
    _step(sched)
    assert adm.admit(100, now, now, lambda: 1.0) is not None  # 4 of 8 slots free
    adm.set_running_cap(4)
    assert sched.view.free_slots == 0 and adm.snapshot(now)["running_cap"] == 4
    for i in range(2):
        _add(sched, f"w{i}", 4)  # two already wait for a slot: this one is third
    with pytest.raises(AdmissionError) as e:
        adm.admit(100, now, now, lambda: 1.0)
    # slot wait (2 ahead + itself) / 2 slots per s = 1.5 s, plus its prefill and a step
    expected = 1.5 + 100 / 1e5 + adm.step_time_s
    assert e.value.retry_after_s == pytest.approx(max(1.0, -(-(expected - 1.0) // 1)))
    assert "admission limit" in str(e.value)
    adm.set_running_cap(None)  # no cap: eight slots, four free
    assert adm.admit(100, now, now, lambda: 1.0) is not None


def test_priority_decides_who_is_refused_first():
    sched = _scheduler(max_seqs=64, policy="priority", admission_factor=1.0)
    adm = Admission(sched.config, 0.1, sched.view)
    _warm(adm)
    for i in range(8):  # 8000 tokens of the least important class queued: 80 ms of prefill
        _add(sched, f"bulk{i}", 1000, priority=5)
    now = 3.6
    with pytest.raises(AdmissionError):  # behind the bulk: over the 100 ms limit
        adm.admit(2500, now, now, lambda: 1.0, priority=5)
    assert adm.admit(2500, now, now, lambda: 1.0, priority=0) is not None  # ahead of it
    fcfs = _scheduler(max_seqs=64, admission_factor=1.0)
    adm = Admission(fcfs.config, 0.1, fcfs.view)
    _warm(adm)
    for i in range(8):
        _add(fcfs, f"bulk{i}", 1000, priority=5)
    with pytest.raises(AdmissionError):  # FCFS: every class waits behind the whole queue
        adm.admit(2500, now, now, lambda: 1.0, priority=0)
