"""Tensor and expert parallelism over 2 CPU processes (gloo) give one process's greedy tokens.

Each parallel engine (family x expert parallel on/off) is started once per module; tau is
switched between tests by swapping the engine's controller for a fixed one. Brownout counts
over each step's batch, so both sides schedule alike: chunked prefill, small KV blocks.
"""

import pytest
import torch

from brownout.config import CacheConfig, ModelLoadConfig, SchedulerConfig, SLOConfig
from brownout.control import make_controller
from brownout.engine.llm import LLM
from brownout.types import SamplingParams, ValidationError

FAMILIES = ["qwen2_moe", "mixtral", "qwen3_moe"]
TAUS = [0.5, 0.0]  # tau = 1 skips routing: the plain model (test_plain_tokens...)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
# No prefix caching: the engines compared here have served different requests before, and
# reused blocks change what a step computes, hence brownout's routing.
ENGINE = dict(device="cpu", cache=CacheConfig(block_size=4, enable_prefix_caching=False),
              scheduler=SchedulerConfig(max_num_batched_tokens=16))


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 23, 37, 2)]


def _set_tau(llm: LLM, tau: float) -> None:
    llm.engine.controller = make_controller(SLOConfig(policy="fixed"), fixed_tau=tau)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(_prompts(), GREEDY)]


class _Reference(dict):
    """One process's tokens, computed on first use per family: plain (no united experts),
    and with brownout at each tau (average:2 united experts)."""

    def __init__(self, models):
        super().__init__()
        self.models = models

    def __missing__(self, key):
        fam = key[0]
        path = str(self.models[fam])
        self[fam, "plain"] = _tokens(LLM(path, **ENGINE))
        llm = LLM(path, united_experts="average:2", **ENGINE)
        for tau in TAUS:
            _set_tau(llm, tau)
            self[fam, tau] = _tokens(llm)
        return self[key]


@pytest.fixture(scope="module")
def reference(tiny_models):
    return _Reference(tiny_models)


@pytest.fixture(scope="module", params=[(f, ep) for f in FAMILIES for ep in (False, True)],
                ids=lambda p: f"{p[0]}-{'ep' if p[1] else 'tp'}")
def parallel_llm(request, tiny_models):
    fam, ep = request.param
    llm = LLM(str(tiny_models[fam]), united_experts="average:2", tensor_parallel_size=2,
              enable_expert_parallel=ep, **ENGINE)
    yield fam, llm
    workers = llm.engine.workers
    llm.close()
    llm.close()  # idempotent
    assert [p.returncode for p in workers.procs] == [0]


def test_plain_tokens_equal_one_process(parallel_llm, reference):
    fam, llm = parallel_llm
    _set_tau(llm, 1.0)  # routing skipped at tau = 1: the plain model
    assert _tokens(llm) == reference[fam, "plain"]
    assert llm.engine.last_step_stats.tau == 1.0


@pytest.mark.parametrize("tau", TAUS)
def test_brownout_tokens_equal_one_process(parallel_llm, reference, tau):
    fam, llm = parallel_llm
    _set_tau(llm, tau)
    assert _tokens(llm) == reference[fam, tau]
    assert llm.engine.last_step_stats.tau == tau


def test_prompt_logprobs_match_one_process(parallel_llm, tiny_models):
    fam, llm = parallel_llm
    _set_tau(llm, 1.0)
    prompt = list(range(10, 30))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    got = llm.generate([prompt], params)[0].prompt_logprobs[1:]
    ref = LLM(str(tiny_models[fam]), **ENGINE).generate([prompt], params)[0].prompt_logprobs[1:]
    assert torch.allclose(torch.tensor([lp.logprob for lp in got]),
                          torch.tensor([lp.logprob for lp in ref]), atol=1e-4)


def test_parallel_config_validation():
    with pytest.raises(ValidationError) as e:
        ModelLoadConfig(model="m", tensor_parallel_size=0)
    assert e.value.field == "tensor_parallel_size"
    with pytest.raises(ValidationError) as e:
        ModelLoadConfig(model="m", tensor_parallel_size=2.0)
    assert e.value.field == "tensor_parallel_size"
    with pytest.raises(ValidationError) as e:
        ModelLoadConfig(model="m", enable_expert_parallel="yes")
    assert e.value.field == "enable_expert_parallel"


def test_unsplittable_model_fails_before_starting_processes(tiny_models):
    import torch.distributed as dist

    before = dist.is_initialized()
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 must divide the number of attention heads"):
        LLM(str(tiny_models["qwen2_moe"]), device="cpu", tensor_parallel_size=3)
    assert dist.is_initialized() == before  # no process group joined, no worker started
