"""One-launch Triton router top-k (`select_experts_triton`) against `select_experts`.

Ids must match exactly, weights to 1e-6 (exp and sums are rounded in another order).
Random float32 logits have distinct values, so `torch.topk`'s unspecified order of ties
never shows; bf16 logits tie often, so those cases compare ids against the documented
rule (equal logits: lowest expert index first) and weights against `select_experts`,
which tied positions share. Without CUDA the kernel runs under triton's CPU interpreter.
"""

from __future__ import annotations

import pytest
import torch

from brownout.kernels import routing
from brownout.kernels.routing import select_experts

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process

rt = import_kernels("brownout.kernels.routing_triton")

needs_kernels = pytest.mark.skipif(rt is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(rt is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _logits(T, E, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(T, E, generator=g)).to(dtype).to(DEVICE)


def _k(v):
    return None if v is None else torch.tensor(v, dtype=torch.int32, device=DEVICE)


def _check(logits, k, renorm, active):
    ref_w, ref_ids = select_experts(logits, k, renorm, _k(active))
    w, ids = rt.select_experts_triton(logits, k, renorm, _k(active))
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == ref_w.shape
    assert torch.equal(ids.cpu(), ref_ids.cpu()), (ids, ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w.cpu(), rtol=0, atol=1e-6)
    return w, ids


def _tie_rule_reference(logits, k, renorm, active):
    """select_experts with equal values ordered by expert index (a stable sort)."""
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    w, ids = probs.gather(1, order), order.to(torch.int32)
    if active is not None:
        keep = torch.arange(k, device=ids.device) < active
        w, ids = torch.where(keep, w, 0.0), torch.where(keep, ids, -1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


@needs_kernels
@pytest.mark.parametrize("E", [60, 128])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("renorm", [True, False])
def test_matches_select_experts(E, k, renorm):
    for T in (1, 7, 64):
        logits = _logits(T, E, seed=1000 * E + 10 * k + T)
        for active in (None, *range(1, k + 1)):
            w, ids = _check(logits, k, renorm, active)
            if active is not None:
                assert (ids[:, active:] == -1).all() and (w[:, active:] == 0).all()
                assert (ids[:, :active] >= 0).all()
        # the plain selection is sorted descending and, renormalised, sums to one
        w, _ = _check(logits, k, renorm, None)
        assert (w[:, :-1] >= w[:, 1:]).all()
        if renorm:
            torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(T), rtol=0, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("E,k", [(60, 4), (128, 8)])
@pytest.mark.parametrize("renorm", [True, False])
def test_bf16_logits_without_ties(E, k, renorm):
    """Distinct bf16 values (multiples of 1/16 below 8 in magnitude are exact in bf16)."""
    g = torch.Generator().manual_seed(E + k)
    T = 64
    perms = torch.stack([torch.randperm(E, generator=g) for _ in range(T)])  # [T, E]
    logits = ((perms - E // 2).float() / 16).to(torch.bfloat16).to(DEVICE)
    assert all(len(set(r.tolist())) == E for r in logits.float().cpu())
    for active in (None, 1, k - 1, k):
        _check(logits, k, renorm, active)


@needs_kernels
@pytest.mark.parametrize("E,k", [(60, 4), (128, 8)])
@pytest.mark.parametrize("renorm", [True, False])
def test_bf16_random_logits_follow_the_tie_rule(E, k, renorm):
    logits = _logits(64, E, seed=7 * E + k, dtype=torch.bfloat16)
    for active in (None, 2):
        ref_w, _ = select_experts(logits, k, renorm, _k(active))
        tie_w, tie_ids = _tie_rule_reference(logits, k, renorm, active)
        w, ids = rt.select_experts_triton(logits, k, renorm, _k(active))
        assert torch.equal(ids.cpu(), tie_ids.cpu())
        torch.testing.assert_close(w.cpu(), ref_w.cpu(), rtol=0, atol=1e-6)
        torch.testing.assert_close(w.cpu(), tie_w.cpu(), rtol=0, atol=1e-6)


@needs_kernels
def test_ties_go_to_the_lowest_expert_index():
    logits = torch.zeros(2, 60)
    logits[0, [50, 3, 17, 40]] = 2.0  # four-way tie at the top
    logits[1, [59, 0]] = 1.0  # tie at the top, then every other expert ties at 0
    w, ids = rt.select_experts_triton(logits.to(DEVICE), 4, True)
    assert ids.cpu().tolist() == [[3, 17, 40, 50], [0, 59, 1, 2]]
    torch.testing.assert_close(w[0].cpu(), torch.full((4,), 0.25), rtol=0, atol=1e-6)


@needs_kernels
def test_strided_logits_and_active_k_above_k():
    base = _logits(9, 130, seed=3)
    logits = base[::2, 1:61]  # row stride 260, a view
    _check(logits, 4, True, None)
    _check(logits, 4, True, 9)  # k' > k keeps every assignment
    w, ids = rt.select_experts_triton(logits[:0], 4, True)
    assert w.shape == ids.shape == (0, 4)


@needs_kernels
def test_active_k_is_read_at_run_time():
    """The kernel reads k' through its pointer: a changed value changes the next call."""
    logits = _logits(5, 64, seed=11)
    active = _k(4)
    w4, ids4 = rt.select_experts_triton(logits, 4, False, active)
    active.fill_(1)
    w1, ids1 = rt.select_experts_triton(logits, 4, False, active)
    assert (ids4 >= 0).all() and (ids1[:, 1:] == -1).all()
    assert torch.equal(ids1[:, 0], ids4[:, 0]) and torch.equal(w1[:, 0], w4[:, 0])


@needs_kernels
def test_hypothesis_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
    @hypothesis.given(T=st.integers(1, 9), E=st.integers(8, 130), k=st.integers(1, 8),
                      renorm=st.booleans(), seed=st.integers(0, 2 ** 16),
                      data=st.data())
    def prop(T, E, k, renorm, seed, data):
        active = data.draw(st.one_of(st.none(), st.integers(0 if not renorm else 1, k + 1)))
        _check(_logits(T, E, seed), k, renorm, active)

    prop()


def test_dispatch_keeps_the_torch_path_off_cuda():
    """CPU tensors take `select_experts` itself, bit for bit, whatever the environment."""
    logits = torch.randn(6, 60, generator=torch.Generator().manual_seed(0))
    for active in (None, torch.tensor(2)):
        a = routing.route_experts(logits, 4, True, active)
        b = select_experts(logits, 4, True, active)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or rt is None, reason="needs a CUDA GPU and triton")
def test_cuda_graph_replay_reads_active_k():
    logits = _logits(64, 128, seed=5)
    active = _k(8)
    w, ids = rt.select_experts_triton(logits, 8, True, active)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = rt.select_experts_triton(logits, 8, True, active)
    for kp in (8, 3, 1):
        active.fill_(kp)
        graph.replay()
        ref_w, ref_ids = select_experts(logits, 8, True, active)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)
    assert routing.route_experts(logits, 8, True)[1].dtype == torch.int32


def _route_torch(logits, k, renorm, active, E, shared, valid):
    """`route_experts` on CPU copies: its torch path, the kernel's reference."""
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    active_t = None if active is None else torch.tensor(active, dtype=torch.int32)
    return routing.route_experts(logits.cpu(), k, renorm, active_t, num_experts=E, shared=shared,
                                 valid=cpu(valid))


@needs_kernels
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("k,n_shared,renorm,active", [(4, 4, False, None), (2, 2, True, 1),
                                                      (8, 8, False, 5), (4, 1, True, None)])
def test_shared_columns_and_padding_rows(gated, k, n_shared, renorm, active):
    """A folded shared expert's columns follow the routed k (fixed slots, sigmoid of the
    logit after the router's E, never shed or renormalised); padding rows get id -1."""
    E, T = 60, 9
    logits = _logits(T, E + int(gated), seed=k * 31 + n_shared)
    valid = torch.tensor([True] * 6 + [False] * 3, device=DEVICE)
    shared = routing.SharedSlots(first=E + 30, count=n_shared, gated=gated)
    ref_w, ref_ids = _route_torch(logits, k, renorm, active, E, shared, valid)
    w, ids = rt.select_experts_triton(logits, k, renorm, _k(active), num_experts=E, shared=shared,
                                      valid=valid)
    assert w.shape == ids.shape == (T, k + n_shared)
    assert torch.equal(ids.cpu(), ref_ids.cpu()), (ids, ref_ids)
    ok = valid.cpu()
    torch.testing.assert_close(w.cpu()[ok], ref_w.cpu()[ok], rtol=0, atol=1e-6)
    assert (ids.cpu()[~ok] == -1).all()
    sh = ids.cpu()[ok][:, k:]
    assert (sh == torch.arange(E + 30, E + 30 + n_shared, dtype=torch.int32)).all()
    if not gated:
        assert (w.cpu()[ok][:, k:] == 1.0).all()


@needs_kernels
def test_router_columns_beyond_e_are_not_selected():
    """The shared gate's logit (column E) never competes in the top-k, however large."""
    E = 16
    logits = _logits(5, E + 1, seed=3)
    logits[:, E] = 100.0
    w, ids = rt.select_experts_triton(logits, 4, False, num_experts=E,
                                      shared=routing.SharedSlots(first=E, count=2, gated=True))
    assert (ids.cpu()[:, :4] < E).all() and (ids.cpu()[:, :4] >= 0).all()
    ref_w, ref_ids = select_experts(logits[:, :E], 4, False)
    assert torch.equal(ids.cpu()[:, :4], ref_ids.cpu())
