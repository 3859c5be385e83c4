"""The router GEMM and its top-k in one launch (`router_topk`) against the two launches it
replaces.

The kernel rounds its float32 logits once to x's dtype and routes from exactly those values,
so its ids equal `select_experts_triton` on the logits it returns and its weights match to
1e-6. The logits match `F.linear` in float32 rounded to the dtype, to that dtype's rounding
(the sum runs in another order, so a few values round the other way); rows whose logits
round alike (bf16), or whose top k+1 logits are well apart (float32), route exactly as
`select_experts_triton(F.linear(x, w))` does. Split-K runs with its arrival counter, so it
must be back at zero after every call. Without CUDA the kernel runs under triton's CPU
interpreter; the shapes stay small and the compiled variants few.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brownout.kernels import routing

from triton_interpret import CUDA, DEVICE, engine_tokens_with_switch, import_kernels, rerun_in_fresh_process

rt = import_kernels("brownout.kernels.routing_triton")

needs_kernels = pytest.mark.skipif(rt is None, reason="run by test_cpu_suite_in_fresh_process")
# the 16-row tile's padding rows compute exp(-inf - -inf) under the interpreter's numpy; every
# store masks them out
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

D = 192  # hidden size: not a multiple of the 128-column step, and some splits get no columns
SEPARATION = 1e-3  # float32 rows whose top k+1 logits are this far apart route alike in any sum order


@pytest.mark.skipif(rt is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _case(T, N, dtype, seed):
    """x [T, D] and a router weight [N, D] whose logits spread like a router's (std ~2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    w = (2.0 / D ** 0.5 * torch.randn(N, D, generator=g)).to(dtype).to(DEVICE)
    return x, w


def _k(v):
    return None if v is None else torch.tensor(v, dtype=torch.int32, device=DEVICE)


def _separated(logits, E, k):
    """Rows whose top k+1 logits among the first E are SEPARATION apart."""
    top = logits[:, :E].float().topk(min(k + 1, E), dim=1).values
    return (top[:, :-1] - top[:, 1:] > SEPARATION).all(1)  # all rows when k = E (no gap to check)


