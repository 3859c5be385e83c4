"""Prefix caching: shared, reference-counted, hash-chained blocks; LRU eviction; the tau rule;
greedy outputs unchanged; the prompt of n samples computed once."""

from __future__ import annotations

import argparse
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.api.launch import add_arguments, build_configs
from brownout.config import CacheConfig, SchedulerConfig
from brownout.defaults import default_united_dir
from brownout.engine.block_manager import BlockManager, prompt_hashes
from brownout.engine.llm import LLM
from brownout.engine.request import Request
from brownout.engine.scheduler import Scheduler
from brownout.types import FinishReason, RunnerOutput, SamplingParams

BS = 4  # tokens per block in the bookkeeping tests


def _check_invariants(bm: BlockManager, live: dict[str, list[int]]) -> None:
    tables = {rid: bm.table(rid) for rid in live}
    holders = [0] * bm.num_blocks
    for table in tables.values():
        assert len(set(table)) == len(table)
        for b in table:
            holders[b] += 1
    free = set(bm._free)
    for b in range(bm.num_blocks):
        assert bm.ref_count(b) == holders[b]  # a referenced block is never free
        assert (b in free) == (holders[b] == 0)
    cached_free = sum(1 for b in free if bm.block_hash(b) is not None)
    assert bm.num_cached_free == cached_free
    assert (bm.num_free - cached_free) + cached_free + bm.num_used == bm.num_blocks
    for h, b in bm._index.items():
        assert bm.block_hash(b) == h
    for rid, tokens in live.items():  # an indexed block is named by its chained hash
        hashes = prompt_hashes(tokens, BS)
        for i, b in enumerate(tables[rid]):
            if bm.block_hash(b) is not None:
                assert bm.block_hash(b) == hashes[i]


ops = st.lists(st.tuples(st.sampled_from(["add", "commit", "free"]), st.integers(0, 5),
                         st.integers(0, 3), st.integers(1, 14), st.sampled_from([1.0, 1.0, 0.5, 0.25])),
               min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=ops, num_blocks=st.integers(3, 16))
def test_sharing_refcounts_and_eviction(ops, num_blocks):
    bm = BlockManager(num_blocks, BS, enable_caching=True)
    prefixes = [[1] * 12, [2] * 8 + [3] * 4, [1] * 4 + [5] * 8, [7, 8, 9, 10] * 3]
    live: dict[str, list[int]] = {}
    tau_now = 1.0
    for op, r, p, length, tau in ops:
        rid = f"r{r}"
        if op == "add" and rid not in live:
            tokens = prefixes[p][:length] + [r + 20] * max(0, length - 12)
            cached = bm.cached_prefix(tokens, tau_now)
            assert len(cached) * BS <= len(tokens) - 1  # the last token is always computed
            for i, b in enumerate(cached):
                assert bm._tokens[b] == tuple(tokens[i * BS:(i + 1) * BS])
            if bm.can_allocate(rid, len(tokens), cached):
                table = bm.allocate(rid, len(tokens), cached)
                assert table[:len(cached)] == cached
                live[rid] = tokens
        elif op == "commit" and rid in live:
            bm.commit(rid, live[rid], len(live[rid]), tau)
            tau_now = tau
        elif op == "free" and rid in live:
            bm.free(rid)
            del live[rid]
        _check_invariants(bm, live)
    for rid in list(live):
        bm.free(rid)
        del live[rid]
    _check_invariants(bm, live)
    assert bm.num_used == 0


def test_cached_blocks_are_evicted_least_recently_used_first():
    bm = BlockManager(4, BS, enable_caching=True)
    a, b = [1] * 9, [2] * 9
    for rid, tokens in (("a", a), ("b", b)):
        bm.allocate(rid, 8)
        bm.commit(rid, tokens, 8, 1.0)
    bm.free("a")  # a's blocks are the least recently used
    bm.free("b")
    assert bm.num_cached_free == 4 and bm.num_used == 0
    bm.allocate("c", 4)  # one fresh block: a's last block goes first
    assert [len(bm.cached_prefix(t)) for t in (a, b)] == [1, 2]
    bm.allocate("d", 8)
    assert [len(bm.cached_prefix(t)) for t in (a, b)] == [0, 1]


