"""Triton attention over a paged KV cache (decode and chunked prefill) and the cache writer.

Layout as in `attention_ref`: a layer's cache is [num_blocks, block_size, Hkv, Dh]; sequence b
owns the query rows query_start_loc[b]:query_start_loc[b+1], which are the last tokens of its
context of seq_lens[b] tokens (causal mask). One program serves one query tile of one KV head
and all its GQA query heads, so each KV tile is read once for the group. When batch x heads
cannot fill the GPU (small-batch decode), the context is split across programs
(flash-decoding) and a second kernel merges the partial softmaxes. No host synchronisation:
every data-dependent bound is read on the device. Online softmax after FlashAttention-2.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch reference
    triton = None


def _kernels_interpreted() -> bool:
    """True when triton decorated this module's kernels for its CPU interpreter.

    Decided once, when the module was imported with TRITON_INTERPRET=1."""
    return triton is not None and not isinstance(_attn_kernel, triton.runtime.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

    # per-step sizes are not specialised on: one binary, no compile while serving
    @triton.jit
    def _find_tile(pid, qsl_ptr, B, BLOCK_Q: tl.constexpr):
        # flat grid: sequence b owns the tiles [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1),
        # at least cdiv(q_len, BLOCK_Q) of them, and these starts grow strictly with b;
        # binary search for the last start <= pid
        lo = 0
        hi = B - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(start <= pid, mid, lo)
            hi = tl.where(start <= pid, hi, mid - 1)
        return lo, pid - (tl.load(qsl_ptr + lo) // BLOCK_Q + lo)

    @triton.jit
    def _kv_tile(q, k, v, keep, m_i, l_i, acc, scale_log2, BLOCK_M: tl.constexpr,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        # one KV tile of the online softmax: q [BM, BD], k [BD, BN], v [BN, BD], keep [BM, BN]
        # (the keys each row sees); returns the running max, sum and unnormalised output
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if BLOCK_M == 1:  # one query row: products and sums, no padded tensor-core tile
            s = tl.sum(q.to(tl.float32)[:, :, None] * k.to(tl.float32)[None, :, :], 1) * scale_log2
        else:
            s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [BM, BN], log2 domain
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if BLOCK_M == 1:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    # per-step sizes are not specialised on: one binary, no compile while serving
    @triton.jit(do_not_specialize=["n_q_tiles", "T", "B", "q_len_lo", "q_len_hi"])
    def _attn_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                     block_tables_ptr, seq_lens_ptr, qsl_ptr, scale_log2, n_q_tiles, T, Hq, B,
                     q_len_lo, q_len_hi,
                     stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_bt, stride_ot, stride_oh,
                     G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     KV_BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_F32: tl.constexpr,
                     PRECISION: tl.constexpr, FLAT: tl.constexpr, HEADS_FIRST: tl.constexpr,
                     USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        # HEADS_FIRST: the grid's first axis walks the KV heads, so the programs running at once
        # read every head of a few sequences' blocks (each cache row holds all heads of a position)
        tile_pid = tl.program_id(1) if HEADS_FIRST else tl.program_id(0)
        kvh = tl.program_id(0) if HEADS_FIRST else tl.program_id(1)
        if FLAT:  # programs over the step's query tiles, T // BLOCK_Q + B of them
            b, q_tile = _find_tile(tile_pid, qsl_ptr, B, BLOCK_Q)
        else:  # n_q_tiles programs per sequence
            b = tile_pid // n_q_tiles
            q_tile = tile_pid % n_q_tiles
        split = tl.program_id(2)
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        # [q_len_lo, q_len_hi]: the query lengths this launch serves (a mixed step sends its
        # one-token queries to a launch with small tiles, see paged_attention)
        if (q_tile * BLOCK_Q >= q_len) | (q_len < q_len_lo) | (q_len > q_len_hi):
            return
        seq_len = tl.load(seq_lens_ptr + b)
        first_pos = seq_len - q_len  # context position of the sequence's first query row
        # rows: BLOCK_Q query tokens x G heads sharing KV head kvh, padded to BLOCK_M
        r = tl.arange(0, BLOCK_M)
        qi = q_tile * BLOCK_Q + r // G
        head = kvh * G + r % G
        row_ok = (r < BLOCK_Q * G) & (qi < q_len)
        q_pos = first_pos + qi
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_off = (q_start + qi).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [BM, BD]
        if DOT_F32:  # the interpreter's bf16 dot is wrong; upcast there only
            q = q.to(tl.float32)
        # causal: this tile sees keys [0, kv_end); split `split` takes one slice of that
        kv_end = first_pos + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
        per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(kv_end, lo + per_split)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pos_ok = pos < hi
            blk = tl.load(block_tables_ptr + b * stride_bt + pos // KV_BLOCK, mask=pos_ok, other=0)
            blk = blk.to(tl.int64)
            k_off = blk * stride_kb + (pos % KV_BLOCK) * stride_ks + kvh * stride_kh
            k = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=pos_ok[None, :] & d_ok[:, None],
                        other=0.0)  # [BD, BN]
            v_off = blk * stride_vb + (pos % KV_BLOCK) * stride_vs + kvh * stride_vh
            v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :],
                        other=0.0)  # [BN, BD]
            keep = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            m_i, l_i, acc = _kv_tile(q, k, v, keep, m_i, l_i, acc, scale_log2, BLOCK_M, DOT_F32,
                                     PRECISION)
        pdl_launch(USE_PDL)
        t_row = (q_start + qi).to(tl.int64)
        st_ok = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            o = acc / l_i[:, None]
            o_off = t_row * stride_ot + head * stride_oh
            tl.store(out_ptr + o_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=st_ok)
        else:  # unnormalised partials [NUM_SPLITS, T, Hq, ...] for _merge_kernel
            row = (split * T + t_row) * Hq + head
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=st_ok)
            tl.store(part_ml_ptr + row * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=row_ok)

    # per-step sizes are not specialised on: one binary, no compile while serving
    @triton.jit(do_not_specialize=["T"])
    def _merge_kernel(part_acc_ptr, part_ml_ptr, out_ptr, T, Hq, stride_ot, stride_oh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        # out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s for one (token, head)
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        s_ok = s < NUM_SPLITS
        row = (s * T + t) * Hq + h
        m = tl.load(part_ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                      mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, Hkv,
                         stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_cb, stride_cs, stride_ch, stride_vcb, stride_vcs, stride_vch,
                         HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         KV_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot < 0:  # padding token
            return
        blk = slot // KV_BLOCK
        off = slot % KV_BLOCK
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        ok = (h < Hkv)[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
        kc = k_cache_ptr + blk * stride_cb + off * stride_cs + h[:, None] * stride_ch
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch
        tl.store(kc + d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(vc + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=ok)


    @triton.jit
    def _rope_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr,
                              k_cache_ptr, v_cache_ptr, slot_ptr, Hq, Hkv,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_c, stride_cb, stride_cs, stride_ch, stride_vcb, stride_vcs, stride_vch,
                              HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                              KV_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        # one program: one token; rotate its q and k heads in place (neox halves), then
        # write k and v into the paged cache (slot -1: a padding token, no write)
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        j = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + pos * stride_c + j)[None, :]  # [1, HALF] float32
        sin = tl.load(sin_ptr + pos * stride_c + j)[None, :]
        hq = tl.arange(0, BLOCK_HQ)
        okq = hq[:, None] < Hq
        qb = q_ptr + t * stride_qt + hq[:, None] * stride_qh + j[None, :]
        q1 = tl.load(qb, mask=okq, other=0.0).to(tl.float32)
        q2 = tl.load(qb + HALF, mask=okq, other=0.0).to(tl.float32)
        tl.store(qb, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=okq)
        tl.store(qb + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=okq)
        hk = tl.arange(0, BLOCK_HK)
        okk = hk[:, None] < Hkv
        kb = k_ptr + t * stride_kt + hk[:, None] * stride_kh + j[None, :]
        k1 = tl.load(kb, mask=okk, other=0.0).to(tl.float32)
        k2 = tl.load(kb + HALF, mask=okk, other=0.0).to(tl.float32)
        r1 = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)  # rounded as the separate rotary
        r2 = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
        tl.store(kb, r1, mask=okk)
        tl.store(kb + HALF, r2, mask=okk)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            blk = slot // KV_BLOCK
            off = slot % KV_BLOCK
            kc = k_cache_ptr + blk * stride_cb + off * stride_cs + hk[:, None] * stride_ch + j[None, :]
            tl.store(kc, r1.to(k_cache_ptr.dtype.element_ty), mask=okk)
            tl.store(kc + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=okk)
            vb = v_ptr + t * stride_vt + hk[:, None] * stride_vh + j[None, :]
            vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + hk[:, None] * stride_vch + j[None, :]
            tl.store(vc, tl.load(vb, mask=okk).to(v_cache_ptr.dtype.element_ty), mask=okk)
            tl.store(vc + HALF, tl.load(vb + HALF, mask=okk).to(v_cache_ptr.dtype.element_ty), mask=okk)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------- decode tiles

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TILE_KEYS = ("block_n", "num_stages", "num_warps", "num_splits", "vec", "heads_first")  # what a table entry sets


def tiles_key(group: int, head_dim: int, kv_block: int, dtype: torch.dtype) -> str:
    """JSON key of a decode shape: query heads per KV head, head dim, cache block, dtype."""
    return f"G={group},D={head_dim},block={kv_block},dtype={str(dtype).replace('torch.', '')}"


def tiles_file(device_name: str) -> Path:
    return CONFIG_DIR / f"attention_{device_name.replace(' ', '_')}.json"


@functools.cache
def _device_tiles(device_name: str) -> dict:
    path = tiles_file(device_name)
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def decode_tiles(batch: int, group: int, head_dim: int, kv_block: int, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """The tuned tiles of a one-token-a-sequence step on `device` (`bench_attention.py` writes
    them, per batch size swept): the entry of the smallest swept batch >= `batch`, else the
    largest; {} where nothing was tuned (the launch keeps its defaults)."""
    if device.type != "cuda" or _kernels_interpreted():
        return {}
    table = _device_tiles(torch.cuda.get_device_name(device))
    return pick_tiles(table.get(tiles_key(group, head_dim, kv_block, dtype), []), batch)


def pick_tiles(entries: list[dict], batch: int) -> dict:
    """The tiles of the entry with the smallest `max_batch` >= batch, else of the largest."""
    if not entries:
        return {}
    entries = sorted(entries, key=lambda e: e["max_batch"])
    pick = next((e for e in entries if e["max_batch"] >= batch), entries[-1])
    return {k: pick[k] for k in TILE_KEYS if k in pick}


def choose_num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
    """Split the context only when batch x heads x query tiles leaves the GPU half idle."""
    if device.type != "cuda" or _kernels_interpreted():
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else
                           torch.cuda.current_device())
    if num_programs >= target:
        return 1
    n = max(1, min(triton.cdiv(target, num_programs), max_context // 256, 16))
    return 1 << (n.bit_length() - 1)  # a power of two: NUM_SPLITS compiles 5 ways, not 16


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    *, num_splits: int | None = None, tiles: dict | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [T, Hq, Dh] over each sequence's paged context; out like q.

    k_cache/v_cache [num_blocks, block_size, Hkv, Dh]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (context including this step's tokens); query_start_loc [B+1] int32;
    max_query_len a host int (an upper bound is fine); num_splits overrides the context
    split; tiles overrides a decode step's tuned tiles (`decode_tiles`; keys `TILE_KEYS`,
    `vec` for the one-row path without tensor cores, which needs one query head per KV head,
    `heads_first` for the grid that walks the KV heads first);
    out [T, Hq, Dh] optional (a static buffer for graph capture)."""
    T, Hq, Dh = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    if Hq % Hkv != 0 or k_cache.shape[-1] != Dh or v_cache.shape != k_cache.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if out is None:
        out = torch.empty_like(q)
    B = block_tables.shape[0]
    if T == 0 or B == 0:
        return out
    G = Hq // Hkv
    block_q = max(1, min(_next_pow2(max(1, max_query_len)), 64 // _next_pow2(G)))
    block_m = max(16, _next_pow2(block_q * G))
    n_q_tiles = triton.cdiv(max(1, max_query_len), block_q)
    on_gpu = q.device.type == "cuda" and not _kernels_interpreted()
    block_n = 64 if on_gpu else 16
    stages, warps, heads_first = (3 if on_gpu else 1), None, False
    if max_query_len <= 1:  # a decode step: the device's tuned tiles, else the defaults
        if tiles is None:
            tiles = decode_tiles(B, G, Dh, block_size, q.dtype, q.device)
        block_n = tiles.get("block_n", block_n)
        stages = tiles.get("num_stages", stages) if on_gpu else 1
        warps = tiles.get("num_warps")
        if num_splits is None:
            num_splits = tiles.get("num_splits")
        if tiles.get("vec") and G == 1:
            block_m = 1
        heads_first = bool(tiles.get("heads_first"))
    elif tiles:
        raise ValueError("tiles apply to decode steps (max_query_len 1) only")
    # with long and short queries in one step (a prefill beside decodes), per-sequence
    # tiles would give every sequence the longest one's tile count: walk the step's tiles
    flat = n_q_tiles > 1 and B > 1
    n_programs = T // block_q + B if flat else B * n_q_tiles
    if num_splits is None:
        num_splits = choose_num_splits(n_programs * Hkv, block_tables.shape[1] * block_size,
                                       q.device)
    if num_splits > 1:
        part_acc = torch.empty(num_splits, T, Hq, Dh, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_splits, T, Hq, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    block_d = _next_pow2(Dh)

    def launch(grid, q_tiles, bq, bm, is_flat, lo, hi):
        if heads_first:
            grid = (grid[1], grid[0], grid[2])
        _attn_kernel[grid](
            q, k_cache, v_cache, out, part_acc, part_ml, block_tables, seq_lens, query_start_loc,
            scale * math.log2(math.e), q_tiles, T, Hq, B, lo, hi,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1),
            G=G, BLOCK_Q=bq, BLOCK_M=bm, BLOCK_N=block_n, HEAD_DIM=Dh, BLOCK_D=block_d,
            KV_BLOCK=block_size, NUM_SPLITS=num_splits, DOT_F32=_kernels_interpreted(),
            PRECISION="tf32x3" if q.dtype == torch.float32 and on_gpu else None, FLAT=is_flat,
            HEADS_FIRST=heads_first,
            num_warps=warps or (4 if bm <= 64 else 8), num_stages=stages, **pdl.launch_opts(q))

    # A mixed step (a prompt chunk beside decodes) would give every one-token query the
    # prompt's BLOCK_Q-row tile: BLOCK_Q / short times the decode work. Its short queries
    # (<= `short` tokens, a 16-row tile) get a launch of their own, one program per
    # sequence, and the flat launch skips them. Both write `out` directly (no split).
    short = max(1, 16 // _next_pow2(G))
    big = 1 << 30
    if flat and num_splits == 1 and block_q > short:
        launch((n_programs, Hkv, 1), n_q_tiles, block_q, block_m, True, short + 1, big)
        launch((B, Hkv, 1), 1, short, max(16, _next_pow2(short * G)), False, 0, short)
    else:
        launch((n_programs, Hkv, num_splits), n_q_tiles, block_q, block_m, flat, 0, big)
    if num_splits > 1:
        _merge_kernel[(T, Hq)](part_acc, part_ml, out, T, Hq, out.stride(0), out.stride(1),
                               HEAD_DIM=Dh, BLOCK_D=block_d, NUM_SPLITS=num_splits,
                               SPLITS_PAD=max(2, _next_pow2(num_splits)), num_warps=4, **pdl.launch_opts(out))
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache/v_cache[slot // block_size, slot % block_size] = k/v[t]; slot -1 is skipped.

    k, v [T, Hkv, Dh] (last dim contiguous); slot_mapping [T] int."""
    T, Hkv, Dh = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, Hkv, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=Dh, BLOCK_H=_next_pow2(Hkv), BLOCK_D=_next_pow2(Dh), KV_BLOCK=k_cache.shape[1],
        num_warps=4, **pdl.launch_opts(k))


def rope_write_kv_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor) -> bool:
    """`rope_write_kv` serves these tensors: unit-stride heads, a power-of-two half head dim
    matching the cos table, float32 tables."""
    half = q.shape[-1] // 2
    return (q.dim() == k.dim() == v.dim() == 3 and half > 0 and half & (half - 1) == 0
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and cos.shape[-1] == half
            and cos.stride(-1) == 1 and cos.dtype == torch.float32
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Rotary on q [T, Hq, Dh] and k [T, Hkv, Dh] in place (neox halves, tables [P, Dh/2]),
    then `write_kv` of the rotated k and v: one launch where the layer took two (three with
    q and k rotated apart)."""
    T, Hq, Dh = q.shape
    Hkv = k.shape[1]
    if not rope_write_kv_usable(q, k, v, cos):
        raise ValueError(f"rope_write_kv needs unit-stride heads and a power-of-two half dim, got "
                         f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} cos {tuple(cos.shape)}")
    if T == 0:
        return
    _rope_write_kv_kernel[(T,)](
        q, k, v, positions.reshape(-1), cos, sin, k_cache, v_cache, slot_mapping, Hq, Hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=Dh // 2, BLOCK_HQ=_next_pow2(Hq), BLOCK_HK=_next_pow2(Hkv), KV_BLOCK=k_cache.shape[1],
        num_warps=4, **pdl.launch_opts(q))