def _check(x, w, k, renorm, active=None, *, E=None, shared=None, valid=None, split=None):
    """router_topk against the two launches; returns its (weights, ids, logits)."""
    with torch.inference_mode():
        out_w, ids, lg = rt.router_topk(x, w, k, renorm, _k(active), num_experts=E, shared=shared,
                                        valid=valid, split_k=split)
        ref_lg = F.linear(x.float(), w.float()).to(x.dtype)  # the GEMM: float32 sum, one rounding
        ref_w, ref_ids = rt.select_experts_triton(lg, k, renorm, _k(active), num_experts=E, shared=shared,
                                                  valid=valid)
        two_w, two_ids = rt.select_experts_triton(ref_lg, k, renorm, _k(active), num_experts=E,
                                                  shared=shared, valid=valid)
    cols = k + (shared.count if shared is not None else 0)
    assert out_w.dtype == torch.float32 and ids.dtype == torch.int32 and out_w.shape == ids.shape == (x.shape[0], cols)
    assert lg.dtype == x.dtype and lg.shape == (x.shape[0], w.shape[0])
    if x.dtype == torch.bfloat16:
        torch.testing.assert_close(lg.float(), ref_lg.float(), rtol=1.6e-2, atol=1e-2)
    else:
        torch.testing.assert_close(lg, ref_lg, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_ids), (ids, ref_ids)
    torch.testing.assert_close(out_w, ref_w, rtol=0, atol=1e-6)
    E_ = w.shape[0] if E is None else E
    if x.dtype == torch.bfloat16:
        alike = (lg == ref_lg).all(1)
        assert alike.float().mean() >= 0.5, "most rows round as F.linear's"
    else:
        alike = _separated(ref_lg, E_, k)
    assert torch.equal(ids[alike], two_ids[alike])
    torch.testing.assert_close(out_w[alike], two_w[alike], rtol=0, atol=1e-6)
    assert int(rt._router_scratch(x.device)[1].abs().sum()) == 0  # the counter is back at zero
    return out_w, ids, lg


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("E", [8, 60, 128])
def test_matches_the_two_launches(E, dtype):
    """T in {1, 2, 5, 16} against k in {1, 2, 4, 8}, each pair at one split count (1 to 4,
    3 included), renormalised or not, shed to k - 1 or not."""
    for i, T in enumerate((1, 2, 5, 16)):
        x, w = _case(T, E, dtype, seed=100 * E + T)
        for j, k in enumerate((1, 2, 4, 8)):
            split = (1, 2, 4, 3)[(i + j) % 4]
            renorm = (i + j) % 2 == 0
            active = k - 1 if k > 1 and j % 2 else None
            out_w, ids, _ = _check(x, w, k, renorm, active, split=split)
            if active is not None:
                assert (ids[:, active:] == -1).all() and (out_w[:, active:] == 0).all()
                assert (ids[:, :active] >= 0).all()
            if renorm:
                torch.testing.assert_close(out_w.sum(-1).cpu(), torch.ones(T), rtol=0, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("gated", [True, False])
def test_shared_columns_and_padding_rows(gated, dtype):
    """A folded shared expert's columns (the gate's logit is the weight's row E), shedding
    and renormalisation of the routed columns only, padding rows id -1 everywhere; against
    `route_experts`' torch path too."""
    E = 60
    for T, k, n_shared, renorm, active, split in [(5, 4, 4, False, None, 2), (16, 2, 2, True, 1, 4)]:
        x, w = _case(T, E + int(gated), dtype, seed=T + k + int(gated))
        valid = torch.arange(T, device=DEVICE) < T - 2
        shared = routing.SharedSlots(first=E + 30, count=n_shared, gated=gated)
        out_w, ids, lg = _check(x, w, k, renorm, active, E=E, shared=shared, valid=valid, split=split)
        ref_w, ref_ids = routing.route_experts(lg.cpu(), k, renorm, None if active is None else torch.tensor(active),
                                               num_experts=E, shared=shared, valid=valid.cpu())
        ok = valid.cpu()
        assert torch.equal(ids.cpu()[ok], ref_ids[ok]) and (ids.cpu()[~ok] == -1).all()
        torch.testing.assert_close(out_w.cpu()[ok], ref_w[ok], rtol=0, atol=1e-6)
        sh = ids.cpu()[ok][:, k:]
        assert (sh == torch.arange(E + 30, E + 30 + n_shared, dtype=torch.int32)).all()
        if gated:
            gate = torch.sigmoid(lg[:, E].float()).cpu()
            torch.testing.assert_close(out_w.cpu()[:, k:], gate[:, None].expand(T, n_shared), rtol=0, atol=1e-6)
        else:
            assert (out_w.cpu()[:, k:] == 1.0).all()


@needs_kernels
def test_widest_router_and_default_split():
    """All ROUTER_MAX_COLUMNS columns (255 experts and the shared gate) at ROUTER_MAX_ROWS rows,
    with the split the kernel picks itself."""
    E = rt.ROUTER_MAX_COLUMNS - 1
    x, w = _case(rt.ROUTER_MAX_ROWS, E + 1, torch.bfloat16, seed=9)
    _check(x, w, 8, True, E=E, shared=routing.SharedSlots(first=E, count=1, gated=True))


@needs_kernels
def test_two_calls_give_the_same_results():
    """The arrival counter is reset by each launch; k' is read at run time."""
    x, w = _case(5, 60, torch.bfloat16, seed=3)
    active = _k(4)
    with torch.inference_mode():
        first = rt.router_topk(x, w, 4, False, active, split_k=4)
        again = rt.router_topk(x, w, 4, False, active, split_k=4)
        active.fill_(1)
        shed = rt.router_topk(x, w, 4, False, active, split_k=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.equal(shed[1][:, 0], first[1][:, 0]) and (shed[1][:, 1:] == -1).all()
    assert int(rt._router_scratch(x.device)[1].abs().sum()) == 0


@needs_kernels
def test_usable_only_where_the_router_fits_one_tile():
    x, w = _case(rt.ROUTER_MAX_ROWS, 61, torch.bfloat16, seed=0)
    with torch.inference_mode():
        assert rt.router_topk_usable(x, w, 4, 4)
        assert rt.router_topk_usable(x[:1], w, 8)
        assert not rt.router_topk_usable(torch.cat([x, x[:1]]), w, 4)  # too many rows
        assert not rt.router_topk_usable(x[:0], w, 4)  # no rows
        wide = torch.zeros(rt.ROUTER_MAX_COLUMNS + 1, D, dtype=x.dtype, device=DEVICE)
        assert not rt.router_topk_usable(x, wide, 4)  # more logit columns than one tile
        assert not rt.router_topk_usable(x, w.float(), 4)  # dtypes differ
        assert not rt.router_topk_usable(x, w[:, :-1], 4)  # hidden sizes differ
        assert not rt.router_topk_usable(x.t().contiguous().t(), w, 4)  # strided along D
        assert not rt.router_topk_usable(x, w, 9)  # k beyond MAX_TOP_K
        assert not rt.router_topk_usable(x, w[:4], 8)  # k beyond E
        assert not rt.router_topk_usable(x, w, 8, 9)  # more output columns than MAX_COLUMNS
        assert not rt.router_topk_usable(x, w, 4, num_experts=62)  # E beyond the weight's rows
        assert rt.router_topk_usable(x, w, 4, 1, num_experts=60, gated=True)  # the gate's row is row 60
        assert not rt.router_topk_usable(x, w, 4, 1, num_experts=61, gated=True)  # no row for the gate
        with pytest.raises(ValueError):
            rt.router_topk(x, w, 4, False, split_k=rt.ROUTER_MAX_SPLIT + 1)
        with pytest.raises(ValueError):  # a gated shared expert needs the gate's row after E
            rt.router_topk(x, w, 4, False, num_experts=61, shared=routing.SharedSlots(61, 1, True))
    with torch.enable_grad():
        assert not rt.router_topk_usable(x, w, 4)  # autograd: the kernel records no graph


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or rt is None, reason="needs a CUDA GPU and triton")
def test_cuda_graph_replays_match_eager_calls():
    """Two launches per graph (the counter reset between them), replayed with k' changed."""
    x, w = _case(8, 61, torch.bfloat16, seed=5)
    shared = routing.SharedSlots(first=90, count=4, gated=True)
    active = _k(4)
    with torch.inference_mode():
        call = lambda: rt.router_topk(x, w, 4, False, active, num_experts=60, shared=shared)  # noqa: E731
        call()  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [call(), call()]
        for kp in (4, 2, 4):
            active.fill_(kp)
            graph.replay()
            torch.cuda.synchronize()
            ref = call()
            for out in outs:
                for a, b in zip(out, ref):
                    assert torch.equal(a, b)
    assert int(rt._router_scratch(x.device)[1].abs().sum()) == 0


@needs_kernels
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])  # with and without a shared expert
def test_engine_greedy_tokens_unchanged_with_the_fused_router(tiny_models, family, monkeypatch):
    """The engine on the Triton path (interpreted here) gives the same greedy tokens with the
    router GEMM and its top-k in one launch as in two (BROWNOUT_ROUTER_TOPK=0), and takes
    the fused launch only for steps of up to ROUTER_MAX_ROWS tokens, only when on."""
    tokens, calls = engine_tokens_with_switch(tiny_models[family], monkeypatch, (routing, "ROUTER_TOPK"),
                                              (rt, "router_topk"))
    assert tokens[True] == tokens[False]
    assert set(calls) == {3}  # the decode steps; the 19-token prefill keeps two launches

