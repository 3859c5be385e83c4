"""Async scheduling: a decode step planned and launched before the previous step is
collected, its input tokens read on the device. Outputs are those of the synchronous loop
(greedy and seeded, with stop tokens, length limits, chunked prefill, preemption and the
prefix cache), a request that ends in flight has its extra token dropped and its blocks
freed, and the scheduler plans ahead (decodes, prompt chunks, admissions) only when nothing
it needs is unknown."""

from __future__ import annotations

import random

import pytest

from brownout.config import CacheConfig, SchedulerConfig
from brownout.engine.block_manager import BlockManager
from brownout.engine.llm import LLM
from brownout.engine.request import Request
from brownout.engine.scheduler import Scheduler
from brownout.types import FinishReason, RunnerOutput, SamplingParams


def _engine(path, async_scheduling: bool, **sched):
    cache = sched.pop("cache", CacheConfig())
    return LLM(path, device="cpu", cache=cache,
               scheduler=SchedulerConfig(async_scheduling=async_scheduling, **sched)).engine


def _count_ahead(engine) -> list[int]:
    """Patch the runner to count launches of steps planned ahead: [all of them, those with
    known tokens too (a prompt chunk or an admission)]."""
    launch, count = engine.runner.launch, [0, 0]

    def counted(sched, rungs=1.0, prev=None):
        if sched.prev_rows is not None:
            count[0] += 1
            count[1] += min(sched.prev_rows) < 0
        return launch(sched, rungs, prev)

    engine.runner.launch = counted
    return count


def _drive(engine, arrivals: list[tuple[int, str, list[int], SamplingParams]]) -> dict:
    """Add each request at its step, step until idle; request id -> (tokens, finish reason)."""
    done, step = {}, 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.output_token_ids, out.finish_reason)
        step += 1
        assert step < 2000, "engine did not finish its requests"
    assert engine.blocks.num_used == 0 and not engine.requests
    return done


def _workload(vocab: int, stops: dict[str, list[int]]):
    """Requests arriving at different steps: greedy and seeded-sampled, various lengths, some
    with stop token ids (`stops`: request id -> ids)."""
    rng = random.Random(11)
    out = []
    for i in range(8):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))]
        kw = dict(max_tokens=rng.randint(1, 24), ignore_eos=True,
                  stop_token_ids=stops.get(f"r{i}", []))
        if i % 3 == 1:  # sampled, seeded: the draw must not depend on the loop
            kw.update(temperature=0.8, top_p=0.9, seed=100 + i)
        else:
            kw.update(temperature=0.0)
        out.append((rng.choice([0, 0, 2, 5, 9]), f"r{i}", prompt, SamplingParams(**kw)))
    return out


@pytest.mark.parametrize("setup", [
    dict(),  # roomy cache, the default step budget
    dict(max_num_batched_tokens=16, max_num_seqs=4,
         cache=CacheConfig(block_size=4, num_blocks=20)),  # chunked prefill and preemption
])
def test_outputs_match_the_synchronous_loop(tiny_models, setup):
    path = str(tiny_models["qwen2_moe"])
    sync = _engine(path, False, **dict(setup))
    vocab = sync.spec.vocab_size
    # stop ids the greedy requests meet: a token from the middle of their plain outputs
    plain = _drive(sync, _workload(vocab, {}))
    stops = {rid: [toks[len(toks) // 2]] for rid, (toks, _) in plain.items()
             if rid in ("r0", "r2", "r5") and len(toks) > 2}
    work = _workload(vocab, stops)
    expected = _drive(sync, work)
    fast = _engine(path, True, **dict(setup))
    ahead = _count_ahead(fast)
    got = _drive(fast, work)
    assert got == expected
    assert ahead[0] > 0 and ahead[1] > 0  # the loop planned steps ahead, some with prompt work
    assert any(reason == FinishReason.STOP for _, reason in expected.values())
    if setup:
        assert sync.scheduler.num_preemptions > 0 and fast.scheduler.num_preemptions > 0


def test_off_never_plans_ahead(tiny_models):
    engine = _engine(str(tiny_models["qwen2_moe"]), False)
    ahead = _count_ahead(engine)
    _drive(engine, [(0, "a", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))])
    assert ahead[0] == 0


def test_token_after_a_stop_id_is_dropped_and_blocks_freed(tiny_models):
    path = str(tiny_models["qwen2_moe"])
    base = _drive(_engine(path, False), [(0, "b", [5, 6, 7, 8], SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True))])["b"][0]
    stop = base[4]
    cut = base[:base.index(stop) + 1]
    engine = _engine(path, True)
    launched = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, rungs=1.0, prev=None: (
        launched.append(sched.prev_rows is not None), launch(sched, rungs, prev))[1]
    got = _drive(engine, [(0, "s", [5, 6, 7, 8], SamplingParams(max_tokens=20, temperature=0,
                                                                 ignore_eos=True, stop_token_ids=[stop]))])
    assert got["s"] == (cut, FinishReason.STOP)
    # one step was launched past the stop token: its token was computed and dropped
    assert len(launched) == len(cut) + 1 and launched[-1]