def test_dimmed_blocks_serve_only_while_dimmed_at_least_as_far():
    bm = BlockManager(8, BS, enable_caching=True)
    tokens = list(range(13))
    bm.allocate("a", 13)
    bm.commit("a", tokens, 4, tau=0.5)  # first block while dimmed
    bm.commit("a", tokens, 12, tau=1.0)  # the next ones at tau 1, over a dimmed parent
    first, second, third = bm.table("a")[:3]
    assert [bm.block_tau(b) for b in (first, second, third)] == [0.5, 0.5, 0.5]
    assert bm.cached_prefix(tokens, tau_now=1.0) == []
    assert bm.cached_prefix(tokens, tau_now=0.7) == []
    assert bm.cached_prefix(tokens, tau_now=0.5) == [first, second, third]
    assert bm.cached_prefix(tokens, tau_now=0.0) == [first, second, third]
    # exact KV of the same prefix takes over its hashes; then it serves at any tau
    bm.allocate("b", 13)
    bm.commit("b", tokens, 12, tau=1.0)
    assert bm.cached_prefix(tokens, tau_now=1.0) == bm.table("b")[:3]
    bm.free("a")
    assert bm.block_hash(first) is None  # the replaced copy is not cached any more


def _scheduler(num_blocks=32, budget=64, caching=True):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
                     BlockManager(num_blocks, BS, enable_caching=caching))


def _step(sched, tau=1.0):
    out = sched.schedule()
    sampled = {s.request_id: 7 for s in out.seqs if s.sample}
    sched.update_from_output(out, RunnerOutput(sampled=sampled, tau=tau), now=0.0)
    return out


def _request(rid, prompt, max_tokens=3, **kw):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **kw), arrival_time=0.0)


def test_scheduler_applies_the_tau_rule():
    prompt = list(range(50, 71))  # 21 tokens: 5 full blocks reusable
    for tau_later, expect_hit in ((1.0, 0), (0.5, 20), (0.25, 20)):
        sched = _scheduler()
        sched.add(_request("a", prompt))
        while sched.requests:
            _step(sched, tau=0.5)
        _step(sched, tau=tau_later)  # an empty step: the engine now runs at tau_later
        sched.add(_request("b", prompt))
        _step(sched, tau=tau_later)
        assert sched.num_prefix_cache_hits == expect_hit


def test_samples_of_one_prompt_compute_it_once():
    """Three requests with one prompt, admitted together: the first computes the prompt, the
    others wait for its full blocks and share them (5 blocks of 4 tokens, referenced three
    times); each sample computes only the prompt's last token itself."""
    sched = _scheduler()
    prompt = list(range(100, 121))
    for i in range(3):
        sched.add(_request(f"s{i}", prompt, max_tokens=4, seed=i))
    first = _step(sched)
    assert [s.request_id for s in first.seqs] == ["s0"]
    shared = sched.blocks.table("s0")[:5]
    second = _step(sched)
    assert sorted(s.request_id for s in second.seqs) == ["s0", "s1", "s2"]
    assert all(sched.blocks.table(r)[:5] == shared for r in ("s0", "s1", "s2"))
    assert [sched.blocks.ref_count(b) for b in shared] == [3] * 5
    assert sched.blocks.table("s1")[5] != sched.blocks.table("s2")[5]  # the tail is their own
    while sched.requests:
        _step(sched)
    assert sched.num_prompt_tokens_total == 21 + 2 * 1
    assert (sched.num_prefix_cache_queries, sched.num_prefix_cache_hits) == (63, 40)
    assert sched.blocks.num_used == 0


def test_prompt_logprob_requests_skip_the_cache():
    sched = _scheduler()
    prompt = list(range(30, 51))
    sched.add(_request("a", prompt))
    while sched.requests:
        _step(sched)
    sched.add(_request("b", prompt, prompt_logprobs=1))
    out = _step(sched)
    assert out.seqs[0].start_pos == 0 and sched.num_prefix_cache_hits == 0


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _conversations(seed=0, turns=3, users=3):
    """Multi-turn prompts: each turn resends the conversation so far plus a new message."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 300) for _ in range(21)]
    prompts = []
    for _ in range(users):
        history = list(system)
        for _ in range(turns):
            history = history + [rng.randrange(3, 300) for _ in range(rng.randrange(3, 12))]
            prompts.append(list(history))
    return prompts


def _run(llm, prompts, every=2):
    """Requests arrive a few steps apart; returns each one's output tokens."""
    eng, done, pending, steps = llm.engine, {}, list(enumerate(prompts)), 0
    while pending or eng.has_unfinished_requests():
        if pending and steps % every == 0:
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", p, GREEDY)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
        steps += 1
    assert eng.blocks.num_used == 0
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def reference():
    prompts = _conversations()
    llm = LLM(device="cpu", cache=CacheConfig(block_size=BS, enable_prefix_caching=False))
    return prompts, _run(llm, prompts)


