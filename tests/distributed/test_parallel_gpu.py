"""On 2 GPUs (NCCL, CUDA graphs on): tensor / expert parallel greedy tokens equal one GPU's,
plain and with brownout. The same check, with timings, is benchmarks/bench_parallel.py."""

import os

import pytest
import torch

from brownout.config import CacheConfig, SchedulerConfig, SLOConfig
from brownout.control import make_controller
from brownout.engine.llm import LLM
from brownout.types import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
KW = dict(device="cuda", dtype="float32", united_experts="average:2",
          cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_seqs=4))


def _tokens(llm: LLM, tau: float) -> list[list[int]]:
    llm.engine.controller = make_controller(SLOConfig(policy="fixed"), fixed_tau=tau)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 23, 37, 2)]
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_two_gpus_equal_one(tiny_models, ep):
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    path = str(tiny_models["qwen2_moe"])
    single = LLM(path, **KW)
    ref = {tau: _tokens(single, tau) for tau in (1.0, 0.0)}
    del single
    with LLM(path, tensor_parallel_size=2, enable_expert_parallel=ep, **KW) as llm:
        assert llm.engine.runner.graphs is not None
        for tau in (1.0, 0.0):
            assert _tokens(llm, tau) == ref[tau]
