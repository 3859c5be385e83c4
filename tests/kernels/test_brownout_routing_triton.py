"""Triton brownout routing against the torch version (`brownout_route_torch`).

Ids must match exactly, weights to 1e-6 (merged weights may be summed in another order).
Without CUDA the kernels run under triton's CPU interpreter on a subset; the full grid
(experts {8, 60, 64, 128} x top-k {2, 4, 8} x tokens {1, 7, 64, 300} x way {2, 4, 8} x
tau {0, 0.3, 0.5, 0.8, 1} x valid mask x routing shape) and the CUDA-graph checks run on
a GPU.
"""

from __future__ import annotations


import pytest
import torch

from brownout.kernels import brownout_routing
from brownout.kernels.brownout_routing import brownout_route_torch, contiguous_groups

from triton_interpret import DEVICE, import_kernels, rerun_in_fresh_process


bt = import_kernels("brownout.kernels.brownout_routing_triton")


needs_kernels = pytest.mark.skipif(bt is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(bt is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


TAUS = (0.0, 0.3, 0.5, 0.8, 1.0)
SHAPES = ("skew", "uniform", "ties", "shuffled", "shed")


def make_case(T, E, k, way, shape, seed, with_valid, device=DEVICE):
    """Router output [T, k] (k distinct ids per token), group_of [E], valid [T] or None.

    skew: a few hot experts; uniform: iid logits; ties: round-robin ids, so every count
    ties and tau * total lands exactly on cumulative counts; shuffled: skewed routing with
    a non-contiguous grouping; shed: skewed routing with each token's last columns shed (-1,
    weight 0), as expert shedding leaves them. Groups are contiguous elsewhere (last one
    smaller when way does not divide E)."""
    g = torch.Generator().manual_seed(seed)
    group_of = contiguous_groups(E, way)
    if shape == "ties":
        ids = (torch.arange(T).unsqueeze(1) * k + torch.arange(k)) % E  # [T, k]
        w = torch.rand(T, k, generator=g)
    else:
        logits = torch.randn(T, E, generator=g)  # [T, E]
        if shape in ("skew", "shuffled", "shed"):
            logits = logits + 3.0 * torch.randn(E, generator=g)
        w, ids = torch.topk(torch.softmax(logits, -1), k)
        if shape == "shuffled":
            group_of = group_of[torch.randperm(E, generator=g)]
        if shape == "shed":  # expert shedding: each token's last columns -1 with weight 0
            kept = torch.randint(1, k + 1, (T, 1), generator=g)
            gone = torch.arange(k)[None, :] >= kept
            ids, w = ids.masked_fill(gone, -1), w.masked_fill(gone, 0.0)
    valid = torch.rand(T, generator=g) > 0.3 if with_valid else None
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(ids.to(torch.int32)), to(w.float()), to(group_of), to(valid)


def check(ids, w, tau, group_of, E, valid, fused=None, regs=None):
    """Triton == torch version on the same inputs; returns the torch outputs."""
    ref_ids, ref_w = brownout_route_torch(ids, w, tau, group_of, E, valid)
    out_ids, out_w = bt.brownout_route_triton(ids, w, tau, group_of, E, valid, fused=fused, regs=regs)
    assert out_ids.dtype == ids.dtype and out_w.dtype == w.dtype
    assert torch.equal(out_ids, ref_ids), (out_ids, ref_ids)
    torch.testing.assert_close(out_w, ref_w, atol=1e-6, rtol=0)
    return ref_ids, ref_w


def run_grid(E, k, T, ways, with_valids, seed0=0, regs=None):
    """Every tau and routing shape for the given ways and valid-mask settings."""
    redirected = 0
    for wi, way in enumerate(ways):
        for vi, with_valid in enumerate(with_valids):
            for si, shape in enumerate(SHAPES):
                case = make_case(T, E, k, way, shape, seed0 + 100 * wi + 10 * vi + si, with_valid)
                for tau in TAUS:
                    tau_t = torch.tensor(tau, dtype=torch.float32, device=DEVICE)
                    ref_ids, _ = check(*case[:2], tau_t, case[2], E, case[3], regs=regs)
                    redirected += int((ref_ids >= E).sum())
    return redirected


# ----------------------------------------------------------------------------- CPU subset

@needs_kernels
@pytest.mark.parametrize("E,k,T,way,with_valid", [
    (8, 2, 7, 2, False), (60, 4, 64, 8, True), (64, 8, 300, 4, True), (128, 8, 1, 8, False),
    (8, 8, 64, 4, True),
])
def test_small_grid(E, k, T, way, with_valid):
    redirected = run_grid(E, k, T, (way,), (with_valid,), seed0=E + k + T)
    assert T == 1 or redirected > 0  # the cases exercise the remap, not only identity


@needs_kernels
@pytest.mark.parametrize("regs", [True, False])
@pytest.mark.parametrize("E,k,T,way", [(60, 4, 64, 4), (8, 8, 33, 2), (128, 2, 5, 8)])
def test_register_kernel_and_plan_kernel_match_torch(E, k, T, way, regs):
    """Decode-sized steps route in the register kernel by default; the plan kernel, which
    takes the larger steps, gives the same outputs on them."""
    assert bt.regs_route_fits(T, k, E)
    redirected = run_grid(E, k, T, (way,), (True,), seed0=E * k + T, regs=regs)
    assert redirected > 0


@needs_kernels
def test_register_kernel_refuses_steps_past_its_tiles():
    assert not bt.regs_route_fits(300, 4, 60) and not bt.regs_route_fits(4, 4, 256)
    ids, w, group_of, valid = make_case(300, 60, 4, 4, "skew", 3, True)
    with pytest.raises(ValueError, match="register kernel"):
        bt.brownout_route_triton(ids, w, 0.5, group_of, 60, valid, regs=True)
    check(ids, w, 0.5, group_of, 60, valid)  # the default takes the plan kernel there


@needs_kernels
@pytest.mark.parametrize("fused", [True, False])
def test_one_and_two_launches(fused):
    ids, w, group_of, valid = make_case(300, 60, 4, 4, "skew", 1, True)
    for tau in (0.0, 0.5, 0.9):
        check(ids, w, torch.tensor(tau, device=DEVICE), group_of, 60, valid, fused=fused)


@needs_kernels
@pytest.mark.parametrize("T,fused,regs", [(300, True, None), (300, False, None), (64, None, True)])
def test_in_place_on_the_first_k_columns_of_a_wider_output(T, fused, regs):
    """`out` = the inputs' own views, the first k columns of a [T, k + 4] routing output (a
    folded shared expert's columns after them): the same result as new tensors, the extra
    columns untouched."""
    E, k, n = 60, 4, 4
    ids, w, group_of, valid = make_case(T, E, k, 4, "skew", 2, True)
    wide_ids = torch.cat([ids, torch.arange(E + 15, E + 15 + n, dtype=ids.dtype, device=DEVICE).expand(T, n)], 1)
    wide_w = torch.cat([w, torch.full((T, n), 0.5, device=DEVICE)], 1)
    tau = torch.tensor(0.4, device=DEVICE)
    ref_ids, ref_w = brownout_route_torch(ids, w, tau, group_of, E, valid)
    views = (wide_ids[:, :k], wide_w[:, :k])
    got = bt.brownout_route_triton(*views, tau, group_of, E, valid, fused=fused, out=views, regs=regs)
    assert got[0].data_ptr() == wide_ids.data_ptr()
    assert torch.equal(wide_ids[:, :k], ref_ids)
    torch.testing.assert_close(wide_w[:, :k], ref_w, atol=1e-6, rtol=0)
    assert (wide_ids[:, k:].cpu() == torch.arange(E + 15, E + 15 + n, dtype=ids.dtype)).all()
    assert (wide_w[:, k:] == 0.5).all()
    assert int((ref_ids >= E).sum()) > 0  # the case redirects


@needs_kernels
def test_tau_one_without_mask_is_bit_identical():
    ids, w, group_of, _ = make_case(64, 60, 4, 4, "skew", 2, False)
    out_ids, out_w = bt.brownout_route_triton(ids, w, torch.tensor(1.0, device=DEVICE),
                                              group_of, 60)
    assert torch.equal(out_ids, ids) and torch.equal(out_w, w)


@needs_kernels
def test_ties_at_the_keep_boundary():
    """8 experts used twice each: tau = 0.5 keeps exactly the 4 lowest ids (0..3)."""
    ids, w, _, _ = make_case(8, 8, 2, 2, "ties", 3, False)
    group_of = contiguous_groups(8, 2, device=DEVICE)
    out_ids, _ = check(ids, w, torch.tensor(0.5, device=DEVICE), group_of, 8, None)
    assert set(out_ids.unique().tolist()) == {-1, 0, 1, 2, 3, 10, 11}


@needs_kernels
def test_tau_forms_and_input_layouts():
    """Python float and float64 tau, int64 ids, non-contiguous ids and weights."""
    ids, w, group_of, valid = make_case(64, 64, 4, 8, "skew", 4, True)
    check(ids, w, 0.3, group_of, 64, valid)
    check(ids, w, torch.tensor(0.3, dtype=torch.float64, device=DEVICE), group_of, 64, valid)
    check(ids.long(), w, 0.5, group_of, 64, valid)
    wide_ids = torch.zeros(64, 8, dtype=torch.int32, device=DEVICE)
    wide_ids[:, ::2] = ids
    check(wide_ids[:, ::2], w.t().contiguous().t(), 0.5, group_of, 64, valid)


@needs_kernels
def test_all_padding_and_empty_step():
    ids, w, group_of, _ = make_case(7, 8, 2, 2, "skew", 5, False)
    none_valid = torch.zeros(7, dtype=torch.bool, device=DEVICE)
    out_ids, out_w = check(ids, w, 0.5, group_of, 8, none_valid)
    assert (out_ids == -1).all() and (out_w == 0).all()
    out_ids, out_w = bt.brownout_route_triton(ids[:0], w[:0], 0.5, group_of, 8)
    assert out_ids.shape == (0, 2) and out_w.shape == (0, 2)


def test_dispatcher_keeps_torch_on_cpu():
    ids, w, group_of, valid = make_case(64, 60, 4, 4, "skew", 6, True, device="cpu")
    a = brownout_routing.brownout_route(ids, w, torch.tensor(0.5), group_of, 60, valid)
    b = brownout_route_torch(ids, w, torch.tensor(0.5), group_of, 60, valid)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_kernels
def test_availability_limits():
    dev = torch.device(DEVICE)
    assert bt.triton_route_available(dev, 128, 8)
    assert not bt.triton_route_available(dev, bt.MAX_EXPERTS + 1, 8)
    assert not bt.triton_route_available(dev, 64, bt.MAX_TOP_K + 1)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("regs", [None, False])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("E", [8, 60, 64, 128])
def test_full_grid(E, k, T, regs):
    redirected = run_grid(E, k, T, (2, 4, 8), (False, True), seed0=1000 * E + 10 * k + T, regs=regs)
    assert T == 1 or redirected > 0


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,T", [(256, 8, 4096), (128, 8, 16384), (60, 4, 2048), (512, 6, 999)])
def test_large_steps(E, k, T):
    ids, w, group_of, valid = make_case(T, E, k, 4, "skew", T, True)
    for tau in (0.0, 0.5, 0.8):
        for fused in (True, False):
            check(ids, w, torch.tensor(tau, device="cuda"), group_of, E, valid, fused=fused)


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda(monkeypatch):
    calls = []
    real = bt.brownout_route_triton
    monkeypatch.setattr(bt, "brownout_route_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, w, group_of, valid = make_case(64, 60, 4, 4, "skew", 7, True)
    a = brownout_routing.brownout_route(ids, w, torch.tensor(0.5, device="cuda"), group_of, 60, valid)
    b = brownout_route_torch(ids, w, torch.tensor(0.5, device="cuda"), group_of, 60, valid)
    assert calls and torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [64, 2048])
def test_cuda_graph_with_device_tau_and_no_sync(T):
    """Captured once; tau changes in its device tensor between replays."""
    ids, w, group_of, valid = make_case(T, 60, 4, 4, "skew", 8, True)
    tau = torch.tensor(1.0, device="cuda")
    bt.brownout_route_triton(ids, w, tau, group_of, 60, valid)  # compile outside capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bt.brownout_route_triton(ids, w, tau, group_of, 60, valid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_ids, out_w = bt.brownout_route_triton(ids, w, tau, group_of, 60, valid)
    for value in (0.0, 0.4, 0.8, 1.0):
        tau.fill_(value)
        out_ids.fill_(-7)
        out_w.fill_(float("nan"))
        graph.replay()
        ref_ids, ref_w = brownout_route_torch(ids, w, tau, group_of, 60, valid)
        assert torch.equal(out_ids, ref_ids)
        torch.testing.assert_close(out_w, ref_w, atol=1e-6, rtol=0)
