"""On a GPU (Triton kernels, CUDA graphs) the engine gives the CPU path's greedy tokens."""

import pytest
import torch

from brownout.config import CacheConfig
from brownout.engine.llm import LLM
from brownout.types import SamplingParams

pytestmark = pytest.mark.gpu
SMALL = CacheConfig(num_blocks=256)  # several engines live in one test process


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe"])
def test_gpu_greedy_matches_cpu(tiny_models, family):
    path = str(tiny_models[family])
    prompts = [[5, 17, 42, 9, 88, 120], list(range(30, 70)), [7]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    cpu = LLM(path, device="cpu").generate(prompts, params)
    gpu_llm = LLM(path, device="cuda", dtype="float32", cache=SMALL)
    assert gpu_llm.engine.runner.use_kernels and gpu_llm.engine.runner.graphs is not None
    gpu = gpu_llm.generate(prompts, params)
    for c, g in zip(cpu, gpu):
        assert c.token_ids == g.token_ids


def test_gpu_cuda_graph_equals_eager(tiny_models):
    path = str(tiny_models["qwen2_moe"])
    prompts = [list(range(3, 3 + n)) for n in (4, 9, 17, 33, 5)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    eager = LLM(path, device="cuda", dtype="float32", enforce_eager=True, cache=SMALL).generate(prompts, params)
    graph = LLM(path, device="cuda", dtype="float32", cache=SMALL).generate(prompts, params)
    assert [e.token_ids for e in eager] == [g.token_ids for g in graph]
    assert torch.cuda.is_available()


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])  # with and without the qkv bias
def test_gpu_qkv_epilogue_keeps_the_greedy_tokens(tiny_models, family, monkeypatch):
    """The QKV projection with rotary and the KV-cache write in its epilogue (one launch,
    captured in the CUDA graphs) gives the greedy tokens of the projection and
    `rope_write_kv` apart (BROWNOUT_QKV_EPILOGUE=0)."""
    from brownout.kernels import skinny_gemm as sk

    path = str(tiny_models[family])
    prompts = [[5, 17, 42, 9, 88, 120], list(range(30, 70)), [7]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    calls = []
    real = sk.qkv_rope_write_kv
    monkeypatch.setattr(sk, "qkv_rope_write_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens = {}
    for on in (False, True):
        monkeypatch.setattr(sk, "QKV_EPILOGUE", on)
        llm = LLM(path, device="cuda", dtype="float32", cache=SMALL)
        assert llm.engine.runner.use_kernels and llm.engine.runner.graphs is not None
        tokens[on] = [c.token_ids for c in llm.generate(prompts, params)]
        assert bool(calls) == on
    assert tokens[True] == tokens[False]


def test_gpu_launch_does_not_wait_for_the_gpu(tiny_models):
    """`launch` queues a whole step (inputs, graph replay, sampling, token copy) without one
    synchronising call, so the engine's host work overlaps it; `collect` gets the tokens."""
    from brownout.types import ScheduledSeq, SchedulerOutput

    llm = LLM(str(tiny_models["qwen2_moe"]), device="cuda", dtype="float32", cache=SMALL,
              united_experts="average:2")  # tau 0 replays the routed graphs
    runner = llm.engine.runner
    assert runner.brownout_ready
    p = SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, top_k=20)
    prefill = ScheduledSeq(request_id="a", token_ids=list(range(3, 40)), start_pos=0, block_table=[7, 8, 9],
                           sample=True, sampling=p, output_len=0)
    decode = ScheduledSeq(request_id="b", token_ids=[11], start_pos=20, block_table=[1, 2], sample=True,
                          sampling=p, output_len=1)
    steps = [SchedulerOutput(seqs=[prefill, decode], num_prefill_tokens=37, num_decode_tokens=1),
             SchedulerOutput(seqs=[decode], num_prefill_tokens=0, num_decode_tokens=1)]
    for sched in steps:
        for tau in (1.0, 0.0):
            runner.execute(sched, tau)  # warm-up outside the check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                pending = runner.launch(sched, tau)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            out = runner.collect(pending)
            assert set(out.sampled) == {s.request_id for s in sched.seqs}


def test_gpu_exempt_tokens_keep_their_experts_inside_a_dimmed_step(tiny_models):
    """On the Triton routing and fused-MoE path too, a request of an exempt class keeps the
    exact model's tokens while the rest of each step is dimmed (such steps run eager)."""
    from brownout.config import BrownoutConfig, EngineConfig, ModelLoadConfig, SLOConfig
    from brownout.engine.llm_engine import LLMEngine

    path = str(tiny_models["qwen2_moe"])
    prompts = {"vip": (list(range(5, 40)), 0), "bulk": (list(range(100, 140)), 1)}

    def run(tau, exempt):
        eng = LLMEngine(EngineConfig(
            load=ModelLoadConfig(model=path, device="cuda", dtype="float32"), cache=SMALL,
            brownout=BrownoutConfig(united_experts="average:4", tau_prefill=tau, tau_decode=tau),
            slo=SLOConfig(policy="fixed", dim_exempt_priority=exempt)))
        assert eng.runner.use_kernels
        for rid, (prompt, priority) in prompts.items():
            eng.add_request(rid, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                            priority=priority)
        tokens = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                tokens[out.request_id] = list(out.output_token_ids)
        return tokens, eng

    exact, _ = run(1.0, None)
    dimmed, eng = run(0.0, 0)
    assert dimmed["vip"] == exact["vip"] and eng.controller.num_exempt_steps > 0


def test_gpu_async_scheduling_gives_the_synchronous_tokens(tiny_models):
    """Decode steps planned ahead read their input tokens from the previous step's samples
    on the device (graph replays included; requests ending at different steps make the row
    gather non-trivial) and give the synchronous loop's tokens; the launch of such a step
    does not wait for the GPU."""
    from brownout.config import SchedulerConfig

    path = str(tiny_models["qwen2_moe"])
    prompts = [list(range(3, 3 + n)) for n in (4, 9, 17, 33, 5)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (16, 3, 9, 16, 1)]
    runs = {}
    for on in (False, True):
        llm = LLM(path, device="cuda", dtype="float32", cache=SMALL,
                  scheduler=SchedulerConfig(async_scheduling=on))
        runner, ahead = llm.engine.runner, []
        launch = runner.launch

        def checked(sched, rungs=1.0, prev=None, launch=launch, ahead=ahead):
            if sched.prev_rows is None:
                return launch(sched, rungs, prev)
            ahead.append(sched.prev_rows)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(sched, rungs, prev)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        runner.launch = checked
        runs[on] = ([c.token_ids for c in llm.generate(prompts, params)], ahead)
    assert runs[True][0] == runs[False][0]
    assert not runs[False][1] and runs[True][1]
    assert any(rows != list(range(len(rows))) for rows in runs[True][1])  # a gather happened



@pytest.mark.parametrize("tau", [1.0, 0.0])
def test_gpu_pdl_gives_the_tokens_without_it(tiny_models, monkeypatch, tau):
    """Kernels launched with programmatic dependent launch (overlapping the previous kernel's
    tail, weights prefetched before the wait) give bit-identical greedy tokens against the
    ordinary launches, in bf16 with graphs, at tau 1 and with brownout routing at tau 0."""
    from brownout.config import BrownoutConfig, EngineConfig, ModelLoadConfig, SLOConfig
    from brownout.engine.llm_engine import LLMEngine
    from brownout.kernels import pdl

    path = str(tiny_models["qwen2_moe"])
    prompts = [list(range(3, 3 + n)) for n in (4, 9, 17, 33, 5)]
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", on)
        eng = LLMEngine(EngineConfig(
            load=ModelLoadConfig(model=path, device="cuda", dtype="bfloat16"), cache=SMALL,
            brownout=BrownoutConfig(united_experts="average:4", tau_prefill=tau, tau_decode=tau),
            slo=SLOConfig(policy="fixed")))
        assert eng.runner.graphs is not None
        assert pdl.active(torch.zeros(1, device="cuda")) == (on and torch.cuda.get_device_capability() >= (9, 0))
        for i, prompt in enumerate(prompts):
            eng.add_request(str(i), prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        tokens = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                tokens[out.request_id] = list(out.output_token_ids)
        runs[on] = tokens
        del eng
        torch.cuda.empty_cache()
    assert runs[True] == runs[False] and len(runs[True]) == len(prompts)
