"""Triton fused MoE against a float64 reference.

Without CUDA the kernels run under triton's CPU interpreter on a small grid; the full grid
(experts {8, 60, 64, 128} x top-k {2, 4, 8} x tokens {1, 7, 64, 300}) runs on a GPU.
Every case uses the extra united-expert slots (ids >= E, up to S-1) and some -1 ids, and
poisons the output with NaN before the call.
"""

from __future__ import annotations

import json

import pytest
import torch

from brownout.kernels.brownout_routing import count_touched
from brownout.kernels.moe_ref import moe_experts_ref

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process


fm = import_kernels("brownout.kernels.fused_moe")


needs_kernels = pytest.mark.skipif(fm is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(fm is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def make_case(T, E, k, D, I, dtype, seed, extra=None):
    """Random experts and routing: k distinct routed ids per token, ~30% moved to the extra
    slots, ~15% set to -1, token 0 fully skipped (when T > 1), slot S-1 always used."""
    g = torch.Generator().manual_seed(seed)
    S = E + (extra if extra is not None else max(1, E // 4))
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(S, 2 * I, D, generator=g) / D ** 0.5
    w2 = torch.randn(S, D, I, generator=g) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k]
    united = torch.randint(E, S, (T, k), generator=g)
    ids = torch.where(torch.rand(T, k, generator=g) < 0.3, united, ids)
    ids = torch.where(torch.rand(T, k, generator=g) < 0.15, torch.full_like(ids, -1), ids)
    ids[-1, 0] = S - 1
    if T > 1:
        ids[0] = -1
    weights = torch.rand(T, k, generator=g)
    to = dict(device=DEVICE)
    return (x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
            weights.to(**to), ids.to(dtype=torch.int32, **to))


def reference(x, w13, w2, weights, ids):
    return moe_experts_ref(x.double(), w13.double(), w2.double(), weights, ids)


def poison_allocator():
    """Hand freed NaN-filled memory to the caching allocator so unwritten scratch shows."""
    if CUDA:
        torch.full((64 << 20,), float("nan"), device=DEVICE)


def check(T, E, k, D, I, dtype, seed, config=None, direct=False):
    x, w13, w2, weights, ids = make_case(T, E, k, D, I, dtype, seed)
    poison_allocator()
    out = torch.full((T, D), float("nan"), dtype=dtype, device=DEVICE)
    touched = torch.full((), -7, dtype=torch.int64, device=DEVICE)
    res = fm.fused_moe(x, w13, w2, weights, ids, config=config, out=out, touched_out=touched, direct=direct)
    assert res is out and res.dtype == dtype
    # counted in the align kernel, or in direct mode in the gate/up GEMM
    assert int(touched) == int(count_touched(ids, w13.shape[0]))
    ref = reference(x, w13, w2, weights, ids)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    skipped = (ids < 0).all(dim=1)
    assert (out[skipped] == 0).all()


def slow_reference(x, w13, w2, weights, ids):
    """Token-by-token float64 loop straight from the definition."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                h = w13[e].double() @ x[t].double()
                act = torch.nn.functional.silu(h[:inter]) * h[inter:]
                out[t] += float(weights[t, j]) * (w2[e].double() @ act)
    return out


def test_reference_matches_definition():
    x, w13, w2, weights, ids = (a.cpu() for a in make_case(5, 8, 2, 16, 8, torch.float32, 1))
    torch.testing.assert_close(reference(x, w13, w2, weights, ids),
                               slow_reference(x, w13, w2, weights, ids))


@needs_kernels
@pytest.mark.parametrize("E,k,T,dtype", [
    (8, 2, 1, torch.float32), (8, 2, 7, torch.bfloat16), (60, 4, 64, torch.float32),
    (64, 8, 7, torch.bfloat16), (128, 8, 7, torch.float32),
    (60, 4, 300, torch.float32)])  # 1200 assignments: the align kernel's wide chunks
def test_small_grid(E, k, T, dtype):
    check(T, E, k, 64, 32, dtype, seed=E * 1000 + T)
    if T * k <= fm.DIRECT_MAX_ASSIGN:
        check(T, E, k, 64, 32, dtype, seed=E * 1000 + T, direct=True)


@needs_kernels
def test_ragged_dims_and_config_override():
    # D and I not multiples of the tiles: masked K and N edges; separate down-GEMM tiles
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4,
           "num_stages": 1, "down": {"BLOCK_N": 32, "BLOCK_K": 16}}
    check(9, 8, 2, 48, 24, torch.float32, seed=3, config=cfg)


@needs_kernels
def test_all_skipped_gives_zeros():
    x, w13, w2, weights, ids = make_case(4, 8, 2, 32, 16, torch.float32, 4)
    touched = torch.full((), -7, dtype=torch.int64, device=DEVICE)
    for direct in (False, True):
        touched.fill_(-7)
        out = fm.fused_moe(x, w13, w2, weights, torch.full_like(ids, -1), touched_out=touched, direct=direct)
        assert (out == 0).all() and int(touched) == 0


@needs_kernels
@pytest.mark.parametrize("S,T,k,bm,method", [(11, 13, 3, 16, "atomics"),
                                             # a prefill step's size: the wide-chunk path, and
                                             # more row blocks than one block-owner chunk
                                             (90, 1087, 4, 16, "atomics"), (90, 1087, 4, 128, "atomics"),
                                             # the register-only kernel at decode sizes
                                             (11, 13, 3, 16, "small"), (94, 8, 8, 16, "small"),
                                             (94, 1, 8, 16, "small"), (160, 4, 8, 16, "small"),
                                             # the sorted kernel from where the small one stops
                                             # to its bound; padding rows in several steps at 128
                                             (11, 13, 3, 16, "sorted"), (94, 9, 8, 16, "sorted"),
                                             (94, 16, 8, 16, "sorted"), (94, 64, 8, 16, "sorted"),
                                             (94, 128, 8, 16, "sorted"), (94, 128, 8, 128, "sorted"),
                                             (160, 128, 8, 64, "sorted"), (160, 32, 8, 16, "sorted")])
def test_align_groups_every_assignment_once(S, T, k, bm, method):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, S, (T, k), generator=g, dtype=torch.int32)
    if method != "atomics" and T > 1:
        ids[1, :2] = ids[0, 0]  # several assignments of one slot: ranks inside a slot
    if method == "sorted":
        ids[:, 0] = S - 1  # one slot over several row blocks
        ids[::3, -1] = -1  # many skipped assignments
        ids[-1, -1] = -1  # the last one too
    ids = ids.to(DEVICE)
    touched = torch.full((), -1, dtype=torch.int64, device=DEVICE)
    sorted_ids, block_slot = fm.moe_align(ids, S, bm, touched_out=touched, method=method)
    assert int(touched) == len(set(ids.reshape(-1).cpu().tolist()) - {-1})
    limit = S // 2  # slots past it (a folded shared expert's) are grouped but not counted
    fm.moe_align(ids, S, bm, touched_out=touched, count_slots=limit, method=method)
    assert int(touched) == len({i for i in ids.reshape(-1).cpu().tolist() if 0 <= i < limit})
    sorted_ids, block_slot, flat = sorted_ids.cpu(), block_slot.cpu(), ids.reshape(-1).cpu()
    n = flat.numel()
    used = int((block_slot >= 0).sum())  # rows past used * bm are never read
    assert (block_slot[used:] == -1).all() and (block_slot[:used].diff() >= 0).all()
    rows = sorted_ids[:used * bm].view(used, bm)
    assert (rows >= 0).all() and (rows <= n).all()  # padding rows hold the sentinel n
    assert sorted(rows[rows < n].tolist()) == [i for i in range(n) if flat[i] >= 0]
    for b in range(used):
        members = rows[b][rows[b] < n].long()
        assert len(members) > 0 and (flat[members] == block_slot[b]).all()
        assert (rows[b][len(members):] == n).all()  # a block's real rows come first
    if method != "atomics":  # the atomics kernel's blocks, each slot with the same members (the order
        # inside a slot, and so which of a slot's blocks holds an assignment, is the atomics' arrival order)
        ref_ids, ref_slot = (t.cpu() for t in fm.moe_align(ids, S, bm, method="atomics"))
        assert torch.equal(block_slot, ref_slot)
        ref_rows = ref_ids[:used * bm].view(used, bm)
        assert torch.equal((rows < n).sum(1), (ref_rows < n).sum(1))  # real rows per block
        for slot in block_slot[:used].unique().tolist():
            mine, ref = rows[block_slot[:used] == slot], ref_rows[block_slot[:used] == slot]
            assert sorted(mine[mine < n].tolist()) == sorted(ref[ref < n].tolist())


@needs_kernels
def test_lookup_config_picks_nearest_bucket():
    key = fm.config_key(75, 1408, 2048, torch.bfloat16)
    assert key == "S=75,N=1408,K=2048,dtype=bfloat16"
    table = {key: {"1": {"BLOCK_M": 16}, "64": {"BLOCK_M": 32}, "256": {"BLOCK_M": 64}}}
    pick = lambda t: fm.lookup_config(table, t, 75, 1408, 2048, torch.bfloat16)["BLOCK_M"]
    assert [pick(1), pick(20), pick(40), pick(200), pick(5000)] == [16, 16, 32, 64, 64]
    # another weight shape or dtype: no tuned tiles
    assert fm.lookup_config(table, 8, 75, 1024, 2048, torch.bfloat16) is None
    assert fm.lookup_config(table, 8, 75, 1408, 2048, torch.float32) is None


@needs_kernels
def test_lookup_config_prefers_the_table_swept_at_the_calls_width():
    key = fm.config_key(94, 1408, 2048, torch.bfloat16)
    table = {key: {"1": {"BLOCK_M": 16}}, key + fm.width_key(8): {"1": {"BLOCK_M": 32}}}
    pick = lambda k: fm.lookup_config(table, 1, 94, 1408, 2048, torch.bfloat16, top_k=k)["BLOCK_M"]  # noqa: E731
    assert pick(8) == 32  # the folded decode layout's own sweep
    assert pick(4) == 16 and pick(None) == 16  # no table at that width: the plain one
    # another slot count of the same shape and width serves too
    assert fm.lookup_config(table, 1, 90, 1408, 2048, torch.bfloat16, top_k=8)["BLOCK_M"] == 32


def test_lookup_config_serves_other_slot_counts_of_the_same_shape():
    """The engine keeps room for way-2 united experts (90 slots on Qwen1.5-MoE); a table
    swept with the way-4 layout's 75 slots serves it, from the nearest slot count."""
    table = {fm.config_key(75, 1408, 2048, torch.bfloat16): {"64": {"BLOCK_M": 32}},
             fm.config_key(20, 1408, 2048, torch.bfloat16): {"64": {"BLOCK_M": 16}},
             fm.config_key(90, 1408, 4096, torch.bfloat16): {"64": {"BLOCK_M": 64}}}
    pick = lambda s: fm.lookup_config(table, 64, s, 1408, 2048, torch.bfloat16)["BLOCK_M"]
    assert [pick(90), pick(75), pick(60), pick(30), pick(8)] == [32, 32, 32, 16, 16]


@needs_kernels
def test_committed_configs_are_valid():
    # the folder also holds the decode attention tables (attention_<device>.json, checked in
    # test_paged_attention.py)
    files = sorted(p for p in fm.CONFIG_DIR.glob("*.json") if not p.name.startswith("attention_"))
    if not files:
        pytest.skip("no tuned configs committed")
    required = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    for path in files:
        table = json.loads(path.read_text())
        for key, by_m in table.items():
            assert key.startswith("S=") and by_m, key
            for bucket, cfg in by_m.items():
                assert int(bucket) > 0 and required <= set(cfg), (path.name, key, bucket)
                sizes = [cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]]
                assert all(s >= 16 and s & (s - 1) == 0 for s in sizes)
                elem = 4 if "dtype=float32" in key else 2
                assert fm.fit_shared_memory(cfg, elem, budget=227 * 1024) == cfg


@needs_kernels
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_default_configs_fit_shared_memory(elem_bytes):
    for tokens in (1, 64, 4096):
        cfg = fm.default_config(tokens, 8, 10, 1408, 2048, on_gpu=True, elem_bytes=elem_bytes)
        need = cfg["num_stages"] * elem_bytes * cfg["BLOCK_K"] * (cfg["BLOCK_M"]
                                                                   + 2 * cfg["BLOCK_N"])
        assert need <= 200 * 1024 and cfg["num_stages"] >= 2


@needs_kernels
def test_busy_slots_size_the_row_block(monkeypatch):
    """Brownout at low tau crowds the rows of a step into the united slots: the row block
    must then cover a united slot's rows, or its weights are read once per extra block."""
    key = fm.config_key(75, 1408, 2048, torch.bfloat16)
    table = {key: {"64": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1,
                          "num_warps": 4, "num_stages": 4}}}
    monkeypatch.setattr(fm, "_load_device_configs", lambda name: table)
    monkeypatch.setattr(fm, "_kernels_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake")
    cuda = torch.device("cuda")
    plain = fm.get_config(64, 4, 75, 1408, 2048, torch.bfloat16, cuda)
    assert plain["BLOCK_M"] == 16  # the tuned table, rows spread over all slots
    for T in (8, 64, 128, 512):
        rows = T * 4 / 15  # way 4, tau 0: every row in one of 15 united slots
        cfg = fm.get_config(T, 4, 75, 1408, 2048, torch.bfloat16, cuda, busy_slots=15)
        assert cfg["BLOCK_M"] >= min(rows, 64), (T, cfg)
    # few rows even when crowded: the tuned table still applies
    assert fm.get_config(8, 4, 75, 1408, 2048, torch.bfloat16, cuda, busy_slots=15) == table[key]["64"]


@needs_kernels
def test_crowded_table_serves_routed_calls_by_rows_per_busy_slot(monkeypatch):
    """With a crowded table (swept at tau = 0), a routed call whose rows outgrow a 16-row
    block takes the tiles of the nearest rows-per-busy-slot bucket, at any slot count of the
    same shape; plain calls never read it."""
    cfg = lambda bm: {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,  # noqa: E731
                      "num_warps": 4, "num_stages": 3}
    plain_key = fm.config_key(75, 1408, 2048, torch.bfloat16)
    table = {plain_key: {"64": cfg(16), "1024": cfg(128)},
             plain_key + fm.CROWDED: {"17": cfg(32), "68": cfg(64), "273": cfg(128)}}
    monkeypatch.setattr(fm, "_load_device_configs", lambda name: table)
    monkeypatch.setattr(fm, "_kernels_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake")
    cuda = torch.device("cuda")
    pick = lambda T, S=90: fm.get_config(T, 4, S, 1408, 2048, torch.bfloat16, cuda,  # noqa: E731
                                         busy_slots=15)["BLOCK_M"]
    # rows per busy slot: 64 tokens -> 17, 256 -> 68, 1024 -> 273, 4096 -> 1092
    assert [pick(64), pick(256), pick(1024), pick(4096), pick(256, S=75)] == [32, 64, 128, 128, 64]
    assert pick(4) == 16  # ~1 row per slot: the plain table
    assert fm.get_config(1024, 4, 90, 1408, 2048, torch.bfloat16, cuda)["BLOCK_M"] == 128
    assert fm.get_config(64, 4, 90, 1408, 2048, torch.bfloat16, cuda)["BLOCK_M"] == 16
    assert fm.lookup_crowded_config(table, 17, 75, 1024, 2048, torch.bfloat16) is None


@needs_kernels
def test_available_is_bool():
    assert isinstance(fm.fused_moe_available(), bool)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("E", [8, 60, 64, 128])
def test_full_grid_gpu(E, k, T, dtype):
    check(T, E, k, 512, 256, dtype, seed=E * 7919 + k * 101 + T)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 64, 256, 1024])
