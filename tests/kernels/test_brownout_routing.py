"""Tests of brownout routing (SPEC 1.3) against hand-made cases and a slow reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.kernels.brownout_routing import brownout_route, contiguous_groups, count_touched


def reference_route(ids, weights, tau, group_of, num_experts, valid=None, merge=True):
    """Slow SPEC 1.3, one assignment at a time, on Python lists (merge: step 4)."""
    T, k = len(ids), len(ids[0])
    valid = [True] * T if valid is None else list(valid)
    counts = [0] * num_experts
    for t in range(T):
        for j in range(k):
            if valid[t]:
                counts[ids[t][j]] += 1
    total = sum(counts)
    threshold = float(np.float32(tau)) * total
    order = sorted(range(num_experts), key=lambda e: (-counts[e], e))
    kept, before = set(), 0
    for e in order:
        if before < threshold:
            kept.add(e)
        before += counts[e]
    redirected = {e for e in range(num_experts) if counts[e] > 0 and e not in kept}
    for g in set(group_of):
        members = [e for e in redirected if group_of[e] == g]
        if len(members) == 1:
            redirected.discard(members[0])
    out_ids, out_w = [], []
    for t in range(T):
        row_ids, row_w = [], []
        for j in range(k):
            if not valid[t]:
                row_ids.append(-1), row_w.append(0.0)
                continue
            e = ids[t][j]
            slot = num_experts + group_of[e] if e in redirected else e
            if merge and slot >= num_experts and slot in row_ids:
                row_w[row_ids.index(slot)] += weights[t][j]
                row_ids.append(-1), row_w.append(0.0)
            else:
                row_ids.append(slot), row_w.append(weights[t][j])
        out_ids.append(row_ids), out_w.append(row_w)
    return out_ids, out_w


def _route(ids, weights, tau, group_of, E, valid=None):
    ids_t = torch.tensor(ids, dtype=torch.int32)
    w_t = torch.tensor(weights, dtype=torch.float32)
    g_t = torch.tensor(group_of, dtype=torch.int64)
    v_t = None if valid is None else torch.tensor(valid, dtype=torch.bool)
    out_ids, out_w = brownout_route(ids_t, w_t, torch.tensor(tau, dtype=torch.float32), g_t, E, v_t)
    assert out_ids.dtype == torch.int32 and out_w.dtype == torch.float32
    return out_ids.tolist(), out_w.tolist()


# 8 experts, way 2 -> groups {0,1} {2,3} {4,5} {6,7}; counts: e0:4 e1:3 e2:2 e4:2 e3:1 e5:1 e6:1
IDS = [[0, 1], [0, 1], [0, 2], [0, 4], [1, 2], [4, 3], [5, 6]]
W = [[0.5, 0.25]] * 7
G2 = [0, 0, 1, 1, 2, 2, 3, 3]


def test_tau_one_is_identity():
    ids, w = _route(IDS, W, 1.0, G2, 8)
    assert ids == IDS and w == W


def test_tau_one_bit_identical_on_random_router():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), 4)
    out_ids, out_w = brownout_route(ids, w, torch.tensor(1.0), contiguous_groups(16, 4), 16)
    assert torch.equal(out_ids, ids) and out_ids.dtype == ids.dtype
    assert torch.equal(out_w, w)


def test_tau_zero_redirects_every_non_lone_member():
    ids, _ = _route(IDS, W, 0.0, G2, 8)
    # group 3 has only e6 used: lone member, kept; other groups have two redirected members
    assert ids == [[8, -1], [8, -1], [8, 9], [8, 10], [8, 9], [10, 9], [10, 6]]


def test_keep_set_prefix_and_ties():
    # total 14; tau 0.5 -> threshold 7: e0 (before 0) kept, e1 (before 4) kept, e2 (before 7) not
    ids, w = _route(IDS, W, 0.5, G2, 8)
    # e2, e4 tie at 2: order e2, e4, e3, e5, e6; redirected {2,3,4,5,6}; e6 alone in group 3
    assert ids == [[0, 1], [0, 1], [0, 9], [0, 10], [1, 9], [10, 9], [10, 6]]
    assert w[5] == [0.5, 0.25]


def test_tie_broken_by_lower_id():
    # e1 and e2 both counted twice, e0 and e3 once; threshold 0.25 * 6 = 1.5: only e1 kept
    ids = [[1, 2], [2, 1], [0, 3]]
    out, _ = _route(ids, [[0.5, 0.5]] * 3, 0.25, [0, 0, 1, 1], 4)
    # redirected {0, 2, 3}: group 0 has only e0 -> kept, group 1 has e2 and e3
    assert out == [[1, 5], [5, 1], [0, 5]]


def test_merge_sums_weight_on_first_position():
    ids = [[0, 1, 2, 3]]
    out_ids, out_w = _route(ids, [[0.4, 0.3, 0.2, 0.1]], 0.3, [0, 0, 0, 0], 4)
    # threshold 1.2: e0 (before 0), e1 (before 1) kept; e2, e3 redirected to slot 4 and merged
    assert out_ids == [[0, 1, 4, -1]]
    assert out_w[0][2] == pytest.approx(0.3) and out_w[0][3] == 0.0


def test_unequal_groups():
    group_of = contiguous_groups(5, 2).tolist()
    assert group_of == [0, 0, 1, 1, 2]
    ids = [[0, 1], [2, 3], [4, 0], [1, 2]]
    out, _ = _route(ids, [[0.6, 0.4]] * 4, 0.0, group_of, 5)
    # e4 is the only member of group 2: kept
    assert out == [[5, -1], [6, -1], [4, 5], [5, 6]]


def test_padding_not_counted_and_skipped():
    ids = [[0, 1], [0, 1], [2, 3], [2, 3]]
    valid = [True, True, False, False]
    out, w = _route(ids, [[0.5, 0.5]] * 4, 0.5, [0, 0, 1, 1], 4, valid)
    assert out[2:] == [[-1, -1], [-1, -1]] and w[2:] == [[0.0, 0.0], [0.0, 0.0]]
    # only e0, e1 counted (2 each): threshold 2 keeps e0 alone; e1 is a lone member -> kept
    assert out[:2] == [[0, 1], [0, 1]]


def test_count_touched():
    ids = torch.tensor([[0, 5, -1], [5, 2, -1]])
    assert count_touched(ids, 8).item() == 3
    assert count_touched(torch.full((3, 2), -1), 4).item() == 0


@st.composite
def router_cases(draw):
    E = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(4, E)))
    T = draw(st.integers(1, 12))
    way = draw(st.integers(1, 5))
    ids = [draw(st.permutations(range(E)))[:k] for _ in range(T)]
    weights = [[draw(st.floats(0.125, 1.0, width=32)) for _ in range(k)] for _ in range(T)]
    tau = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0, width=32))
    valid = draw(st.none() | st.lists(st.booleans(), min_size=T, max_size=T))
    shuffle = draw(st.booleans())  # a non-contiguous grouping with the same sizes
    group_of = contiguous_groups(E, way).tolist()
    if shuffle:
        group_of = draw(st.permutations(group_of))
    return ids, weights, tau, list(group_of), E, valid


@settings(max_examples=300, deadline=None)
@given(router_cases())
def test_matches_slow_reference(case):
    ids, weights, tau, group_of, E, valid = case
    got_ids, got_w = _route(ids, weights, tau, group_of, E, valid)
    ref_ids, ref_w = reference_route(ids, weights, tau, group_of, E, valid)
    assert got_ids == ref_ids
    for got_row, ref_row in zip(got_w, ref_w):
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(got_row, ref_row))


def _slow_moe(x, w13, w2, weights, slots):
    """Assignment by assignment: out[t] += w * expert_slot(x[t])."""
    inter = w2.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(len(slots[t])):
            h = w13[slots[t][j]] @ x[t]
            y = w2[slots[t][j]] @ (torch.nn.functional.silu(h[:inter]) * h[inter:])
            out[t] += weights[t][j] * y
    return out


@pytest.mark.parametrize("tau", [1.0, 0.7, 0.3, 0.0])
def test_moe_output_matches_assignment_by_assignment(tau):
    moe_ref = pytest.importorskip("brownout.kernels.moe_ref")
    gen = torch.Generator().manual_seed(1)
    T, D, inter, E, k, way = 24, 16, 8, 10, 3, 4
    G = math.ceil(E / way)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E + G, 2 * inter, D, generator=gen, dtype=torch.float64) / 4
    w2 = torch.randn(E + G, D, inter, generator=gen, dtype=torch.float64) / 4
    logits = torch.randn(T, E, generator=gen) * 2
    weights, ids = torch.topk(torch.softmax(logits, -1), k)
    group_of = contiguous_groups(E, way)
    new_ids, new_w = brownout_route(ids, weights, torch.tensor(tau), group_of, E)
    got = moe_ref.moe_experts_ref(x, w13, w2, new_w.double(), new_ids)
    # the reference redirects without merging duplicates: merging must not change the result
    slots, _ = reference_route(ids.tolist(), weights.tolist(), tau, group_of.tolist(), E,
                               merge=False)
    want = _slow_moe(x, w13, w2, weights.double().tolist(), slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # moe_ref accumulates in fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_under_cuda_graph():
    dev = torch.device("cuda")
    T, E, k = 64, 16, 4
    gen = torch.Generator(device=dev).manual_seed(0)
    ids_in = torch.zeros(T, k, dtype=torch.int32, device=dev)
    w_in = torch.zeros(T, k, dtype=torch.float32, device=dev)
    tau = torch.ones((), dtype=torch.float32, device=dev)
    valid = torch.ones(T, dtype=torch.bool, device=dev)
    group_of = contiguous_groups(E, 4, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        brownout_route(ids_in, w_in, tau, group_of, E, valid)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_ids, out_w = brownout_route(ids_in, w_in, tau, group_of, E, valid)
    for t in (1.0, 0.5, 0.0):
        w, ids = torch.topk(torch.softmax(torch.randn(T, E, device=dev, generator=gen), -1), k)
        ids_in.copy_(ids), w_in.copy_(w), tau.fill_(t)
        valid[-5:] = False
        graph.replay()
        want_ids, want_w = brownout_route(ids_in, w_in, tau, group_of, E, valid)
        assert torch.equal(out_ids, want_ids) and torch.equal(out_w, want_w)
