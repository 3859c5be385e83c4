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
