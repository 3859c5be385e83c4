"""The engine loop against a model it cannot fool: a runner whose sampled token is a hash of
the KV context it reads through the step's block tables (and the request's seed and draw
count). Any wrong block table, cache slot, stale or missing KV write, token fed to the wrong
row, or request state advanced twice changes a token, so every request's output must equal
the reference computed from its prompt alone. Random configurations cover block sizes,
small caches (preemption), chunked prefill, token budgets and running caps chosen per step,
fcfs and priority, prefix caching with shared prompts, greedy and seeded sampling, stop ids,
aborts, the context limit, prompt logprobs and failing collects; each runs with async
scheduling on and off. The scheduler's queue counters are recounted after every step."""

from __future__ import annotations

import hashlib
import random

import pytest

import brownout.engine.llm_engine as llm_engine
from brownout.config import CacheConfig, SchedulerConfig
from brownout.engine.llm import LLM
from brownout.engine.scheduler import _prefill_left
from brownout.types import FinishReason, RunnerOutput, SamplingParams

VOCAB = 200  # token ids the fake model samples: 3..VOCAB-1
SEEDS = range(60)


def _token(context: list[int], seed, draw: int) -> int:
    h = hashlib.blake2b(repr((tuple(context), seed, draw)).encode(), digest_size=8).digest()
    return 3 + int.from_bytes(h, "little") % (VOCAB - 3)


class _Pending:
    def __init__(self, tokens, out):
        self.tokens, self.out = tokens, out


