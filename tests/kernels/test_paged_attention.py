"""Triton paged attention and KV-cache writer against float64 references.

Without CUDA the kernels run under triton's CPU interpreter on small shapes; larger grids
run on a GPU. Cache slots outside every sequence's context hold NaN, so a read past the
context shows; the output is poisoned with NaN before each call.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process


pa = import_kernels("brownout.kernels.paged_attention")
needs_kernels = pytest.mark.skipif(pa is None, reason="run by test_cpu_suite_in_fresh_process")
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


@pytest.mark.skipif(pa is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def make_batch(seq_lens, q_lens, hq, hkv, dh, block_size, dtype, seed):
    """Random paged batch: shuffled physical blocks, NaN in every slot outside a context."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(n_blocks) + 1  # a spare column: tables are wider than any context
    num_phys = sum(n_blocks) + 3
    perm = torch.randperm(num_phys, generator=g)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    k_cache = torch.full((num_phys, block_size, hkv, dh), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    start = 0
    for b, nb in enumerate(n_blocks):
        tables[b, :nb] = perm[start:start + nb]
        tables[b, nb:] = perm[-1]  # never inside a context: all NaN
        start += nb
    slots = torch.cat([tables[b].long()[torch.arange(s) // block_size] * block_size
                       + torch.arange(s) % block_size for b, s in enumerate(seq_lens)])
    k_cache.view(-1, hkv, dh)[slots] = torch.randn(len(slots), hkv, dh, generator=g)
    v_cache.view(-1, hkv, dh)[slots] = torch.randn(len(slots), hkv, dh, generator=g)
    q = torch.randn(sum(q_lens), hq, dh, generator=g)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to),
            tables.to(**to), torch.tensor(seq_lens, dtype=torch.int32, **to), qsl.to(**to))


def reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale):
    """Gather each sequence's context, causal masked softmax, all in float64."""
    bs, hkv, dh = k_cache.shape[1:]
    g = q.shape[1] // hkv
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(tables.shape[0]):
        s, q0, q1 = int(seq_lens[b]), int(qsl[b]), int(qsl[b + 1])
        pos = torch.arange(s)
        slots = tables[b].cpu().long()[pos // bs] * bs + pos % bs
        keys = k_cache.cpu().reshape(-1, hkv, dh)[slots].double().repeat_interleave(g, 1)
        vals = v_cache.cpu().reshape(-1, hkv, dh)[slots].double().repeat_interleave(g, 1)
        qs = q[q0:q1].cpu().double()  # [n, Hq, Dh]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        q_pos = torch.arange(s - (q1 - q0), s)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
    return out


def check(seq_lens, q_lens, hq, hkv, dh, block_size, dtype, seed, num_splits=None, tiles=None):
    q, kc, vc, tables, lens, qsl = make_batch(seq_lens, q_lens, hq, hkv, dh, block_size, dtype,
                                              seed)
    scale = dh ** -0.5
    out = torch.full_like(q, float("nan"))
    res = pa.paged_attention(q, kc, vc, tables, lens, qsl, max(q_lens), scale,
                             num_splits=num_splits, tiles=tiles, out=out)
    assert res is out
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    ref = reference(q, kc, vc, tables, lens, qsl, scale)
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@needs_kernels
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_and_chunked_prefill(hq, hkv, dtype):
    # decode rows (q_len 1), a chunk in the middle of a context, and a whole prompt
    check([9, 40, 23], [1, 7, 23], hq, hkv, 32, 16, dtype, seed=hq * 10 + hkv)


@needs_kernels
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (4, 1)])
def test_mixed_step_short_queries_get_their_own_launch(hq, hkv):
    """A prompt long enough for several query tiles beside short queries on both sides of
    the short-launch bound (16 // G tokens): decodes, the bound itself and one past it,
    and an empty query range (the engine's padded sequences); every row written once."""
    short = 16 // (hq // hkv)
    q_lens = [1, 70, short, short + 1, 1, 0]
    seq_lens = [30, 90, short + 9, short + 1, 1, 12]
    check(seq_lens, q_lens, hq, hkv, 32, 16, torch.float32, seed=hq + hkv)


@needs_kernels
@pytest.mark.parametrize("num_splits", [2, 3, 16])
def test_split_context_merge(num_splits):
    # 16: more splits than some contexts have keys (empty slices); an empty sequence too
    check([5, 70, 33, 0], [1, 1, 4, 0], 4, 2, 32, 8, torch.float32, seed=num_splits,
          num_splits=num_splits)


