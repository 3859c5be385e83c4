"""The runner takes a step's rungs (tau, k'): expert shedding on the plain-torch path and
the graph a shedding step replays (the dimmed one; no extra graph)."""

from __future__ import annotations

import pytest
import torch

from brownout.config import CacheConfig, ModelLoadConfig
from brownout.runner.cuda_graphs import DECODE, MIXED, GraphDispatcher, GraphKey, StepDescriptor
from brownout.runner.loader import load_model
from brownout.runner.model_runner import ModelRunner, as_rungs
from brownout.types import Rungs, SamplingParams, ScheduledSeq, SchedulerOutput


def _step(tokens=1, seqs=1, decode=True, routed=False, shed=False):
    return StepDescriptor(num_tokens=tokens, num_seqs=seqs, table_width=1, uniform_decode=decode,
                          prompt_logprobs=False, routed=routed, shed=shed)


def test_a_shedding_step_replays_the_dimmed_graph():
    d = GraphDispatcher(64, 128, True, 2048, 16)
    assert d.dispatch(_step(shed=True)) == GraphKey(DECODE, 1, True)
    assert d.dispatch(_step(tokens=300, seqs=2, decode=False, shed=True)) == GraphKey(MIXED, 384, True)
    assert d.dispatch(_step(routed=True, shed=True)) == GraphKey(DECODE, 1, True)
    assert d.dispatch(_step()) == GraphKey(DECODE, 1, False)


def test_without_united_experts_a_shedding_step_runs_eager():
    d = GraphDispatcher(64, 128, False, 2048, 16)
    assert d.dispatch(_step(shed=True)) is None
    assert d.dispatch(_step(routed=True)) == GraphKey(DECODE, 1, False)
    assert len(d.keys()) == len(GraphDispatcher(64, 128, False, 2048, 16).keys())


def test_bare_tau_is_rungs_at_the_models_k():
    assert as_rungs(0.4) == Rungs(tau=0.4, top_k=None)
    assert as_rungs(Rungs(0.5, 2)) == Rungs(0.5, 2)


@pytest.fixture(scope="module")
def runner(tiny_models):
    loaded = load_model(ModelLoadConfig(model=str(tiny_models["qwen3_moe"]), device="cpu",
                                        dtype="float32"))
    return ModelRunner(loaded, CacheConfig(num_blocks=32, block_size=16), max_batch=8,
                       max_model_len=256, enforce_eager=True)


def _sched():
    p = SamplingParams(max_tokens=1, temperature=0.0)
    tokens = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = ScheduledSeq(request_id="a", token_ids=tokens, start_pos=0, block_table=[0, 1],
                       sample=True, sampling=p, output_len=0)
    return SchedulerOutput(seqs=[seq], num_prefill_tokens=20, num_decode_tokens=0)


def test_runner_sheds_on_request(runner):
    k = runner.model_top_k
    full, _ = runner.forward(_sched(), 1.0)
    same, _ = runner.forward(_sched(), Rungs(top_k=k))
    shed, _ = runner.forward(_sched(), Rungs(top_k=k - 1))
    assert torch.equal(full.hidden, same.hidden)
    assert not torch.allclose(full.hidden, shed.hidden)
    assert runner.execute(_sched(), Rungs(top_k=k - 1)).top_k == k - 1
    assert runner.execute(_sched(), Rungs(top_k=k)).top_k is None
    assert runner.execute(_sched(), Rungs(top_k=0)).top_k == 1  # a token keeps one expert
