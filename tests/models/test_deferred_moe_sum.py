"""A MoE layer's unsummed outputs (`SlotOutputs`) reach only the next norm: a decoder layer
that all-reduces its output (tensor or expert parallel) sums them first, and the norm's torch
path (off CUDA) sums them before its add. The kernel sum is replaced here by its torch
reference, so this checks the plumbing on the CPU; the fused kernel has its own test
(tests/kernels/test_norm_rope.py)."""

from __future__ import annotations

import pytest
import torch

from brownout.config import ModelLoadConfig
from brownout.models.context import ForwardContext, SlotOutputs
from brownout.models.layers.moe import SparseMoE
from brownout.runner.loader import load_model


def _reference_sum(y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    T, k = ids.shape
    keep = (ids >= 0).reshape(T, k, 1).to(y.dtype)
    return (torch.nan_to_num(y.reshape(T, k, -1)) * keep).sum(1)


@pytest.fixture
def slots(monkeypatch):
    fm = pytest.importorskip("brownout.kernels.fused_moe")
    monkeypatch.setattr(fm, "moe_sum", lambda y, ids, out=None: _reference_sum(y, ids))
    g = torch.Generator().manual_seed(5)
    T, k, D = 3, 2, 64
    y = torch.randn(T * k, D, generator=g)
    ids = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    y[3] = float("nan")  # an unused assignment's row: never part of the sum
    return SlotOutputs(y, ids), _reference_sum(y, ids)


def test_a_layer_that_reduces_sums_the_slots_first(tiny_models, slots, monkeypatch):
    out_slots, want = slots
    model = load_model(ModelLoadConfig(model=str(tiny_models["qwen3_moe"]), device="cpu",
                                       dtype="float32")).model
    layer = next(layer for layer in model.layers if isinstance(layer.mlp, SparseMoE))
    monkeypatch.setattr(layer.mlp, "forward", lambda h, ctx: (out_slots, None))
    reduced = []
    layer.reduce = lambda t: reduced.append(t) or t
    x = torch.randn(1, 3, 64)
    positions = torch.arange(3).expand(1, 3)
    with torch.inference_mode():
        out, _, _ = layer(x, positions, ForwardContext(defer_moe_sum=True))
    assert len(reduced) == 2  # the attention's partial output, then the MLP's
    assert all(isinstance(t, torch.Tensor) for t in reduced)
    torch.testing.assert_close(reduced[-1], want)
    torch.testing.assert_close(out, want)
    layer.reduce = None  # a single device hands the unsummed outputs on
    with torch.inference_mode():
        out, _, _ = layer(x, positions, ForwardContext(defer_moe_sum=True))
    assert isinstance(out, SlotOutputs)


def test_the_norm_sums_the_slots_before_its_add_off_cuda(tiny_models, slots):
    out_slots, want = slots
    model = load_model(ModelLoadConfig(model=str(tiny_models["qwen3_moe"]), device="cpu",
                                       dtype="float32")).model
    norm = model.layers[1].input_layernorm
    residual = torch.randn(3, 64)
    with torch.inference_mode():
        got, total = norm.add_forward(out_slots, residual)
        ref, ref_total = norm.add_forward(want, residual)
    assert torch.equal(total, ref_total) and torch.equal(got, ref)