def test_qwen_shape_gpu(T):
    check(T, 60, 4, 2048, 1408, torch.bfloat16, seed=T)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_graph_capture_gpu():
    x, w13, w2, weights, ids = make_case(32, 60, 4, 256, 128, torch.bfloat16, 9)
    out = torch.empty_like(x)
    fm.fused_moe(x, w13, w2, weights, ids, out=out)  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fm.fused_moe(x, w13, w2, weights, ids, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fm.fused_moe(x, w13, w2, weights, ids, out=out)
    x2, _, _, weights2, ids2 = make_case(32, 60, 4, 256, 128, torch.bfloat16, 10)
    x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
    out.fill_(float("nan"))
    graph.replay()
    ref = reference(x, w13, w2, weights, ids)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]


@needs_kernels
def test_small_align_refuses_shapes_over_its_tiles():
    ids = torch.zeros(64, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="small align"):
        fm.moe_align(ids, 94, 16, small=True)


@needs_kernels
def test_fused_moe_with_the_small_align_matches_the_reference(monkeypatch):
    """The whole expert call with the register-only align switched on (as
    BROWNOUT_SMALL_ALIGN=1 does) gives the reference's output."""
    monkeypatch.setattr(fm, "SMALL_ALIGN", True)
    g = torch.Generator().manual_seed(9)
    T, D, inter, S, k = 5, 32, 48, 12, 3
    x = torch.randn(T, D, generator=g).to(DEVICE)
    w13 = (0.1 * torch.randn(S, 2 * inter, D, generator=g)).to(DEVICE)
    w2 = (0.1 * torch.randn(S, D, inter, generator=g)).to(DEVICE)
    ids = torch.randint(-1, S, (T, k), generator=g, dtype=torch.int32).to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    launched = _spy_align_kernels(monkeypatch)
    out = fm.fused_moe(x, w13, w2, w, ids, direct=False)  # 15 assignments: direct mode's by default
    assert launched == ["small"]
    torch.testing.assert_close(out.cpu(), moe_experts_ref(x, w13, w2, w, ids).cpu(), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("method,T", [("small", 4), ("sorted", 16), ("atomics", 16)])
def test_align_skips_ids_past_its_slots(method, T):
    """Ids in [num_slots, S) (a folded shared expert's, aligned apart) are skipped as -1 is,
    also where the padded slot count would have room for them."""
    g = torch.Generator().manual_seed(9)
    S, k, limit, bm = 94, 8, 90, 16
    ids = torch.randint(-1, limit, (T, k), generator=g, dtype=torch.int32)
    ids[:, -4:] = torch.arange(limit, S, dtype=torch.int32)
    cut = torch.where(ids < limit, ids, torch.full_like(ids, -1))
    (got_ids, got_slot), (want_ids, want_slot) = (
        [t.cpu() for t in fm.moe_align(i.to(DEVICE), limit, bm, method=method)] for i in (ids, cut))
    assert torch.equal(got_slot, want_slot)
    n, used = ids.numel(), int((want_slot >= 0).sum())

    def members(sorted_ids):  # each used row block's assignments
        rows = sorted_ids[:used * bm].view(used, bm)
        return [sorted(r[r < n].tolist()) for r in rows]
    if method == "atomics":  # the order inside a slot is the atomics' arrival order
        assert sorted(sum(members(got_ids), [])) == sorted(sum(members(want_ids), []))
    else:
        assert members(got_ids) == members(want_ids)


@needs_kernels
@pytest.mark.parametrize("T,method", [(1, "small"), (5, "small"), (16, "sorted"), (40, "sorted"),
                                      (200, "atomics")])
def test_fixed_shared_slots_give_the_aligned_output_bit_for_bit(monkeypatch, T, method):
    """A folded shared expert's row blocks taken as fixed (`shared_slots`) compute each row as
    the aligned path does: the same output, bit for bit, with a padding row (-1 across the
    row, NaN input), skipped routed ids and united slots, and the same touched count."""
    monkeypatch.setattr(fm, "SMALL_ALIGN", method == "small")
    monkeypatch.setattr(fm, "SORT_ALIGN", method == "sorted")
    g = torch.Generator().manual_seed(T)
    D, inter, E, extra, n_sh, k = 32, 48, 8, 4, 2, 3
    S = E + extra + n_sh
    w13 = (0.1 * torch.randn(S, 2 * inter, D, generator=g)).to(DEVICE)
    w2 = (0.1 * torch.randn(S, D, inter, generator=g)).to(DEVICE)
    x = torch.randn(T, D, generator=g)
    routed = torch.randint(-1, E + extra, (T, k), generator=g, dtype=torch.int32)
    shared = torch.arange(E + extra, S, dtype=torch.int32).expand(T, n_sh).clone()
    real = T - (T > 2)  # rows that are not padding
    if T > 2:
        routed[-1], shared[-1] = -1, -1  # a CUDA graph's padding row
        x[-1] = float("nan")  # its input is whatever the buffer held
    ids = torch.cat([routed, shared], 1).to(DEVICE)
    w = torch.rand(T, k + n_sh, generator=g).to(DEVICE)
    x = x.to(DEVICE)
    touched = [torch.full((), -1, dtype=torch.int64, device=DEVICE) for _ in range(2)]
    fixed = fm.fused_moe(x, w13, w2, w, ids, shared_slots=(E + extra, n_sh), touched_out=touched[0],
                         count_slots=E + extra, direct=False)
    aligned = fm.fused_moe(x, w13, w2, w, ids, touched_out=touched[1], count_slots=E + extra, direct=False)
    assert torch.equal(fixed[:real], aligned[:real])
    assert int(touched[0]) == int(touched[1])
    ref = moe_experts_ref(x[:real].double(), w13.double(), w2.double(), w[:real], ids[:real])
    assert (fixed[:real].double() - ref).abs().max() < 1e-3
    monkeypatch.setattr(fm, "STATIC_SHARED", False)  # the switch: the aligned path, same output
    off = fm.fused_moe(x, w13, w2, w, ids, shared_slots=(E + extra, n_sh), direct=False)
    assert torch.equal(off[:real], aligned[:real])


@needs_kernels
@pytest.mark.parametrize("T,n_sh", [(1, 2), (1, 0), (4, 2), (5, 0)])
def test_direct_mode_gives_the_aligned_output_bit_for_bit(monkeypatch, T, n_sh):
    """Direct mode (no align; each routed assignment its own row block, its slot read from
    the ids) computes each row as the aligned path does: the same output and unsummed rows,
    bit for bit, with skipped ids, a repeated slot, a padding row with NaN input, and the same
    touched count; an id past every slot (out of contract) is skipped, as the aligns skip it."""
    g = torch.Generator().manual_seed(40 + T)
    D, inter, E, extra, k = 32, 48, 8, 4, 3
    S = E + extra + n_sh
    w13 = (0.1 * torch.randn(S, 2 * inter, D, generator=g)).to(DEVICE)
    w2 = (0.1 * torch.randn(S, D, inter, generator=g)).to(DEVICE)
    x = torch.randn(T, D, generator=g)
    routed = torch.randint(-1, E + extra, (T, k), generator=g, dtype=torch.int32)
    routed[0, :2] = 5  # one slot twice in a row
    if T > 1:
        routed[0, 2] = -1
    shared = torch.arange(E + extra, S, dtype=torch.int32).expand(T, n_sh).clone()
    real = T - (T > 2)
    if T > 2:
        routed[-1], shared[-1] = -1, -1  # a CUDA graph's padding row
        x[-1] = float("nan")
    ids = torch.cat([routed, shared], 1).to(DEVICE)
    w = torch.rand(T, k + n_sh, generator=g).to(DEVICE)
    x = x.to(DEVICE)
    fixed = (E + extra, n_sh) if n_sh else None
    touched = [torch.full((), -1, dtype=torch.int64, device=DEVICE) for _ in range(2)]
    outs = [fm.fused_moe(x, w13, w2, w, ids, shared_slots=fixed, touched_out=touched[i],
                         count_slots=E + extra, direct=d, x_settled=True) for i, d in enumerate((True, False))]
    assert torch.equal(outs[0][:real], outs[1][:real])
    assert int(touched[0]) == int(touched[1]) == int(count_touched(ids[:, :k], E + extra))
    ref = moe_experts_ref(x[:real].double(), w13.double(), w2.double(), w[:real], ids[:real])
    assert (outs[0][:real].double() - ref).abs().max() < 1e-3
    ids[0, 0] = S  # past every slot: no read out of bounds, the other rows as before
    ys = [fm.fused_moe(x, w13, w2, w, ids, shared_slots=fixed, sum_slots=False, direct=d, x_settled=True)[0]
          for d in (True, False)]
    used = (ids[:real] >= 0) & (ids[:real] < S)
    rows = used.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(ys[0][rows], ys[1][rows])


@needs_kernels
def test_direct_mode_is_taken_for_a_few_plainly_routed_assignments(monkeypatch):
    """Direct mode by default for plain routing up to DIRECT_MAX_ASSIGN routed assignments
    with the caller's `x_settled`; aligned for brownout-routed steps (`busy_slots`), past the
    bound, without `x_settled` (the shared blocks' programs read x before their wait), or with
    the switch off; asked for where it may not run, it refuses."""
    launched = _spy_align_kernels(monkeypatch)
    g = torch.Generator().manual_seed(5)
    D, inter, S, k, n_sh = 32, 48, 12, 4, 2
    w13 = (0.1 * torch.randn(S, 2 * inter, D, generator=g)).to(DEVICE)
    w2 = (0.1 * torch.randn(S, D, inter, generator=g)).to(DEVICE)

    def call(T, **kw):
        launched.clear()
        ids = torch.cat([torch.randint(0, S - n_sh, (T, k - n_sh), generator=g, dtype=torch.int32),
                         torch.arange(S - n_sh, S, dtype=torch.int32).expand(T, n_sh)], 1).to(DEVICE)
        fm.fused_moe(torch.randn(T, D, generator=g).to(DEVICE), w13, w2, torch.rand(T, k, generator=g).to(DEVICE),
                     ids, shared_slots=(S - n_sh, n_sh), **{"x_settled": True, **kw})
        return launched == []

    bound = fm.DIRECT_MAX_ASSIGN // (k - n_sh)  # tokens whose routed columns fill the bound
    assert call(bound) and not call(bound + 1)
    assert not call(1, busy_slots=3)
    assert not call(1, x_settled=False)
    for T, kw in ((bound + 1, {}), (1, {"x_settled": False})):
        with pytest.raises(ValueError, match="direct mode takes"):
            call(T, direct=True, **kw)
    monkeypatch.setattr(fm, "DIRECT", False)
    assert not call(1)
    with pytest.raises(ValueError, match="direct mode takes"):  # every column a shared slot
        fm.fused_moe(torch.zeros(1, D, device=DEVICE), w13, w2, torch.zeros(1, 2, device=DEVICE),
                     torch.tensor([[10, 11]], dtype=torch.int32, device=DEVICE), shared_slots=(10, 2),
                     direct=True, x_settled=True)


@needs_kernels
def test_fixed_shared_slots_must_fit():
    x = torch.zeros(2, 32, device=DEVICE)
    w13, w2 = torch.zeros(6, 96, 32, device=DEVICE), torch.zeros(6, 32, 48, device=DEVICE)
    ids = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    w = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="shared slots"):
        fm.fused_moe(x, w13, w2, w, ids, shared_slots=(5, 2))  # past the 6 slots
    with pytest.raises(ValueError, match="shared slots"):
        fm.fused_moe(x, w13, w2, w, ids, shared_slots=(2, 4))  # more columns than the 3
    touched = torch.zeros((), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="count_slots"):  # the shared slots are not aligned, so not counted
        fm.fused_moe(x, w13, w2, w, ids, shared_slots=(4, 2), touched_out=touched)