def test_greedy_outputs_equal_with_and_without_caching(reference):
    prompts, expected = reference
    llm = LLM(device="cpu", cache=CacheConfig(block_size=BS))
    assert _run(llm, prompts) == expected
    assert llm.engine.scheduler.num_prefix_cache_hits > 0
    snap = llm.engine.snapshot()
    assert 0 < snap["prefix_cache_hits_total"] < snap["prefix_cache_queries_total"]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_greedy_outputs_equal_under_preemption_and_chunked_prefill(reference, async_scheduling):
    prompts, expected = reference
    llm = LLM(device="cpu", cache=CacheConfig(block_size=BS, num_blocks=20),
              scheduler=SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=4,
                                        async_scheduling=async_scheduling))
    assert _run(llm, prompts, every=1) == expected
    sched = llm.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_prefix_cache_hits > 0


sched_ops = st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort"]), st.integers(0, 3),
                               st.integers(1, 30), st.sampled_from([1.0, 1.0, 0.5])),
                     min_size=1, max_size=60)


@settings(max_examples=100, deadline=None)
@given(ops=sched_ops, num_blocks=st.integers(6, 24), budget=st.integers(4, 32))
def test_scheduler_with_caching_keeps_the_invariants(ops, num_blocks, budget):
    """Shared prefixes, preemption, aborts and tau changes through the scheduler."""
    sched = _scheduler(num_blocks, budget)
    bases = [[3] * 30, [3] * 8 + [4] * 22, [5, 6] * 15, [3] * 4 + [9] * 26]
    counter = 0
    for op, a, b, tau in ops:
        if op == "add":
            prompt = bases[a][:min(b, num_blocks * BS - 1)]
            sched.add(_request(f"r{counter}", prompt, max_tokens=1 + b % 6))
            counter += 1
        elif op == "abort" and sched.requests:
            sched.finish_requests([sorted(sched.requests)[b % len(sched.requests)]], FinishReason.ABORT)
        else:
            _step(sched, tau)
        _check_invariants(sched.blocks, {r: q.all_token_ids for r, q in sched.requests.items()})
    for _ in range(2000):
        if not sched.requests:
            break
        _step(sched)
    assert not sched.requests and sched.blocks.num_used == 0


def test_the_server_flag_turns_caching_off():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    on, _ = build_configs(parser.parse_args([]))
    off, _ = build_configs(parser.parse_args(["--no-enable-prefix-caching"]))
    assert on.cache.enable_prefix_caching and not off.cache.enable_prefix_caching


def test_dimmed_engine_reuses_its_dimmed_blocks():
    """At a fixed tau < 1 every block is worth that tau and serves later requests at it, and
    no request at tau = 1. (Outputs are not compared with an engine without caching: at
    tau < 1 routing keeps the experts hottest over the whole step, so KV depends on what
    else the step computes, and caching changes that.)"""
    united = default_united_dir(4)
    if united is None:
        pytest.skip("the embedded united experts are missing")
    prompts = _conversations(seed=1, turns=2, users=2)
    llm = LLM(device="cpu", united_experts=united, tau=0.5, cache=CacheConfig(block_size=BS))
    _run(llm, prompts)
    bm = llm.engine.blocks
    assert llm.engine.scheduler.num_prefix_cache_hits > 0
    cached = [b for b in range(bm.num_blocks) if bm.block_hash(b) is not None]
    assert cached and {bm.block_tau(b) for b in cached} == {0.5}
    assert bm.cached_prefix(prompts[0], tau_now=0.5) != []
    assert bm.cached_prefix(prompts[0], tau_now=1.0) == []