# ---- the scheduler's plan ---------------------------------------------------------------
BS = 4


def _sched(num_blocks=32, max_num_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs), BlockManager(num_blocks, BS))


def _req(rid, n_prompt=6, max_tokens=10) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   arrival_time=0.0)


def _collect(s: Scheduler, out, tokens: dict):
    return s.update_from_output(out, RunnerOutput(sampled=tokens), now=1.0)


def test_plan_follows_the_previous_step():
    s = _sched()
    for rid in ("a", "b"):
        s.add(_req(rid))
    first = s.schedule()  # both prompts
    ahead = s.schedule_ahead(first)
    assert ahead is not None and ahead.prev_rows == [0, 1] and ahead.num_decode_tokens == 2
    assert [(q.request_id, q.start_pos, q.output_len) for q in ahead.seqs] == [("a", 6, 1), ("b", 6, 1)]
    assert all(len(q.block_table) * BS >= 7 for q in ahead.seqs)
    _collect(s, first, {"a": 50, "b": 51})
    new = _collect(s, ahead, {"a": 60, "b": 61})
    assert [(t.request.request_id, t.token_id) for t in new] == [("a", 60), ("b", 61)]
    assert s.requests["a"].output_token_ids == [50, 60] and s.requests["a"].num_computed == 7


def test_plan_skips_a_request_its_last_token_ends_and_maps_rows():
    s = _sched()
    s.add(_req("short", max_tokens=1))
    s.add(_req("long"))
    first = s.schedule()
    ahead = s.schedule_ahead(first)
    assert [q.request_id for q in ahead.seqs] == ["long"] and ahead.prev_rows == [1]


@pytest.mark.parametrize("case", ["no_blocks", "not_in_prev", "nothing_running", "prompt_logprobs", "logprobs",
                                  "priority", "reused_id"])
def test_no_plan_when_it_needs_the_collect(case):
    s = Scheduler(SchedulerConfig(max_num_seqs=2 if case == "priority" else 8,
                                  policy="priority" if case == "priority" else "fcfs"),
                  BlockManager(4 if case == "no_blocks" else 32, BS))
    s.add(_req("a", n_prompt=8 if case == "no_blocks" else 6))
    if case in ("prompt_logprobs", "logprobs"):
        s.requests["a"].sampling = SamplingParams(max_tokens=10, temperature=0, **{case: 1})
    if case in ("no_blocks", "priority"):
        s.add(_req("b", n_prompt=8))  # no_blocks: two requests hold all 4 blocks, full
    first = s.schedule()
    if case == "not_in_prev":
        s.add(_req("c"))
        s._from_waiting(s.waiting.pop())  # running, not in `first` (as after a resume)
        s._to_running(s.requests["c"])
    if case == "nothing_running":
        s.finish_requests(["a"], FinishReason.ABORT)
    if case == "priority":  # a more important request waits for a full batch: a preemption
        vip = _req("vip")
        vip.priority = -1
        s.add(vip)
    if case == "reused_id":  # "a" ends while `first` runs; a new request takes its id
        s.finish_requests(["a"], FinishReason.ABORT)
        s.add(_req("a", n_prompt=9))
        s._from_waiting(s.waiting.pop())
        s._to_running(s.requests["a"])
    assert s.schedule_ahead(first) is None