@needs_kernels
@pytest.mark.parametrize("tiles", [
    {"vec": True, "block_n": 16},  # the one-row path: products and sums, no dot
    {"vec": True, "block_n": 32, "num_splits": 4},
    {"block_n": 32, "num_splits": 2},
    {"heads_first": True},  # the grid walks the KV heads first
    {"heads_first": True, "num_splits": 3, "vec": True},
])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])  # vec applies to one head a KV head only
def test_decode_tiles_give_the_same_attention(tiles, hq, hkv):
    check([5, 70, 33, 1], [1, 1, 1, 1], hq, hkv, 32, 8, torch.float32, seed=len(tiles) + hkv,
          tiles=tiles)


@needs_kernels
def test_tiles_are_refused_for_prefill():
    q, kc, vc, tables, lens, qsl = make_batch([9], [4], 2, 2, 16, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="decode"):
        pa.paged_attention(q, kc, vc, tables, lens, qsl, 4, 0.25, tiles={"block_n": 16})


def test_pick_tiles_takes_the_smallest_swept_batch_that_covers():
    from brownout.kernels.paged_attention import pick_tiles
    entries = [{"max_batch": 64, "block_n": 64}, {"max_batch": 1, "block_n": 16, "vec": True},
               {"max_batch": 8, "block_n": 32, "note": "not a tile"}]
    assert pick_tiles(entries, 1) == {"block_n": 16, "vec": True}
    assert pick_tiles(entries, 2) == {"block_n": 32}
    assert pick_tiles(entries, 64) == {"block_n": 64}
    assert pick_tiles(entries, 500) == {"block_n": 64}  # past the sweep: its largest batch
    assert pick_tiles([], 4) == {}


def committed_tables():
    """(file name, key, entry) of every committed decode attention table."""
    from brownout.kernels import paged_attention
    out = []
    for path in sorted(paged_attention.CONFIG_DIR.glob("attention_*.json")):
        for key, entries in json.loads(path.read_text()).items():
            out += [(path.name, key, e) for e in entries]
    return out


def test_committed_attention_tables_are_well_formed():
    from brownout.kernels.paged_attention import TILE_KEYS
    rows = committed_tables()
    if not rows:
        pytest.skip("no decode attention tables committed")
    for name, key, e in rows:
        assert re.fullmatch(r"G=\d+,D=\d+,block=\d+,dtype=\w+", key), (name, key)
        assert set(e) <= set(TILE_KEYS) | {"max_batch"} and e["max_batch"] >= 1, (name, e)
        assert e.get("block_n", 16) >= 16 and e.get("block_n", 16) & (e.get("block_n", 16) - 1) == 0
        assert 1 <= e.get("num_splits", 1) <= 64 and 1 <= e.get("num_stages", 1) <= 5
        assert e.get("num_warps", 4) in (1, 2, 4, 8, 16)


@needs_kernels
@pytest.mark.parametrize("entry", [e for _, _, e in committed_tables()] or [{}])
def test_committed_tiles_give_the_same_attention(entry):
    """Each installed entry's tiles (all but the batch bound) on a small decode batch."""
    tiles = {k: v for k, v in entry.items() if k != "max_batch"}
    check([5, 70, 33, 1], [1, 1, 1, 1], 4, 4, 32, 8, torch.float32, seed=7, tiles=tiles)


