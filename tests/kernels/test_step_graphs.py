"""Padded step buffers of the CUDA-graph runner give the unpadded step's results.

`StepGraphs(graphed=False)` runs the forward on the same padded buffers a graph replay
reads (padding rows, the padding sequence of mixed steps, empty query ranges past it), each
step reaching its buffers through the dispatcher as in serving, so on a CPU, with the
Triton kernels interpreted, this checks everything but the capture:
hidden states of the real rows, KV-cache contents (padding writes nothing) and the
distinct-slot counts (padding touches no expert), plain and brownout-routed. On a GPU
the same comparison runs against captured graphs.
"""

from __future__ import annotations

import pytest
import torch

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process

pa = import_kernels("brownout.kernels.paged_attention")
fm = import_kernels("brownout.kernels.fused_moe")
needs_kernels = pytest.mark.skipif(pa is None or fm is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(pa is not None and fm is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _setup(tiny_models, family, united):
    from brownout.config import CacheConfig, ModelLoadConfig
    from brownout.runner.build import install_united
    from brownout.runner.loader import load_model
    from brownout.runner.model_runner import ModelRunner

    loaded = load_model(ModelLoadConfig(model=str(tiny_models[family]), device=DEVICE, dtype="float32",
                                   extra_expert_slots=4))
    if united:
        install_united(loaded, united)
    runner = ModelRunner(loaded, CacheConfig(num_blocks=64, block_size=16), max_batch=8,
                         max_model_len=256, enforce_eager=True)
    return loaded, runner


def _sched(vocab: int, seed: int):
    """A mixed step: a fresh prefill, a decode over 37 cached tokens, a middle chunk."""
    from brownout.types import SamplingParams, ScheduledSeq, SchedulerOutput

    g = torch.Generator().manual_seed(seed)
    p = SamplingParams(max_tokens=4)

    def seq(rid, n, start, table):
        return ScheduledSeq(request_id=rid, token_ids=torch.randint(0, vocab, (n,), generator=g).tolist(),
                            start_pos=start, block_table=table, sample=True, sampling=p, output_len=0)

    seqs = [seq("a", 20, 0, [5, 9]), seq("b", 1, 37, [1, 2, 3]), seq("c", 7, 9, [11])]
    return SchedulerOutput(seqs=seqs, num_prefill_tokens=27, num_decode_tokens=1)


def _fill_cache(runner, seed):
    g = torch.Generator().manual_seed(seed)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))


def _eager(runner, sched, tau, shed=False):
    from brownout.models.context import ForwardContext

    ids, pos, meta = runner._prepare(sched)
    runner.tau.fill_(tau)
    ctx = ForwardContext(attn=meta, kv_caches=runner.kv_caches, tau=runner.tau if tau < 1 else None,
                         top_k=runner.top_k if shed else None, use_kernels=True)
    hidden, touched = runner.model(ids, pos, ctx)
    return hidden, touched, [t.clone() for kv in runner.kv_caches for t in kv]


def _padded(runner, sched, tau, graphed, kind, shed=False):
    from brownout.runner.cuda_graphs import StepGraphs

    graphs = StepGraphs(runner.model, runner.kv_caches, runner.tau, 8, 16, runner.brownout_ready,
                        max_step_tokens=64, block_size=16, graphed=graphed, top_k=runner.top_k)
    graphs.capture()
    # larger steps first, so every buffer holds another step's values (stale rows must not leak)
    for decoy in (_decoy_sched(runner.model.spec.vocab_size), _decoy_decode(runner.model.spec.vocab_size)):
        _run(runner, graphs, decoy, tau, shed=shed)
    _fill_cache(runner, 1)
    hidden, touched = _run(runner, graphs, sched, tau, kind, shed=shed)
    return hidden, touched, [t.clone() for kv in runner.kv_caches for t in kv]


def _run(runner, graphs, sched, tau, kind=None, shed=False):
    from brownout.runner.cuda_graphs import StepDescriptor

    runner.tau.fill_(tau)
    key = graphs.dispatch(StepDescriptor.of(sched, routed=tau < 1, shed=shed))
    assert key is not None and kind in (None, key.kind)
    assert key.routed == ((tau < 1 or shed) and runner.brownout_ready)
    return graphs.run(key, runner._host_step(sched))


def _decoy_sched(vocab):
    from brownout.types import SamplingParams, ScheduledSeq, SchedulerOutput

    p = SamplingParams(max_tokens=4)
    seqs = [ScheduledSeq(request_id=f"d{i}", token_ids=[(7 * i + j) % vocab for j in range(n)], start_pos=0,
                         block_table=tb, sample=True, sampling=p, output_len=0)
            for i, (n, tb) in enumerate([(45, [20, 21, 22]), (3, [30]), (8, [31]), (2, [32]), (1, [33])])]
    return SchedulerOutput(seqs=seqs, num_prefill_tokens=59, num_decode_tokens=0)


def _decoy_decode(vocab):
    from brownout.types import SamplingParams, ScheduledSeq, SchedulerOutput

    p = SamplingParams(max_tokens=4)
    seqs = [ScheduledSeq(request_id=f"e{i}", token_ids=[i % vocab], start_pos=40 + i, block_table=[40, 41, 42, 43],
                         sample=True, sampling=p, output_len=1) for i in range(7)]
    return SchedulerOutput(seqs=seqs, num_prefill_tokens=0, num_decode_tokens=7)