def test_a_finished_request_leaves_the_plan_and_rows_follow_the_samples():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(32, BS))
    s.add(_req("a", n_prompt=3))
    s.add(_req("b", n_prompt=2))
    s.add(_req("c", n_prompt=10))  # a chunk of 3 of its 10 tokens: it does not sample
    first = s.schedule()
    assert [q.sample for q in first.seqs] == [True, True, False]
    s.finish_requests(["a"], FinishReason.STOP)  # a stop string while `first` runs
    ahead = s.schedule_ahead(first)
    assert [q.request_id for q in ahead.seqs] == ["b", "c"]
    assert ahead.prev_rows == [1, -1]  # b's token is the second sampled one; c's are known


def test_reused_id_does_not_take_the_old_requests_token():
    s = _sched()
    s.add(_req("a", n_prompt=5))
    s.add(_req("b", n_prompt=3))
    first = s.schedule()
    s.finish_requests(["a"], FinishReason.ABORT)
    s.add(_req("a", n_prompt=9))  # a new request under the finished one's id
    ahead = s.schedule_ahead(first)  # admits the new "a" at position 0
    assert [q.request_id for q in ahead.seqs] == ["b", "a"] and ahead.prev_rows == [1, -1]
    _collect(s, first, {"a": 50, "b": 51})  # the old "a"'s token
    assert s.requests["a"].output_token_ids == [] and s.requests["a"].num_computed == 0
    new = _collect(s, ahead, {"a": 60, "b": 61})
    assert s.requests["a"].output_token_ids == [60] and s.requests["a"].num_computed == 9
    assert [t.token_id for t in new] == [61, 60]


def test_plan_admits_a_waiting_request_where_the_batch_has_room():
    s = _sched(max_num_seqs=2)
    s.add(_req("a"))
    first = s.schedule()
    s.add(_req("b"))
    s.add(_req("c"))  # no room for it: the batch holds two
    ahead = s.schedule_ahead(first)
    assert [q.request_id for q in ahead.seqs] == ["a", "b"] and ahead.prev_rows == [0, -1]
    assert ahead.seqs[1].token_ids == s.requests["b"].prompt_token_ids
    assert ahead.num_decode_tokens == 1 and ahead.num_prefill_tokens == 6
    assert [r.request_id for r in s.waiting] == ["c"]


def test_plan_continues_a_prompt_chunk_with_known_tokens():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=4), BlockManager(32, BS))
    s.add(_req("a", n_prompt=10))
    first = s.schedule()  # tokens 0..3
    ahead = s.schedule_ahead(first)
    q = ahead.seqs[0]
    assert (q.start_pos, q.token_ids, q.sample, ahead.prev_rows) == (4, [5, 6, 7, 8], False, [-1])
    _collect(s, first, {})
    _collect(s, ahead, {})
    assert s.requests["a"].num_computed == 8


def test_result_of_a_finished_request_is_dropped():
    s = _sched()
    s.add(_req("a"))
    s.add(_req("b"))
    first = s.schedule()
    ahead = s.schedule_ahead(first)
    s.update_from_output(first, RunnerOutput(sampled={"a": 50, "b": 51}), now=1.0)
    s.finish_requests(["a"], FinishReason.STOP)  # a stop string in a's first token
    new = _collect(s, ahead, {"a": 60, "b": 61})
    assert [t.request.request_id for t in new] == ["b"]
    assert "a" not in s.requests and s.requests["b"].output_token_ids == [51, 61]