class _LaunchSpy:
    """Stands in for a kernel: records its name at each launch, then launches it."""

    def __init__(self, name, kernel, launched):
        self.name, self.kernel, self.launched = name, kernel, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def _spy_align_kernels(monkeypatch):
    launched = []
    for method, name in (("small", "_align_small_kernel"), ("sorted", "_align_sorted_kernel"),
                         ("atomics", "_align_kernel")):
        monkeypatch.setattr(fm, name, _LaunchSpy(method, getattr(fm, name), launched))
    return launched


@needs_kernels
def test_fused_moe_with_the_sorted_align_matches_the_reference(monkeypatch):
    """The whole expert call at a size past the small align's tiles runs the sorted align
    (as BROWNOUT_SORT_ALIGN=1 does) and gives the reference's output."""
    monkeypatch.setattr(fm, "SMALL_ALIGN", True)
    monkeypatch.setattr(fm, "SORT_ALIGN", True)
    launched = _spy_align_kernels(monkeypatch)
    g = torch.Generator().manual_seed(11)
    T, D, inter, S, k = 24, 32, 48, 12, 4  # 96 assignments: past the small align's tiles
    x = torch.randn(T, D, generator=g).to(DEVICE)
    w13 = (0.1 * torch.randn(S, 2 * inter, D, generator=g)).to(DEVICE)
    w2 = (0.1 * torch.randn(S, D, inter, generator=g)).to(DEVICE)
    ids = torch.randint(-1, S, (T, k), generator=g, dtype=torch.int32)
    ids[::4, 1] = -1
    ids[:, 0] = 3  # one slot over several row blocks
    ids = ids.to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    touched = torch.full((), -1, dtype=torch.int64, device=DEVICE)
    out = fm.fused_moe(x, w13, w2, w, ids, touched_out=touched)
    assert launched == ["sorted"]
    assert int(touched) == int(count_touched(ids, S))
    torch.testing.assert_close(out.cpu(), moe_experts_ref(x, w13, w2, w, ids).cpu(), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("n,S,bm,small_on,sort_on,expect", [
    (63, 94, 16, True, True, "small"),  # under 8 tokens x 8: the small align
    (64, 94, 16, True, True, "sorted"),  # from 8 tokens x 8: the sorted one, where the small still fits
    (65, 94, 16, True, True, "sorted"),
    (64, 94, 16, True, False, "small"),  # BROWNOUT_SORT_ALIGN=0: the small one where it fits
    (1024, 94, 16, True, True, "sorted"),  # 128 tokens x 8: the sorted align's bound
    (1025, 94, 16, True, True, "atomics"),
    (8, 94, 128, True, True, "sorted"),  # the small align's [S, BLOCK_M] tile over its budget
    (64, 94, 16, False, True, "sorted"),  # BROWNOUT_SMALL_ALIGN=0
    (65, 94, 16, True, False, "atomics"),  # BROWNOUT_SORT_ALIGN=0
    (64, 94, 16, False, False, "atomics")])
def test_align_dispatch_at_the_boundaries(monkeypatch, n, S, bm, small_on, sort_on, expect):
    monkeypatch.setattr(fm, "SMALL_ALIGN", small_on)
    monkeypatch.setattr(fm, "SORT_ALIGN", sort_on)
    assert fm.align_method(n, S, bm) == expect
    launched = _spy_align_kernels(monkeypatch)
    ids = (torch.arange(n, dtype=torch.int32) % S).view(n, 1).to(DEVICE)
    sorted_ids, block_slot = fm.moe_align(ids, S, bm)
    assert launched == [expect]
    used = int((block_slot >= 0).sum())
    assert sorted(sorted_ids[:used * bm][sorted_ids[:used * bm] < n].tolist()) == list(range(n))
    fm.moe_align(ids, S, bm, small=False)  # small=False: the atomics kernel, as before
    assert launched[-1] == "atomics"


@needs_kernels
def test_align_overrides_refuse_what_they_cannot_do():
    ids = torch.zeros(fm.ALIGN_SORTED_MAX_ASSIGN + 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="sorted align"):
        fm.moe_align(ids, 94, 16, method="sorted")
    with pytest.raises(ValueError, match="contradicts"):
        fm.moe_align(ids[:8], 94, 16, small=True, method="sorted")
    with pytest.raises(ValueError, match="unknown align method"):
        fm.moe_align(ids[:8], 94, 16, method="bitonic")


@needs_kernels
def test_the_down_gemm_runs_two_launches_after_the_align(monkeypatch):
    """The down GEMM reads the align's block slots before its PDL wait, which is safe only
    because the align is the launch before the gate/up GEMM, which is the launch before it
    (`brownout.kernels.pdl`, rule 2): no kernel may come between them. In direct mode no
    align runs and the down GEMM reads the ids, which the caller's launch before the call
    wrote: the gate/up GEMM is then the call's first launch."""
    launched = _spy_align_kernels(monkeypatch)
    for name in ("_gate_up_kernel", "_down_kernel", "_topk_sum_kernel"):
        monkeypatch.setattr(fm, name, _LaunchSpy(name, getattr(fm, name), launched))
    g = torch.Generator().manual_seed(3)
    D, inter, S, k = 32, 48, 12, 3
    w13 = (0.1 * torch.randn(S, 2 * inter, D, generator=g)).to(DEVICE)
    w2 = (0.1 * torch.randn(S, D, inter, generator=g)).to(DEVICE)
    for T in (2, 30, 400):  # the small, sorted and atomics aligns
        launched.clear()
        x = torch.randn(T, D, generator=g).to(DEVICE)
        ids = torch.randint(-1, S, (T, k), generator=g, dtype=torch.int32).to(DEVICE)
        w = torch.rand(T, k, generator=g).to(DEVICE)
        fm.fused_moe(x, w13, w2, w, ids, direct=False)
        down = launched.index("_down_kernel")
        assert launched[down - 1] == "_gate_up_kernel" and launched[down - 2] in fm.ALIGN_METHODS
    launched.clear()
    T = 2
    fm.fused_moe(torch.randn(T, D, generator=g).to(DEVICE), w13, w2, torch.rand(T, k, generator=g).to(DEVICE),
                 torch.randint(-1, S, (T, k), generator=g, dtype=torch.int32).to(DEVICE), direct=True)
    assert launched == ["_gate_up_kernel", "_down_kernel", "_topk_sum_kernel"]