def _decode_sched(vocab):
    from brownout.types import SamplingParams, ScheduledSeq, SchedulerOutput

    p = SamplingParams(max_tokens=4)
    seqs = [ScheduledSeq(request_id=r, token_ids=[t % vocab], start_pos=s, block_table=tb, sample=True,
                         sampling=p, output_len=1)
            for r, t, s, tb in (("a", 7, 20, [5, 9]), ("b", 50, 37, [1, 2, 3]), ("c", 3, 15, [11]))]
    return SchedulerOutput(seqs=seqs, num_prefill_tokens=0, num_decode_tokens=3)


@needs_kernels
@pytest.mark.parametrize("family,united,tau", [("qwen2_moe", None, 1.0), ("qwen2_moe", "average:2", 0.5),
                                               ("qwen3_moe", "average:4", 0.0), ("mixtral", None, 1.0)])
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_padded_step_equals_unpadded(tiny_models, family, united, tau, kind):
    loaded, runner = _setup(tiny_models, family, united)
    vocab = loaded.spec.vocab_size
    sched = _sched(vocab, seed=3) if kind == "mixed" else _decode_sched(vocab)
    with torch.inference_mode():
        _fill_cache(runner, 1)
        want, want_touched, want_kv = _eager(runner, sched, tau)
        _fill_cache(runner, 1)
        got, got_touched, got_kv = _padded(runner, sched, tau, graphed=CUDA, kind=kind)
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got - want).norm() / want.norm()
    assert err < 1e-4, f"padded step differs: rel. err. {err:.2e}"
    assert got_touched.tolist() == want_touched.tolist()
    for a, b in zip(got_kv, want_kv):  # padding rows wrote nothing, real rows the same
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("tau", [1.0, 0.0])
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_padded_shed_step_equals_unpadded(tiny_models, tau, kind):
    """Expert shedding (k' = 1 of 2) in the dimmed graph: the k' read from its device tensor,
    alone (tau 1) and before brownout routing (tau 0), as in the eager step."""
    loaded, runner = _setup(tiny_models, "qwen3_moe", "average:4")
    runner.top_k.fill_(1)
    vocab = loaded.spec.vocab_size
    sched = _sched(vocab, seed=3) if kind == "mixed" else _decode_sched(vocab)
    with torch.inference_mode():
        _fill_cache(runner, 1)
        full, _, _ = _eager(runner, sched, tau)
        _fill_cache(runner, 1)
        want, want_touched, want_kv = _eager(runner, sched, tau, shed=True)
        _fill_cache(runner, 1)
        got, got_touched, got_kv = _padded(runner, sched, tau, graphed=CUDA, kind=kind, shed=True)
    assert (want - full).norm() / full.norm() > 1e-3  # shedding changed the step
    err = (got - want).norm() / want.norm()
    assert err < 1e-4, f"padded shed step differs: rel. err. {err:.2e}"
    assert got_touched.tolist() == want_touched.tolist()
    for a, b in zip(got_kv, want_kv):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@needs_kernels
def test_mixed_bucket_choice_and_limits(tiny_models):
    from brownout.runner.cuda_graphs import GraphKey, StepDescriptor, StepGraphs, token_bucket_sizes

    assert token_bucket_sizes(2048)[-1] == 2048 and token_bucket_sizes(100) == [16, 32, 64, 100]
    _, runner = _setup(tiny_models, "qwen2_moe", None)
    graphs = StepGraphs(runner.model, runner.kv_caches, runner.tau, 8, 2, False, max_step_tokens=64,
                        block_size=16, graphed=False)

    def mixed(tokens, seqs, width):
        return graphs.dispatch(StepDescriptor(num_tokens=tokens, num_seqs=seqs, table_width=width,
                                              uniform_decode=False, prompt_logprobs=False, routed=False))

    # the padding sequence must fit its block table: 2 blocks of 16 cap the buckets at 32
    assert graphs.dispatcher.token_sizes == [16, 32]
    assert mixed(32, 8, 2) == GraphKey("mixed", 32, False) and mixed(33, 8, 2) is None
    assert mixed(16, 9, 2) is None and mixed(16, 8, 3) is None


@needs_kernels
def test_device_token_ids_replace_the_host_ones(tiny_models):
    """A step planned ahead stages placeholder ids and passes the previous step's sampled
    tokens as a device tensor: the replay reads those, not the placeholders."""
    import dataclasses

    from brownout.runner.cuda_graphs import StepDescriptor, StepGraphs, TokenPatch

    loaded, runner = _setup(tiny_models, "qwen2_moe", None)
    graphs = StepGraphs(runner.model, runner.kv_caches, runner.tau, 8, 16, runner.brownout_ready,
                        max_step_tokens=64, block_size=16, graphed=CUDA, top_k=runner.top_k)
    graphs.capture()
    sched = _decode_sched(loaded.spec.vocab_size)
    blank = dataclasses.replace(sched, seqs=[dataclasses.replace(s, token_ids=[0]) for s in sched.seqs])
    key = graphs.dispatch(StepDescriptor.of(sched, routed=False))
    outs = []
    real = torch.tensor([s.token_ids[0] for s in sched.seqs], device=DEVICE)
    for step, ids in ((sched, None), (blank, None), (blank, TokenPatch(None, real))):
        _fill_cache(runner, 1)
        outs.append(graphs.run(key, runner._host_step(step), ids).hidden.clone())
    assert torch.equal(outs[2], outs[0])
    assert not torch.equal(outs[1], outs[0])  # the placeholders alone give another step