def test_flag_turns_it_off():
    import argparse

    from brownout.api.launch import add_arguments, build_configs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    on, _ = build_configs(parser.parse_args([]))
    off, _ = build_configs(parser.parse_args(["--no-async-scheduling"]))
    assert on.scheduler.async_scheduling and not off.scheduler.async_scheduling


def test_runner_puts_device_tokens_on_their_rows(tiny_models):
    """In a step planned ahead whose first sequence is a prompt chunk, the decode's input
    token (from the previous step's samples) lands on that decode's row, after the chunk."""
    import dataclasses

    import torch

    from brownout.types import ScheduledSeq, SchedulerOutput

    runner = LLM(str(tiny_models["qwen2_moe"]), device="cpu").engine.runner
    p = SamplingParams(max_tokens=8, temperature=0)

    def seq(rid, ids, start, table):
        return ScheduledSeq(request_id=rid, token_ids=ids, start_pos=start, block_table=table,
                            sample=True, sampling=p, output_len=0)

    prev = runner.launch(SchedulerOutput(seqs=[seq("a", [5, 6, 7], 0, [1]), seq("b", [9, 10], 0, [2])],
                                         num_prefill_tokens=5, num_decode_tokens=0))
    sampled = runner.collect(prev).sampled["b"]
    chunk = seq("c", [11, 12, 13, 14, 15], 0, [3])
    known = SchedulerOutput(seqs=[chunk, seq("b", [sampled], 2, [2])], num_prefill_tokens=5,
                            num_decode_tokens=1)
    ahead = dataclasses.replace(known, seqs=[chunk, seq("b", [0], 2, [2])], prev_rows=[-1, 1])
    ref = runner.forward(known)[0].hidden.clone()
    got = runner.forward(ahead, prev=prev)[0].hidden.clone()
    blank = runner.forward(dataclasses.replace(ahead, prev_rows=None))[0].hidden.clone()
    assert torch.equal(got, ref)
    assert not torch.equal(blank[5], ref[5])  # the placeholder alone gives another row


class _Faulty:
    """The engine's runner, raising in the launch of steps planned ahead or in a collect."""

    def __init__(self, runner, fail_ahead=False, fail_collect_at=None):
        self.runner, self.fail_ahead, self.fail_collect_at, self.collects = runner, fail_ahead, fail_collect_at, 0

    def launch(self, sched, rungs=1.0, prev=None):
        if self.fail_ahead and sched.prev_rows is not None:
            raise RuntimeError("injected: launch ahead")
        return self.runner.launch(sched, rungs, prev)

    def collect(self, pending):
        self.collects += 1
        if self.collects == self.fail_collect_at:
            raise RuntimeError("injected: collect")
        return self.runner.collect(pending)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_a_failed_launch_ahead_falls_back_and_ends_no_request(tiny_models):
    path = str(tiny_models["qwen2_moe"])
    work = [(i, f"r{i}", [5 + i, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            for i in range(4)]
    expected = _drive(_engine(path, False), work)
    engine = _engine(path, True)
    engine.runner = _Faulty(engine.runner, fail_ahead=True)
    assert _drive(engine, work) == expected
    assert engine._failed_steps == 0


def test_a_failed_collect_keeps_the_step_launched_ahead(tiny_models):
    """The collect of step 2 fails while step 3 (planned ahead, with a request admitted in it)
    runs: step 2's requests end with an error, the admitted one goes on from step 3 and gets
    the tokens it gets without the fault."""
    path = str(tiny_models["qwen2_moe"])
    p = SamplingParams(max_tokens=6, temperature=0.9, seed=7, ignore_eos=True)
    work = [(0, "first", [5, 6, 7, 8], p), (2, "late", [9, 10, 11], p)]
    expected = _drive(_engine(path, True), work)
    engine = _engine(path, True)
    engine.runner = _Faulty(engine.runner, fail_collect_at=2)
    got = _drive(engine, work)
    assert got["first"][1] == FinishReason.ERROR
    assert got["late"] == expected["late"]