@needs_kernels
def test_odd_head_dim_and_block_size():
    check([13, 3], [2, 3], 3, 3, 24, 4, torch.float32, seed=7)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_skips_padding(dtype):
    g = torch.Generator().manual_seed(11)
    T, hkv, dh, nb, bs = 10, 2, 16, 4, 4
    k = torch.randn(T, hkv, dh, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(T, hkv, dh, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    k_cache = torch.randn(nb, bs, hkv, dh, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(nb, bs, hkv, dh, generator=g).to(dtype).to(DEVICE)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_want.view(-1, hkv, dh)[slots[keep]] = k[keep]
    v_want.view(-1, hkv, dh)[slots[keep]] = v[keep]
    pa.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
def test_rope_write_kv_is_rotary_then_write_kv(dtype, hq, hkv):
    """The one-launch rotary + cache write gives what the layer's two steps give: q and k
    rotated in place (views into one qkv row, v untouched), the rotated k and v cached,
    padding slots (-1) not written."""
    from brownout.models.layers.common import Rotary

    g = torch.Generator().manual_seed(hq * 7 + hkv)
    T, dh, nb, bs = 9, 32, 4, 4
    rot = Rotary(dh, 256, 10000.0)
    qkv = torch.randn(T, (hq + 2 * hkv) * dh, generator=g).to(dtype)
    positions = torch.randint(0, 256, (T,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[[1, 5]] = -1
    k_cache = torch.randn(nb, bs, hkv, dh, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, dh, generator=g).to(dtype)

    def views(t):
        q, k, v = t.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
        return q.unflatten(-1, (hq, dh)), k.unflatten(-1, (hkv, dh)), v.unflatten(-1, (hkv, dh))

    ref = [x.to(DEVICE) for x in (qkv.clone(), k_cache.clone(), v_cache.clone())]
    q, k, v = views(ref[0])
    cos, sin, pos, sl = rot.cos.to(DEVICE), rot.sin.to(DEVICE), positions.to(DEVICE), slots.to(DEVICE)
    from brownout.kernels import norm_rope  # the separate kernels: rotary, then write_kv

    norm_rope.rotary_(q, pos, cos, sin)
    norm_rope.rotary_(k, pos, cos, sin)
    pa.write_kv(k, v, ref[1], ref[2], sl)

    got = [x.to(DEVICE) for x in (qkv.clone(), k_cache.clone(), v_cache.clone())]
    q2, k2, v2 = views(got[0])
    pa.rope_write_kv(q2, k2, v2, pos, cos, sin, got[1], got[2], sl)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(got[0][:, (hq + hkv) * dh:].cpu(), qkv[:, (hq + hkv) * dh:])  # v untouched


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,dh", [(16, 16, 128), (32, 4, 128), (16, 2, 64)])
@pytest.mark.parametrize("batch,ctx", [(1, 2048), (16, 512), (64, 100)])
def test_decode_grid_gpu(batch, ctx, hq, hkv, dh, dtype):
    g = torch.Generator().manual_seed(batch * ctx)
    lens = torch.randint(1, ctx + 1, (batch,), generator=g).tolist()
    lens[0] = ctx
    check(lens, [1] * batch, hq, hkv, dh, 16, dtype, seed=batch + ctx + hq)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv", [(16, 16), (32, 4)])
def test_mixed_prefill_gpu(hq, hkv, dtype):
    seq_lens, q_lens = [1000, 300, 77, 2048, 5], [1, 300, 64, 512, 5]
    check(seq_lens, q_lens, hq, hkv, 128, 16, dtype, seed=hq)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_graph_capture_gpu():
    q, kc, vc, tables, lens, qsl = make_batch([300, 17, 64], [1, 1, 1], 16, 4, 128, 16,
                                              torch.bfloat16, 3)
    out = torch.empty_like(q)
    pa.paged_attention(q, kc, vc, tables, lens, qsl, 1, 0.1, out=out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pa.paged_attention(q, kc, vc, tables, lens, qsl, 1, 0.1, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pa.paged_attention(q, kc, vc, tables, lens, qsl, 1, 0.1, out=out)
    lens.copy_(torch.tensor([299, 1, 60], dtype=torch.int32))  # shorter contexts, same graph
    out.fill_(float("nan"))
    graph.replay()
    ref = reference(q, kc, vc, tables, lens, qsl, 0.1)
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_table_tiles_under_graph_capture_gpu(batch):
    """The device table's tiles (splits, the one-row path, the heads-first grid, by batch) on
    the shape they were swept for, captured once and replayed over shorter contexts."""
    dev = torch.device("cuda")
    tiles = pa.decode_tiles(batch, 1, 128, 16, torch.bfloat16, dev)
    if not tiles:
        pytest.skip(f"no decode attention table for {torch.cuda.get_device_name()}")
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(200, 700, (batch,), generator=g).tolist()
    q, kc, vc, tables, lens, qsl = make_batch(seq_lens, [1] * batch, 16, 16, 128, 16,
                                              torch.bfloat16, batch)
    out = torch.empty_like(q)
    pa.paged_attention(q, kc, vc, tables, lens, qsl, 1, 0.1, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pa.paged_attention(q, kc, vc, tables, lens, qsl, 1, 0.1, out=out)
    lens.sub_(torch.randint(0, 150, (batch,), generator=g, dtype=torch.int32).to(dev))
    out.fill_(float("nan"))
    graph.replay()
    ref = reference(q, kc, vc, tables, lens, qsl, 0.1)
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16], tiles
