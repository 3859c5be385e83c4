"""Expert shedding (k' < k routed experts per token) in the plain-torch path.

Shedding keeps each token's k' highest-weight assignments (id -1, weight 0 for the rest),
renormalised as the family's router does at top-k'; at k' = k it is the plain selection bit
for bit, and it composes with brownout routing (shed first)."""

from __future__ import annotations

import pytest
import torch

from brownout.config import ModelLoadConfig
from brownout.kernels.brownout_routing import brownout_route_torch, contiguous_groups
from brownout.kernels.moe_ref import moe_experts_ref
from brownout.kernels.routing import select_experts
from brownout.models.context import ForwardContext
from brownout.runner.loader import load_model

FAMILIES = ["qwen2_moe", "mixtral", "qwen3_moe"]


def _logits(T=64, E=16, seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


def _k(n: int) -> torch.Tensor:
    return torch.tensor(n, dtype=torch.int32)


@pytest.mark.parametrize("renormalize", [False, True])
def test_full_k_is_bit_identical(renormalize):
    logits = _logits()
    w0, i0 = select_experts(logits, 4, renormalize)
    w1, i1 = select_experts(logits, 4, renormalize, _k(4))
    assert torch.equal(w0, w1) and torch.equal(i0, i1)
    w2, i2 = select_experts(logits, 4, renormalize, _k(9))  # k' > k keeps every assignment
    assert torch.equal(w0, w2) and torch.equal(i0, i2)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k_active", [1, 2, 3])
def test_shedding_equals_the_router_at_top_k_prime(renormalize, k_active):
    logits = _logits(seed=k_active)
    w, ids = select_experts(logits, 4, renormalize, _k(k_active))
    w_ref, ids_ref = select_experts(logits, k_active, renormalize)
    assert torch.equal(ids[:, :k_active], ids_ref)
    assert (ids[:, k_active:] == -1).all() and (w[:, k_active:] == 0).all()
    torch.testing.assert_close(w[:, :k_active], w_ref, rtol=1e-6, atol=1e-7)
    if renormalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))


def test_shed_assignments_skip_the_experts():
    g = torch.Generator().manual_seed(3)
    T, E, D, inter = 32, 8, 16, 8
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * inter, D, generator=g), torch.randn(E, D, inter, generator=g)
    w, ids = select_experts(_logits(T, E, 3), 4, True, _k(2))
    full = moe_experts_ref(x, w13, w2, w, ids)
    torch.testing.assert_close(full, moe_experts_ref(x, w13, w2, w[:, :2], ids[:, :2]))


@pytest.mark.parametrize("tau", [0.0, 0.4, 0.8, 1.0])
def test_brownout_routing_of_shed_ids(tau):
    """Shed ids are neither counted nor merged: routing them equals routing the k' columns."""
    E, k, kp = 16, 4, 2
    group_of = contiguous_groups(E, 4)
    w, ids = select_experts(_logits(48, E, 5), k, True, _k(kp))
    valid = torch.rand(48, generator=torch.Generator().manual_seed(6)) > 0.2
    got_ids, got_w = brownout_route_torch(ids, w, tau, group_of, E, valid)
    ref_ids, ref_w = brownout_route_torch(ids[:, :kp].contiguous(), w[:, :kp].contiguous(), tau,
                                          group_of, E, valid)
    assert torch.equal(got_ids[:, :kp], ref_ids) and torch.equal(got_w[:, :kp], ref_w)
    assert (got_ids[:, kp:] == -1).all() and (got_w[:, kp:] == 0).all()


def _hf(path, top_k):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                num_experts_per_tok=top_k).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_model_shed_to_one_equals_transformers_at_top_one(tiny_models, family):
    """Renormalisation per family: shedding the tiny top-2 models to k' = 1 gives the logits
    transformers computes with num_experts_per_tok = 1 (Qwen2-MoE without norm_topk_prob keeps
    the raw probability; Mixtral and Qwen3-MoE renormalise to 1)."""
    path = tiny_models[family]
    ours = load_model(ModelLoadConfig(model=str(path), device="cpu", dtype="float32")).model
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _hf(path, 1)(ids).logits.float()
        positions = torch.arange(24).expand(2, 24)
        ctx = ForwardContext(top_k=_k(1), count_touched=False)
        got = ours.compute_logits(ours(ids, positions, ctx).hidden)
        full = ours.forward_full(ids)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4, rel
    assert not torch.allclose(got, full)  # k' = 1 is a different model
    with torch.no_grad():
        same = ours.compute_logits(ours(ids, positions, ForwardContext(top_k=_k(2))).hidden)
    assert torch.equal(same, full)