class KVHashRunner:
    """A runner whose KV cache holds token ids and whose samples hash the context read back."""

    brownout_ready = False

    def __init__(self, num_blocks: int, block_size: int, fail_rate: float, rng: random.Random):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv: dict[int, int] = {}
        self.draws: dict[str, int] = {}
        self.fail_rate, self.rng = fail_rate, rng

    def release(self, request_id: str) -> None:
        self.draws.pop(request_id, None)

    def launch(self, sched, rungs=1.0, prev=None):
        bs = self.block_size
        sampled, tokens, plp = {}, [], {}
        for i, s in enumerate(sched.seqs):
            ids = list(s.token_ids)
            if sched.prev_rows is not None and sched.prev_rows[i] >= 0:
                ids = [prev.tokens[sched.prev_rows[i]]]  # as the real runner: sampled rows
            assert len(s.block_table) * bs >= s.start_pos + len(ids), "block table too short"
            for j, t in enumerate(ids):
                p = s.start_pos + j
                self.kv[s.block_table[p // bs] * bs + p % bs] = t
            context = []
            for p in range(s.start_pos + len(ids)):
                slot = s.block_table[p // bs] * bs + p % bs
                assert slot in self.kv, "read of a slot never written"
                context.append(self.kv[slot])
            if s.prompt_logprob_targets is not None:
                plp[s.request_id] = [(context[s.start_pos + j], t)
                                     for j, t in enumerate(s.prompt_logprob_targets)]
            if s.sample:
                seed = s.sampling.seed
                draw = 0
                if seed is not None:
                    draw = self.draws.get(s.request_id, 0)
                    self.draws[s.request_id] = draw + 1
                tok = _token(context, seed, draw)
                sampled[s.request_id] = tok
                tokens.append(tok)
        return _Pending(tokens, RunnerOutput(sampled=sampled, prompt_logprobs=plp))

    def collect(self, pending):
        if self.rng.random() < self.fail_rate:
            raise RuntimeError("injected collect fault")
        return pending.out


def _reference(prompt, p: SamplingParams, max_len: int, eos) -> tuple[list[int], FinishReason]:
    out: list[int] = []
    while True:
        t = _token(prompt + out, p.seed, len(out) if p.seed is not None else 0)
        out.append(t)
        if (not p.ignore_eos and t in eos) or t in p.stop_token_ids:
            return out, FinishReason.STOP
        if len(out) >= p.max_tokens or len(prompt) + len(out) >= max_len:
            return out, FinishReason.LENGTH


def _check_view(s) -> None:
    v = s.view
    assert v.num_running == len(s.running) and v.num_waiting == len(s.waiting)
    assert v.running_prefill_tokens == sum(_prefill_left(r) for r in s.running)
    assert v.num_prefilling == sum(_prefill_left(r) > 0 for r in s.running)
    assert v.waiting_tokens == sum(r.num_tokens - r.num_computed for r in s.waiting.in_order())
    for r in s.running:
        assert len(s.blocks.table(r.request_id)) * s.blocks.block_size >= r.num_computed
        assert r.num_computed <= r.num_tokens


def _run(path, seed: int, async_scheduling: bool, fail_rate: float) -> None:
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_batched = rng.choice([8, 12, 16, 32, 64])
    llm = LLM(path, device="cpu",
              cache=CacheConfig(block_size=bs, num_blocks=rng.randint(12, 40),
                                enable_prefix_caching=rng.random() < 0.6),
              scheduler=SchedulerConfig(async_scheduling=async_scheduling, max_num_batched_tokens=max_batched,
                                        max_num_seqs=rng.randint(1, 6), policy=rng.choice(["fcfs", "priority"])))
    eng = llm.engine
    eng.runner = KVHashRunner(eng.runner.num_blocks, bs, fail_rate, random.Random(seed))
    per_step = random.Random(seed * 7 + 1)
    if rng.random() < 0.6:
        eng.controller.choose_token_budget = lambda view: per_step.choice([None, 4, 6, 8, 12, max_batched])
    if rng.random() < 0.3:
        eng.controller.running_cap = lambda view: per_step.choice([None, 1, 2, 3])
    max_len, eos = eng.scheduler.max_model_len, set(eng.scheduler.eos_ids)
    shared = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 3 * bs + 3))] for _ in range(4)]
    arrivals = []
    for i in range(rng.randint(3, 12)):
        prompt = rng.choice(shared) if rng.random() < 0.5 else \
            [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 4 * bs))]
        if rng.random() < 0.3:
            prompt = prompt + [rng.randrange(3, VOCAB) for _ in range(rng.randint(0, bs))]
        prompt = prompt[:max_len - 2] or [5]
        kw = dict(max_tokens=rng.randint(1, 30), temperature=0.0, ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.4:
            kw.update(temperature=0.7, seed=rng.randint(0, 99))
        if rng.random() < 0.3:
            kw["stop_token_ids"] = [rng.randrange(3, VOCAB) for _ in range(8)]
        if rng.random() < 0.15:
            kw["prompt_logprobs"] = 1
        arrivals.append((rng.randint(0, 15), f"r{i}", prompt, SamplingParams(**kw), rng.choice([0, 1, 2])))
    aborts: dict[int, list[str]] = {}
    for _, rid, *_ in arrivals:
        if rng.random() < 0.15:
            aborts.setdefault(rng.randint(1, 25), []).append(rid)
    pending = sorted(arrivals, key=lambda a: a[0])
    done, info, ended, step = {}, {}, set(), 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, p, priority = pending.pop(0)
            eng.add_request(rid, prompt, p, priority=priority)
            info[rid] = (prompt, p)
        for rid in aborts.get(step, []):
            if rid in eng.requests:
                eng.abort_request(rid)
                ended.add(rid)
        for o in eng.step():
            prompt, p = info[o.request_id]
            if o.prompt_logprobs is not None:  # [None, (context's last token, target), ...]
                assert [x[1] for x in o.prompt_logprobs[1:]] == prompt[1:]
                assert [x[0] for x in o.prompt_logprobs[1:]] == prompt[:-1]
            if o.finished and o.finish_reason == FinishReason.ERROR:  # a failed collect
                ref = _reference(prompt, p, max_len, eos)[0]
                assert o.output_token_ids == ref[:len(o.output_token_ids)]
                ended.add(o.request_id)
            elif o.finished and o.request_id not in ended:
                done[o.request_id] = (o.output_token_ids, o.finish_reason)
        _check_view(eng.scheduler)
        step += 1
        assert step < 3000, "the engine did not finish its requests"
    assert eng.blocks.num_used == 0
    assert eng.scheduler.view.waiting_by_priority == {}
    for rid, (prompt, p) in info.items():
        if rid not in ended:
            assert done[rid] == _reference(prompt, p, max_len, eos), rid


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("fail_rate", [0.0, 0.05])
def test_outputs_equal_the_reference(tiny_models, monkeypatch, async_scheduling, fail_rate):
    # injected faults are not the engine being broken: no failure count ends the run
    monkeypatch.setattr(llm_engine, "MAX_CONSECUTIVE_STEP_FAILURES", 10 ** 9)
    for seed in SEEDS:
        _run(str(tiny_models["qwen2_moe"]), seed, async_scheduling, fail_rate)
