"""Expert shedding through the Triton path against the torch reference.

Shed assignments (id -1 from `select_experts` with k' < k) go through the Triton brownout
routing and the fused MoE kernel; both must match the torch versions. Without CUDA the
kernels run under triton's CPU interpreter."""

from __future__ import annotations

import pytest
import torch

from brownout.kernels.brownout_routing import brownout_route_torch, contiguous_groups
from brownout.kernels.moe_ref import moe_experts_ref
from brownout.kernels.routing import select_experts

from triton_interpret import DEVICE, import_kernels, rerun_in_fresh_process

bt = import_kernels("brownout.kernels.brownout_routing_triton")
fm = import_kernels("brownout.kernels.fused_moe")

needs_kernels = pytest.mark.skipif(bt is None or fm is None,
                                   reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(bt is not None and fm is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _routed(T, E, k, k_active, renormalize, seed):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return select_experts(logits, k, renormalize, torch.tensor(k_active, dtype=torch.int32,
                                                               device=DEVICE))


@needs_kernels
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("k_active,tau", [(1, 0.0), (2, 0.5), (3, 0.8), (4, 0.3), (2, 1.0)])
def test_triton_routing_of_shed_ids(k_active, tau, fused):
    E, k, T = 16, 4, 40
    w, ids = _routed(T, E, k, k_active, True, seed=k_active)
    group_of = contiguous_groups(E, 4, device=DEVICE)
    valid = (torch.arange(T, device=DEVICE) % 7) != 3
    tau_t = torch.tensor(tau, device=DEVICE)
    got_ids, got_w = bt.brownout_route_triton(ids, w, tau_t, group_of, E, valid, fused=fused)
    ref_ids, ref_w = brownout_route_torch(ids, w, tau_t, group_of, E, valid)
    assert torch.equal(got_ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(got_w.cpu(), ref_w.cpu(), rtol=0, atol=1e-6)
    assert (got_ids[:, k_active:] == -1).all() and (got_w[:, k_active:] == 0).all()


@needs_kernels
@pytest.mark.parametrize("k_active", [1, 2, 4])
def test_fused_moe_of_shed_ids(k_active):
    g = torch.Generator().manual_seed(k_active)
    T, E, k, D, inter = 24, 8, 4, 32, 16
    x = torch.randn(T, D, generator=g).to(DEVICE)
    w13 = (torch.randn(E + 2, 2 * inter, D, generator=g) / D ** 0.5).to(DEVICE)
    w2 = (torch.randn(E + 2, D, inter, generator=g) / inter ** 0.5).to(DEVICE)
    w, ids = _routed(T, E, k, k_active, False, seed=10 + k_active)
    out = fm.fused_moe(x, w13, w2, w, ids)
    ref = moe_experts_ref(x.double(), w13.double(), w2.double(), w, ids)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)
