"""Fused MoE experts in Triton: align, gate+up GEMM with SiLU*mul, down GEMM, top-k sum.

Same semantics as `moe_ref.moe_experts_ref`: expert slot ids may point past the routed
experts (united experts sit in the extra slots) and an id of -1 skips the assignment.
Up to four launches and no host synchronisation, so the whole call can live in a CUDA graph:
  1. align (one program): count assignments per slot, pad each slot's list to a multiple
     of BLOCK_M, and write the flat assignment ids grouped by slot plus the slot of every
     BLOCK_M rows (-1 past the end). The padded length has the fixed bound
     T*k + min(T*k, S) * (BLOCK_M - 1), so grids depend on shapes only. Three kernels by
     size (`align_method`): `_align_small_kernel` (register comparisons, decode steps of a
     few tokens), `_align_sorted_kernel` (a histogram and a sort in registers, up to
     ALIGN_SORTED_MAX_ASSIGN assignments) and `_align_kernel` (atomics, any size).
     Plain-routed steps of a few tokens skip it (direct mode): each routed assignment is a
     row block of its own, whose slot the GEMMs read from the ids.
  2. `_gate_up_kernel`: per row block, h = silu(x W_gate^T) * (x W_up^T) for its slot.
  3. `_down_kernel`: y = routing_weight * (h W_down^T), one row per assignment.
  4. `_topk_sum_kernel`: out[t] = sum over the token's assignments with id >= 0.
Design after the grouped-GEMM scheme of vLLM's fused_moe (block-aligned sorted token ids);
tile configs are JSON files beside this module, one per device (see `get_config`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch reference
    triton = None

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_interpreted() -> bool:
    """True when triton decorated this module's kernels for its CPU interpreter.

    Decided once, when the module was imported with TRITON_INTERPRET=1."""
    return triton is not None and not isinstance(_gate_up_kernel, triton.runtime.JITFunction)


def _dot_precision(dtype: torch.dtype) -> str | None:
    """float32 dots as three tf32 products: one tf32 pass drops low mantissa bits and
    loses ~1e-3 per GEMM on Hopper; bf16/fp16 keep triton's default."""
    if dtype == torch.float32 and not _kernels_interpreted():
        return "tf32x3"
    return None


def fused_moe_available() -> bool:
    """True when the Triton kernels can run: triton importable and CUDA (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


# ----------------------------------------------------------------------------- configs

def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def config_key(num_slots: int, inter: int, hidden: int, dtype: torch.dtype) -> str:
    """JSON key of a weight shape: S slots, N = I (FFN width), K = D (hidden), dtype."""
    return f"S={num_slots},N={inter},K={hidden},dtype={str(dtype).replace('torch.', '')}"


def device_config_file(device_name: str) -> Path:
    return CONFIG_DIR / f"{device_name.replace(' ', '_')}.json"


@functools.cache
def _load_device_configs(device_name: str) -> dict:
    path = device_config_file(device_name)
    if not path.is_file():
        logger.info("no fused_moe tile configs for %s; using defaults", device_name)
        return {}
    with open(path) as f:
        return json.load(f)


def fit_shared_memory(cfg: dict, elem_bytes: int, budget: int = 200 * 1024) -> dict:
    """Fewer pipeline stages, then shorter K tiles, until the gate/up GEMM's buffers
    (one x tile and two weight tiles per stage) fit the shared-memory budget."""
    cfg = dict(cfg)

    def need(c):
        return c["num_stages"] * elem_bytes * c["BLOCK_K"] * (c["BLOCK_M"] + 2 * c["BLOCK_N"])
    while need(cfg) > budget and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while need(cfg) > budget and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] //= 2
    return cfg


def default_config(num_tokens: int, top_k: int, num_slots: int, inter: int, hidden: int,
                   on_gpu: bool, elem_bytes: int = 2, crowded: bool = False) -> dict:
    """Tiles for shapes nobody tuned: small row blocks while the per-slot lists are short.

    `num_slots` is the number of slots the rows are expected to spread over. `crowded`
    (brownout routing): the row block grows up to 64 to cover a united slot's rows, as a
    second row block of a slot reads its weights again; plain steps keep the H100 tiers."""
    if not on_gpu:  # the interpreter: small tiles keep numpy work per program low
        return {"BLOCK_M": 16, "BLOCK_N": min(32, max(16, _next_pow2(inter))),
                "BLOCK_K": min(32, max(16, _next_pow2(hidden))), "GROUP_M": 1,
                "num_warps": 4, "num_stages": 1}
    rows_per_slot = num_tokens * top_k / max(1, num_slots)
    if rows_per_slot <= 16:  # decode: weights stream once, H100 sweep winners
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1,
               "num_warps": 4, "num_stages": 4}
    elif crowded and 32 < rows_per_slot <= 64:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4,
               "num_warps": 4, "num_stages": 3}
    elif rows_per_slot <= 64:
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4,
               "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
               "num_warps": 8, "num_stages": 3}
    return fit_shared_memory(cfg, elem_bytes)


def width_key(top_k: int) -> str:
    """Key suffix of the tiles swept at `top_k` assignments per token (`bench_kernels.py
    --folded`): a folded shared expert adds its slots to every token, so a decode step
    runs twice the row blocks of a plain one and its best tiles differ."""
    return f",k={top_k}"


def lookup_config(table: dict, num_tokens: int, num_slots: int, inter: int, hidden: int,
                  dtype: torch.dtype, top_k: int | None = None) -> dict | None:
    """The tuned tiles of the nearest token-count bucket for this weight shape, or None.
    With `top_k`: the table swept at that many assignments per token when there is one,
    else the plain one.

    A table swept at another slot count with the same N, K and dtype serves too (the
    nearest one): slots beyond the routed experts are room for united experts, and the
    tiles depend on rows per slot and the weight shape, not on how many spare slots exist
    (the engine keeps room for way-2 united experts, 90 slots on Qwen1.5-MoE, while the
    sweep ran the way-4 layout's 75)."""
    key = config_key(num_slots, inter, hidden, dtype)
    by_m = _shape_table(table, key + width_key(top_k), num_slots) if top_k is not None else None
    by_m = by_m or _shape_table(table, key, num_slots)
    if not by_m:
        return None
    bucket = min(by_m, key=lambda m: (abs(int(m) - num_tokens), int(m)))
    return dict(by_m[bucket])


CROWDED = ",crowded"  # key suffix of the tiles swept with every row in the united slots


def lookup_crowded_config(table: dict, rows_per_slot: float, num_slots: int, inter: int,
                          hidden: int, dtype: torch.dtype) -> dict | None:
    """Tuned tiles for brownout-routed calls whose rows crowd into the united slots, from
    the bucket of the nearest expected rows per busy slot (`bench_kernels.py --crowded`
    sweeps tau = 0, where all of a step's assignments land in S / (way + 1) slots), or None."""
    by_rows = _shape_table(table, config_key(num_slots, inter, hidden, dtype) + CROWDED, num_slots)
    if not by_rows:
        return None
    bucket = min(by_rows, key=lambda m: (abs(int(m) - rows_per_slot), int(m)))
    return dict(by_rows[bucket])


def _shape_table(table: dict, key: str, num_slots: int) -> dict | None:
    """table[key], else the entry of the same shape (all but S) at the nearest slot count."""
    if table.get(key):
        return table[key]
    rest = key.split(",", 1)[1]
    near = [(abs(int(k.split(",", 1)[0][2:]) - num_slots), k) for k in table
            if k.startswith("S=") and k.split(",", 1)[1] == rest and table[k]]
    return table[min(near)[1]] if near else None


def get_config(num_tokens: int, top_k: int, num_slots: int, inter: int, hidden: int,
               dtype: torch.dtype, device: torch.device, busy_slots: int | None = None) -> dict:
    """Tuned tiles for (S, N, K, dtype) at the nearest tuned token count, else the default.

    `busy_slots`: how many slots the rows are expected to land in when fewer than all
    (brownout routing packs a cold tail into the united slots: at tau = 0 a way-4 model
    sends every row to S/5 slots, so each slot gets ~4x the rows a plain step gives it).
    The plain tables were swept over plain routing; when the expected rows per busy slot
    outgrow a 16-row block, the crowded table (swept at tau = 0) serves, else the default
    tiles sized for those rows.
    The device's JSON is read on first use only (never at import)."""
    on_gpu = device.type == "cuda" and not _kernels_interpreted()
    spread = num_slots if busy_slots is None else max(1, min(busy_slots, num_slots))
    rows = num_tokens * top_k / spread
    if on_gpu:
        table = _load_device_configs(torch.cuda.get_device_name(device))
        if spread == num_slots or rows <= 16:
            cfg = lookup_config(table, num_tokens, num_slots, inter, hidden, dtype, top_k)
        else:
            cfg = lookup_crowded_config(table, rows, num_slots, inter, hidden, dtype)
        if cfg is not None:
            return cfg
    return default_config(num_tokens, top_k, spread, inter, hidden, on_gpu,
                          torch.finfo(dtype).bits // 8, crowded=spread < num_slots)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

    # per-step sizes are not specialised on: one binary, no compile while serving
    @triton.jit(do_not_specialize=["n_assign", "n_blocks"])
    def _align_kernel(ids_ptr, counts_ptr, rank_ptr, offsets_ptr, sorted_ptr, block_slot_ptr,
                      touched_ptr, n_assign, num_slots, n_blocks, count_slots,
                      BLOCK_M: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr,
                      BCHUNK: tl.constexpr, COUNT_TOUCHED: tl.constexpr,
                      EARLY_LAUNCH: tl.constexpr, USE_PDL: tl.constexpr):
        # one program: ids [T*k] -> sorted_ptr [padded] flat ids grouped by slot,
        # block_slot_ptr [n_blocks] slot of each BLOCK_M rows (-1: past the end)
        if EARLY_LAUNCH:  # the caller vouches for the gate/up GEMM's reads before its wait
            pdl_launch(USE_PDL)
        pdl_wait(USE_PDL)
        if not EARLY_LAUNCH:
            pdl_launch(USE_PDL)
        s = tl.arange(0, S_PAD)
        tl.store(counts_ptr + s, tl.zeros([S_PAD], tl.int32), mask=s < num_slots)
        tl.debug_barrier()
        for c0 in range(0, n_assign, CHUNK):  # rank of each assignment inside its slot
            offs = c0 + tl.arange(0, CHUNK)
            e = tl.load(ids_ptr + offs, mask=offs < n_assign, other=-1).to(tl.int32)
            ok = (offs < n_assign) & (e >= 0) & (e < num_slots)
            r = tl.atomic_add(counts_ptr + e, 1, mask=ok)
            tl.store(rank_ptr + offs, r, mask=ok)
        tl.debug_barrier()
        # ".cg" reads at L2: the atomics and other threads' stores never passed through L1
        cnt = tl.load(counts_ptr + s, mask=s < num_slots, other=0, cache_modifier=".cg")
        if COUNT_TOUCHED:  # distinct slots with an assignment: the step stats' figure
            tl.store(touched_ptr, tl.sum(((cnt > 0) & (s < count_slots)).to(tl.int64), 0))
        padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, 0)
        start = end - padded
        total = tl.sum(padded, 0)
        tl.store(offsets_ptr + s, start, mask=s < num_slots)
        # padding rows of each slot get the sentinel n_assign
        j = tl.arange(0, BLOCK_M)
        pad_pos = (start + cnt)[:, None] + j[None, :]
        pad_ok = (j[None, :] < (padded - cnt)[:, None]) & (s < num_slots)[:, None]
        tl.store(sorted_ptr + pad_pos, tl.full([S_PAD, BLOCK_M], 0, tl.int32) + n_assign,
                 mask=pad_ok)
        for b0 in range(0, n_blocks, BCHUNK):  # owner of row block b: first slot ending past it
            b = b0 + tl.arange(0, BCHUNK)
            row = b * BLOCK_M
            before = (end[None, :] <= row[:, None]) & (s < num_slots)[None, :]
            slot = tl.sum(before.to(tl.int32), 1)
            tl.store(block_slot_ptr + b, tl.where(row < total, slot, -1), mask=b < n_blocks)
        tl.debug_barrier()
        for c0 in range(0, n_assign, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            e = tl.load(ids_ptr + offs, mask=offs < n_assign, other=-1).to(tl.int32)
            ok = (offs < n_assign) & (e >= 0) & (e < num_slots)
            r = tl.load(rank_ptr + offs, mask=ok, other=0, cache_modifier=".cg")
            o = tl.load(offsets_ptr + e, mask=ok, other=0, cache_modifier=".cg")
            tl.store(sorted_ptr + o + r, offs.to(tl.int32), mask=ok)

    @triton.jit
    def _slot_rows(cnt, s, count_slots, touched_ptr, BLOCK_M: tl.constexpr, COUNT_TOUCHED: tl.constexpr):
        # from each slot's count: its rows padded to BLOCK_M, where they end and start, and
        # all rows; the touched count (slots under count_slots with an assignment) when asked
        if COUNT_TOUCHED:
            tl.store(touched_ptr, tl.sum(((cnt > 0) & (s < count_slots)).to(tl.int64), 0))
        padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, 0)
        return padded, end, end - padded, tl.sum(padded, 0)

    @triton.jit(do_not_specialize=["n_assign", "n_blocks"])
    def _align_small_kernel(ids_ptr, sorted_ptr, block_slot_ptr, touched_ptr, n_assign, num_slots,
                            n_blocks, count_slots, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr,
                            S_PAD: tl.constexpr, B_PAD: tl.constexpr, COUNT_TOUCHED: tl.constexpr,
                            EARLY_LAUNCH: tl.constexpr, USE_PDL: tl.constexpr):
        # one program, everything in registers (no atomics, no scratch, no barriers): counts
        # per slot from an [N, S] one-hot, each assignment's rank from an [N, N] comparison
        if EARLY_LAUNCH:  # the caller vouches for the gate/up GEMM's reads before its wait
            pdl_launch(USE_PDL)
        pdl_wait(USE_PDL)
        if not EARLY_LAUNCH:
            pdl_launch(USE_PDL)
        i = tl.arange(0, N_PAD)
        e = tl.load(ids_ptr + i, mask=i < n_assign, other=-1).to(tl.int32)
        e = tl.where(e < num_slots, e, -1)  # [N]; -1 (skipped) matches no slot
        s = tl.arange(0, S_PAD)
        hit = e[:, None] == s[None, :]  # [N, S]
        cnt = tl.sum(hit.to(tl.int32), 0)  # [S]
        padded, end, start, total = _slot_rows(cnt, s, count_slots, touched_ptr, BLOCK_M, COUNT_TOUCHED)
        earlier = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])  # [N, N]: j < i, same slot
        rank = tl.sum(earlier.to(tl.int32), 1)
        own_start = tl.sum(tl.where(hit, start[None, :], 0), 1)  # [N]
        tl.store(sorted_ptr + own_start + rank, i, mask=e >= 0)
        j = tl.arange(0, BLOCK_M)  # each slot's padding rows get the sentinel n_assign
        pad_pos = (start + cnt)[:, None] + j[None, :]
        pad_ok = (j[None, :] < (padded - cnt)[:, None]) & (s < num_slots)[:, None]
        tl.store(sorted_ptr + pad_pos, tl.full([S_PAD, BLOCK_M], 0, tl.int32) + n_assign, mask=pad_ok)
        b = tl.arange(0, B_PAD)  # owner of row block b: the first slot ending past it
        row = b * BLOCK_M
        before = (end[None, :] <= row[:, None]) & (s < num_slots)[None, :]
        slot = tl.sum(before.to(tl.int32), 1)
        tl.store(block_slot_ptr + b, tl.where(row < total, slot, -1), mask=b < n_blocks)

    @triton.jit(do_not_specialize=["n_assign", "n_blocks"])
    def _align_sorted_kernel(ids_ptr, sorted_ptr, block_slot_ptr, touched_ptr, n_assign, num_slots,
                             n_blocks, count_slots, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr,
                             S_PAD: tl.constexpr, PAD_CHUNK: tl.constexpr, B_CHUNK: tl.constexpr,
                             COUNT_TOUCHED: tl.constexpr, EARLY_LAUNCH: tl.constexpr,
                             USE_PDL: tl.constexpr):
        # one program that reads the ids once and then only stores (no global atomics, no
        # scratch read back): counts per slot from a histogram, each assignment's place from
        # one sort of the keys slot * N_PAD + i, which lists every slot's assignments in a run
        if EARLY_LAUNCH:  # the caller vouches for the gate/up GEMM's reads before its wait
            pdl_launch(USE_PDL)
        pdl_wait(USE_PDL)
        if not EARLY_LAUNCH:
            pdl_launch(USE_PDL)
        i = tl.arange(0, N_PAD)
        e = tl.load(ids_ptr + i, mask=i < n_assign, other=-1).to(tl.int32)  # [N]; -1: skipped
        ok = (e >= 0) & (e < num_slots)
        s = tl.arange(0, S_PAD)
        cnt = tl.histogram(tl.where(ok, e, 0), S_PAD, mask=ok)  # [S]
        padded, end, start, total = _slot_rows(cnt, s, count_slots, touched_ptr, BLOCK_M, COUNT_TOUCHED)
        # the run of slot s starts at sorted position cumsum(cnt)[s] - cnt[s] and its rows at
        # start[s]: a sorted position moves by the padding rows of the slots before its own
        shift = start - (tl.cumsum(cnt, 0) - cnt)  # [S]
        key = tl.sort(tl.where(ok, e * N_PAD + i, S_PAD * N_PAD + i))  # skipped ones sort last
        real = key < S_PAD * N_PAD
        slot = tl.where(real, key // N_PAD, 0)
        dest = tl.arange(0, N_PAD) + tl.gather(shift, slot, 0)  # [N]
        tl.store(sorted_ptr + dest, key % N_PAD, mask=real)
        # owner of each used row block: every such block starts with a real row (a slot's
        # padding is shorter than a block), whose assignment writes the block's slot
        tl.store(block_slot_ptr + dest // BLOCK_M, slot, mask=real & (dest % BLOCK_M == 0))
        for b0 in range(0, n_blocks, B_CHUNK):  # -1 past the used length
            b = b0 + tl.arange(0, B_CHUNK)
            tl.store(block_slot_ptr + b, tl.full([B_CHUNK], -1, tl.int32),
                     mask=(b * BLOCK_M >= total) & (b < n_blocks))
        for j0 in range(0, BLOCK_M, PAD_CHUNK):  # each slot's padding rows get the sentinel n_assign
            j = j0 + tl.arange(0, PAD_CHUNK)
            pad_pos = (start + cnt)[:, None] + j[None, :]
            pad_ok = (j[None, :] < (padded - cnt)[:, None]) & (s < num_slots)[:, None]
            tl.store(sorted_ptr + pad_pos, tl.full([S_PAD, PAD_CHUNK], 0, tl.int32) + n_assign,
                     mask=pad_ok)

    @triton.jit
    def _block_coords(pid, n_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped order: GROUP_M row blocks share each weight tile while it sits in L2
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(n_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _shared_rows(pid, N, T, top_k, sh_first, sh_col, sh_blocks, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        # a program of the shared slots' fixed row blocks (sh_blocks per slot, tokens in
        # order): its slot, its tile of N, and each row's flat assignment id t * k + column
        num_n = tl.cdiv(N, BLOCK_N)
        b = pid // num_n
        j = b // sh_blocks
        t = (b % sh_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        return sh_first + j, pid % num_n, t * top_k + sh_col + j, t < T

    @triton.jit
    def _block_index(pid_m, top_k, sh_col, DIRECT: tl.constexpr):
        # where a routed row block's slot is read: the align's block_slot[pid_m], or in DIRECT
        # mode (no align) the ids themselves, block pid_m being the routed assignment
        # (pid_m // sh_col) * k + pid_m % sh_col alone
        if DIRECT:
            return (pid_m // sh_col) * top_k + pid_m % sh_col
        else:
            return pid_m

    @triton.jit
    def _routed_rows(pid_m, block_slot_ptr, sorted_ptr, n_assign, top_k, sh_col, sh_first,
                     BLOCK_M: tl.constexpr, DIRECT: tl.constexpr):
        # a routed row block's slot (-1: the block is empty) and its rows' flat assignment ids
        # (n_assign: no row); DIRECT reads the slot from the ids (block_slot_ptr holds them)
        # and skips ids outside [0, sh_first), as the aligns do
        b = _block_index(pid_m, top_k, sh_col, DIRECT)
        slot = tl.load(block_slot_ptr + b).to(tl.int32)
        r = tl.arange(0, BLOCK_M)
        if DIRECT:
            slot = tl.where((slot >= 0) & (slot < sh_first), slot, -1)
            aid = tl.where(r == 0, b, n_assign)
        else:
            aid = tl.load(sorted_ptr + pid_m * BLOCK_M + r)
        aid = tl.where(slot >= 0, aid, n_assign)  # no row of an empty block
        return slot, aid

    @triton.jit
    def _count_distinct(ids_ptr, n_assign, count_slots, touched_ptr, N_PAD: tl.constexpr):
        # the number of distinct ids in [0, count_slots) among the first n_assign: the
        # touched count the align gives in aligned mode
        i = tl.arange(0, N_PAD)
        e = tl.load(ids_ptr + i, mask=i < n_assign, other=-1).to(tl.int32)
        ok = (e >= 0) & (e < count_slots)
        earlier = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])  # [N, N]: an equal id before
        first = ok & (tl.sum(earlier.to(tl.int32), 1) == 0)
        tl.store(touched_ptr, tl.sum(first.to(tl.int64), 0))

    @triton.jit
    def _gate_up_tile(x_ptr, w13_ptr, tok, row_ok, slot, offs_n, n_ok, n_k, D, I,
                      stride_xt, stride_ws, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                      PRECISION: tl.constexpr):
        # silu(x W_gate^T) * (x W_up^T) for rows `tok` of x over n_k steps of K (0: zeros)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
        g_ptrs = w13_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + I * stride_wn  # up rows follow the I gate rows
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n_k):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < D - k0 * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:  # the interpreter's bf16 dot is wrong; upcast there only
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        return acc_g * tl.sigmoid(acc_g) * acc_u

    # per-step sizes are not specialised on: one binary, no compile while serving
    @triton.jit(do_not_specialize=["n_assign", "n_blocks", "T", "sh_first", "sh_col", "sh_blocks", "n_sh_progs"])
    def _gate_up_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, block_slot_ptr, touched_ptr,
                        n_assign, top_k, n_blocks, D, I, T, sh_first, sh_col, sh_blocks, n_sh_progs,
                        count_slots, stride_xt, stride_ws, stride_wn, stride_ht,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                        PRECISION: tl.constexpr, DIRECT: tl.constexpr, COUNT_TOUCHED: tl.constexpr,
                        N_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        # h [T*k, I] = silu(x W_gate^T) * (x W_up^T) for the rows of one slot. The first
        # n_sh_progs programs take the shared slots' fixed row blocks: they need nothing the
        # align writes, so they stream their weights before the wait and only store after it
        # (rules 2 and 4 of `pdl`: x was complete before the align, or under rule 4 the
        # kernel before it, started; in DIRECT mode the caller's x_settled vouches that the
        # kernel before this one signals only once x is complete). DIRECT: no align ran;
        # each routed block is one assignment, its slot read from the ids (block_slot_ptr),
        # and the first routed program writes the touched count the align would have
        pid = tl.program_id(0)
        n_k = tl.cdiv(D, BLOCK_K)
        if pid < n_sh_progs:
            slot, pid_n, aid, row_ok = _shared_rows(pid, I, T, top_k, sh_first, sh_col, sh_blocks,
                                                    BLOCK_M, BLOCK_N)
            n_run = n_k
        else:
            pdl_wait(USE_PDL)
            if COUNT_TOUCHED:
                if pid == n_sh_progs:
                    _count_distinct(block_slot_ptr, n_assign, count_slots, touched_ptr, N_PAD)
            pid_m, pid_n = _block_coords(pid - n_sh_progs, n_blocks, I, BLOCK_N, GROUP_M)
            # flat assignment ids, n_assign = padding or a block past the used length
            slot, aid = _routed_rows(pid_m, block_slot_ptr, sorted_ptr, n_assign, top_k, sh_col,
                                     sh_first, BLOCK_M, DIRECT)
            row_ok = aid < n_assign
            n_run = tl.where(slot >= 0, n_k, 0)  # such a block streams nothing, stores nothing
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        # one main loop for both kinds of program: a loop in each branch would each get
        # their own pipeline buffers, twice the shared memory
        h = _gate_up_tile(x_ptr, w13_ptr, (aid // top_k).to(tl.int64), row_ok, tl.maximum(slot, 0).to(tl.int64),
                          offs_n, n_ok, n_run, D, I, stride_xt, stride_ws, stride_wn, BLOCK_M, BLOCK_N,
                          BLOCK_K, EVEN_K, DOT_F32, PRECISION)
        pdl_wait(USE_PDL)  # the shared programs' wait; for the others a second wait, which returns at once
        pdl_launch(USE_PDL)
        h_ptrs = h_ptr + aid.to(tl.int64)[:, None] * stride_ht + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    # per-step sizes are not specialised on: one binary, no compile while serving
    @triton.jit(do_not_specialize=["n_assign", "n_blocks", "T", "sh_first", "sh_col", "sh_blocks", "n_sh_progs"])
    def _down_kernel(h_ptr, w2_ptr, y_ptr, weights_ptr, sorted_ptr, block_slot_ptr,
                     n_assign, top_k, n_blocks, D, I, T, sh_first, sh_col, sh_blocks, n_sh_progs,
                     stride_ht, stride_ws, stride_wn, stride_yt,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                     PRECISION: tl.constexpr, PF_LINES: tl.constexpr, PF_STEP: tl.constexpr,
                     DIRECT: tl.constexpr, USE_PDL: tl.constexpr):
        # y [T*k, D] = routing_weight * (h W_down^T) for the rows of one slot; the first
        # n_sh_progs programs take the shared slots' fixed row blocks (as in _gate_up_kernel);
        # DIRECT as there
        pid = tl.program_id(0)
        shared = pid < n_sh_progs
        sh_slot, sh_n, sh_aid, sh_ok = _shared_rows(tl.minimum(pid, n_sh_progs - 1), D, T, top_k, sh_first,
                                                    sh_col, sh_blocks, BLOCK_M, BLOCK_N)
        # a shared program reads block 0's slot and rows (always there) and then drops them
        pid_m, pid_n = _block_coords(tl.maximum(pid - n_sh_progs, 0), n_blocks, D, BLOCK_N, GROUP_M)
        pid_n = tl.where(shared, sh_n, pid_n)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        if USE_PDL:  # the align (or in DIRECT mode the top-k: two launches back) is done: the
            # first lines of this block's weight rows, before the wait; read at L2, so the read
            # after the wait cannot be served from an L1 line filled here
            pf_slot = tl.load(block_slot_ptr + _block_index(pid_m, top_k, sh_col, DIRECT),
                              cache_modifier=".cg")
            pf_slot = tl.where(shared, sh_slot, pf_slot).to(tl.int64)
            if (pf_slot >= 0) & (shared | (pf_slot < sh_first)):  # DIRECT reads raw ids
                prefetch_l2(w2_ptr + pf_slot * stride_ws + tl.minimum(offs_n, D - 1)[:, None] * stride_wn
                            + tl.minimum(tl.arange(0, PF_LINES) * PF_STEP, I - 1)[None, :], USE_PDL)
        pdl_wait(USE_PDL)
        slot, aid = _routed_rows(pid_m, block_slot_ptr, sorted_ptr, n_assign, top_k, sh_col, sh_first,
                                 BLOCK_M, DIRECT)
        slot = tl.where(shared, sh_slot, slot).to(tl.int64)
        if slot < 0:
            return
        aid = tl.where(shared, sh_aid, aid)
        row_ok = tl.where(shared, sh_ok, aid < n_assign)
        aid64 = aid.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + aid64[:, None] * stride_ht + offs_k[None, :]  # [BM, BK]
        b_ptrs = w2_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, tl.cdiv(I, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < I - k0 * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        pdl_launch(USE_PDL)
        w = tl.load(weights_ptr + aid, mask=row_ok, other=0.0).to(tl.float32)
        y = acc * w[:, None]
        y_ptrs = y_ptr + aid64[:, None] * stride_yt + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _topk_sum_kernel(y_ptr, ids_ptr, out_ptr, top_k, D, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        # out[t] = sum_j y[t*k + j] over j with id >= 0 (skipped rows hold garbage or nothing)
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(0, top_k):
            e = tl.load(ids_ptr + t * top_k + j + offs * 0)  # broadcast: [BLOCK_D] copies
            y = tl.load(y_ptr + (t * top_k + j) * D + offs, mask=d_ok & (e >= 0), other=0.0)
            acc += y.to(tl.float32)
        tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------- host side

# The register-only align for decode sizes: its [N, S] and [N, N] tiles stay within this many
# elements (4 warps, 64 a thread), which covers 8-row decode steps of Qwen1.5-MoE (k = 4 plus 4
# shared slots, 94 slots).
ALIGN_SMALL_MAX_TILE = 8192
# on where it fits: one program without atomics, scratch or barriers beats the atomics
# kernel at decode sizes; BROWNOUT_SMALL_ALIGN=0 turns it off
SMALL_ALIGN_ENV = "BROWNOUT_SMALL_ALIGN"
SMALL_ALIGN = os.environ.get(SMALL_ALIGN_ENV, "1") != "0"  # read once: the step path asks per layer


def _small_align_fits(n_assign: int, num_slots: int, block_m: int) -> bool:
    """The small align's [N, S], [N, N], [S, BLOCK_M] and [B, S] (B <= N) tiles fit."""
    n_pad, s_pad = _next_pow2(max(2, n_assign)), _next_pow2(max(16, num_slots))
    return n_pad * max(s_pad, n_pad) <= ALIGN_SMALL_MAX_TILE and s_pad * block_m <= ALIGN_SMALL_MAX_TILE


# The sorted align up to this many assignments (128 tokens of 8): its [N] sort holds 4 keys a
# thread in 8 warps; past it the atomics kernel's chunked rounds keep the registers bounded.
ALIGN_SORTED_MAX_ASSIGN = 1024
# from this many assignments the sorted align beats the register comparisons, whose [N, N]
# rank tile grows with the square of the assignments while the sort grows as N log^2 N
ALIGN_SORTED_MIN_ASSIGN = 64
ALIGN_SORTED_PAD_TILE = 4096  # elements of its [S, j] padding-row tile per step, 16 a thread in 8 warps
ALIGN_SORTED_B_CHUNK = 256  # row blocks marked unused per step of its tail loop, 1 a thread in 8 warps
# on up to its bound: one program that reads the ids once and sorts them in registers beats
# the atomics kernel's dependent rounds through L2; BROWNOUT_SORT_ALIGN=0 turns it off
SORT_ALIGN_ENV = "BROWNOUT_SORT_ALIGN"
SORT_ALIGN = os.environ.get(SORT_ALIGN_ENV, "1") != "0"  # read once: the step path asks per layer
ALIGN_METHODS = ("small", "sorted", "atomics")
# on: a folded shared expert's row blocks are fixed, so the gate/up GEMM's programs for them
# start while the align runs; BROWNOUT_STATIC_SHARED=0 aligns its columns with the routed ones
STATIC_SHARED_ENV = "BROWNOUT_STATIC_SHARED"
STATIC_SHARED = os.environ.get(STATIC_SHARED_ENV, "1") != "0"  # read once: the step path asks per layer
# on: with fixed shared blocks and a caller's `x_settled`, the align signals before its wait,
# so the shared blocks' programs also overlap the kernel before it (the top-k, or brownout's
# last routing kernel);
# BROWNOUT_EARLY_ALIGN=0 keeps the ordinary order
EARLY_ALIGN_ENV = "BROWNOUT_EARLY_ALIGN"
EARLY_ALIGN = os.environ.get(EARLY_ALIGN_ENV, "1") != "0"  # read once: the step path asks per layer
# Direct mode up to this many routed assignments (4 tokens of top-4): each routed assignment is
# a row block of its own, its slot read from the ids, and no align runs. Up to here the
# assignments of a plain-routed step fall on nearly as many distinct slots (the aligned
# blocks read about as many weights), so the align's launch is all it would save; past it
# tokens share experts and the aligned blocks read each expert once.
DIRECT_MAX_ASSIGN = 16
# on: plain-routed steps of up to DIRECT_MAX_ASSIGN routed assignments skip the align;
# BROWNOUT_DIRECT_MOE=0 aligns them
DIRECT_ENV = "BROWNOUT_DIRECT_MOE"
DIRECT = os.environ.get(DIRECT_ENV, "1") != "0"  # read once: the step path asks per layer


def _sorted_align_fits(n_assign: int) -> bool:
    """The sorted align's [N] keys stay within its bound."""
    return n_assign <= ALIGN_SORTED_MAX_ASSIGN


def align_method(n_assign: int, num_slots: int, block_m: int) -> str:
    """The align kernel `moe_align` picks by default: the sorted one from
    ALIGN_SORTED_MIN_ASSIGN assignments up to its bound, the register-only one below where its
    tiles fit, else the atomics one (each of the first two unless its switch is off)."""
    if SORT_ALIGN and ALIGN_SORTED_MIN_ASSIGN <= n_assign and _sorted_align_fits(n_assign):
        return "sorted"
    if SMALL_ALIGN and _small_align_fits(n_assign, num_slots, block_m):
        return "small"
    if SORT_ALIGN and _sorted_align_fits(n_assign):
        return "sorted"
    return "atomics"


def moe_align(topk_ids: torch.Tensor, num_slots: int, block_m: int,
              touched_out: torch.Tensor | None = None, count_slots: int | None = None,
              small: bool | None = None, method: str | None = None, early_launch: bool = False,
              max_grouped: int | None = None):
    """Flat assignment ids grouped by slot and padded to `block_m`, plus each block's slot.

    Returns (sorted_ids [P] int32 with n_assign as padding, block_slot [P // block_m] int32
    with -1 past the used length); P = T*k + min(T*k, S) * (block_m - 1) rounded up.
    Ids outside [0, num_slots) are skipped, as -1 is.
    `touched_out` (0-d int64), when given, receives the number of distinct slots used among
    the first `count_slots` (all of them by default). `method`: "small" (the register-only
    kernel for few assignments), "sorted" (the histogram-and-sort kernel up to
    ALIGN_SORTED_MAX_ASSIGN assignments) or "atomics" (any size); None picks by `align_method`
    (BROWNOUT_SMALL_ALIGN=0 and BROWNOUT_SORT_ALIGN=0 take the first two out). `small`
    True / False is "small" / "atomics". The order of the assignments inside a slot differs
    between the kernels, which no consumer depends on. `early_launch`: under PDL the align
    lets the next kernel launch before it waits for the kernel before it (see `fused_moe`'s
    `x_settled`). `max_grouped`: at most this many ids are in [0, num_slots) (the routed
    columns when the others are a fixed shared expert's), which bounds the row blocks."""
    ids = topk_ids.reshape(-1)  # [T*k]
    n_assign = ids.numel()
    grouped = n_assign if max_grouped is None else min(n_assign, max_grouped)
    n_blocks = max(1, triton.cdiv(grouped + min(grouped, num_slots) * (block_m - 1), block_m))
    dev = ids.device
    sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=dev)
    block_slot = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    if small is not None:
        if method is not None and method != ("small" if small else "atomics"):
            raise ValueError(f"small={small} contradicts method={method!r}")
        method = "small" if small else "atomics"
    if method is None:
        method = align_method(n_assign, num_slots, block_m)
    if method not in ALIGN_METHODS:
        raise ValueError(f"unknown align method {method!r}; one of {ALIGN_METHODS}")
    touched = block_slot if touched_out is None else touched_out
    count = num_slots if count_slots is None else count_slots
    s_pad = _next_pow2(max(16, num_slots))
    if method == "small":
        if not _small_align_fits(n_assign, num_slots, block_m):
            raise ValueError(f"{n_assign} assignments over {num_slots} slots exceed the small align's "
                             f"{ALIGN_SMALL_MAX_TILE}-element tiles")
        _align_small_kernel[(1,)](
            ids, sorted_ids, block_slot, touched, n_assign, num_slots, n_blocks, count,
            BLOCK_M=block_m, N_PAD=_next_pow2(max(2, n_assign)), S_PAD=s_pad,
            B_PAD=_next_pow2(max(2, n_blocks)), COUNT_TOUCHED=touched_out is not None, EARLY_LAUNCH=early_launch,
            num_warps=4, **pdl.launch_opts(ids))
        return sorted_ids, block_slot
    if method == "sorted":
        if not _sorted_align_fits(n_assign):
            raise ValueError(f"{n_assign} assignments exceed the sorted align's bound of "
                             f"{ALIGN_SORTED_MAX_ASSIGN}")
        n_pad = _next_pow2(max(2, n_assign))
        _align_sorted_kernel[(1,)](
            ids, sorted_ids, block_slot, touched, n_assign, num_slots, n_blocks, count,
            BLOCK_M=block_m, N_PAD=n_pad, S_PAD=s_pad,
            PAD_CHUNK=max(1, min(block_m, ALIGN_SORTED_PAD_TILE // s_pad)), B_CHUNK=ALIGN_SORTED_B_CHUNK,
            COUNT_TOUCHED=touched_out is not None, EARLY_LAUNCH=early_launch,
            num_warps=8 if n_pad > 256 else 4, **pdl.launch_opts(ids))
        return sorted_ids, block_slot
    scratch = torch.empty(2 * num_slots + n_assign, dtype=torch.int32, device=dev)
    counts, offsets, rank = scratch[:num_slots], scratch[num_slots:2 * num_slots], \
        scratch[2 * num_slots:]
    # One program walks the assignments in chunks, each a dependent round of atomics and
    # stores at L2: a prefill step's thousands of assignments (4348 at 1087 tokens, 42 us per
    # layer in the H200 profile with 256-wide chunks) take fewer, wider rounds. The [BCHUNK,
    # S_PAD] block-owner comparison stays narrow (registers).
    wide = n_assign > 1024
    _align_kernel[(1,)](ids, counts, rank, offsets, sorted_ids, block_slot,
                        counts if touched_out is None else touched_out,
                        n_assign, num_slots, n_blocks, count,
                        BLOCK_M=block_m, S_PAD=s_pad,
                        CHUNK=1024 if wide else 256, BCHUNK=256,
                        COUNT_TOUCHED=touched_out is not None, EARLY_LAUNCH=early_launch,
                        num_warps=8 if wide else 4, **pdl.launch_opts(ids))
    return sorted_ids, block_slot


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              config: dict | None = None, out: torch.Tensor | None = None,
              busy_slots: int | None = None,
              touched_out: torch.Tensor | None = None,
              count_slots: int | None = None, sum_slots: bool = True,
              shared_slots: tuple[int, int] | None = None, x_settled: bool = False,
              direct: bool | None = None):
    """out[t] = sum_j w[t,j] * expert_{id[t,j]}(x[t]) over j with id >= 0; dtype of x.
    With `sum_slots` False: (y [T*k, D], ids [T, k]) instead, the weighted per-assignment
    outputs whose sum over j with id >= 0 is out (rows of id < 0 hold garbage); the caller
    sums them, e.g. inside the next norm (`norm_rope.add_slots_rms_norm`).

    x [T, D]; w13 [S, 2I, D] (gate rows then up rows); w2 [S, D, I];
    topk_weights [T, k] float; topk_ids [T, k] int in [-1, S). `out` [T, D] contiguous,
    optional (a static buffer for graph capture). `busy_slots`: expected number of slots in
    use when routing concentrates rows (tile choice only; see `get_config`). `touched_out`
    (0-d int64): receives the number of distinct slots with an assignment, counted by the
    align kernel (saves the ~6 small kernels of `count_touched` per layer), among the first
    `count_slots` slots when given (the slots after them hold the folded shared expert).
    `shared_slots` (first, count): the last `count` columns of every row are the slots
    first .. first + count - 1 (a folded shared expert; padding rows may hold -1 there,
    and their rows are computed anyway, from whatever x holds, and skipped by the sum). Their row
    blocks are then fixed, not aligned: those programs of the gate/up GEMM stream their
    weights while the align runs (see `_gate_up_kernel`), and the align sorts only the
    routed columns (BROWNOUT_STATIC_SHARED=0 aligns them all instead). `x_settled`: a kernel
    before the one that wrote `topk_ids` wrote x, and that one signals only after its PDL
    wait (a MoE layer's top-k, or its router GEMM and top-k in one launch, each is such a
    kernel); under PDL the align then lets the gate/up GEMM launch before the align waits,
    so those programs also overlap the kernel that wrote the ids
    (BROWNOUT_EARLY_ALIGN=0 keeps the align's ordinary signal). `direct`: no align; every
    routed assignment is a row block of its own, whose slot the GEMMs read from the ids
    (ids outside [0, the first shared slot) skipped, as the aligns skip them); with shared
    slots it needs `x_settled` (the shared blocks' programs read x before their wait, and no
    align stands between them and the kernel before this call). None takes it for plain
    routing (no `busy_slots`) of up to DIRECT_MAX_ASSIGN routed assignments where it may
    (BROWNOUT_DIRECT_MOE=0: never)."""
    T, D = x.shape
    S, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if w13.shape[2] != D or w2.shape != (S, D, inter) or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, topk {tuple(topk_ids.shape)}")
    if out is None:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)  # [T, D]
    if T == 0:
        if touched_out is not None:
            touched_out.zero_()
        return out if sum_slots else (torch.empty(0, D, dtype=x.dtype, device=x.device), topk_ids)
    cfg = config or get_config(T, top_k, S, inter, D, x.dtype, x.device, busy_slots)
    down = {**cfg, **cfg.get("down", {})}
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    n_assign = T * top_k
    bm = cfg["BLOCK_M"]
    sh_first, sh_count = shared_slots if shared_slots is not None and STATIC_SHARED else (S, 0)
    if not (0 <= sh_count <= top_k and sh_first + sh_count <= S):
        raise ValueError(f"shared slots {shared_slots} do not fit {top_k} columns over {S} slots")
    if shared_slots is not None and touched_out is not None and (count_slots is None or count_slots > shared_slots[0]):
        raise ValueError(f"touched_out with shared_slots {shared_slots} counts the routed slots: "
                         f"pass count_slots <= {shared_slots[0]}")
    sh_blocks = triton.cdiv(T, bm)  # fixed row blocks per shared slot
    routed_cols = top_k - sh_count
    # without the align, the shared blocks' programs read x before their wait while the
    # kernel just before this call may still run: only a caller's `x_settled` allows that
    x_ok = sh_count == 0 or x_settled
    if direct is None:
        direct = DIRECT and busy_slots is None and x_ok and 0 < T * routed_cols <= DIRECT_MAX_ASSIGN
    elif direct and not (x_ok and 0 < T * routed_cols <= DIRECT_MAX_ASSIGN):
        raise ValueError(f"direct mode takes 1 to {DIRECT_MAX_ASSIGN} routed assignments ({T} x "
                         f"{routed_cols} given) and, with shared slots, x_settled")
    if direct:  # the GEMMs read each routed block's slot from the ids
        n_blocks = T * routed_cols
        sorted_ids = block_slot = ids.reshape(-1)
    else:
        # the align groups the routed columns only: a shared slot's id is past its num_slots
        sorted_ids, block_slot = moe_align(ids, sh_first, bm, touched_out, count_slots,
                                           early_launch=x_settled and sh_count > 0 and EARLY_ALIGN,
                                           max_grouped=T * routed_cols)
        n_blocks = block_slot.numel()
    count_direct = direct and touched_out is not None  # the gate/up GEMM counts in place of the align
    dot_f32 = _kernels_interpreted()  # the interpreter's bf16 dot is wrong
    precision = _dot_precision(x.dtype)

    h = torch.empty(n_assign, inter, dtype=x.dtype, device=x.device)  # [T*k, I]
    n_sh_progs = sh_count * sh_blocks * triton.cdiv(inter, cfg["BLOCK_N"])
    grid = (n_sh_progs + n_blocks * triton.cdiv(inter, cfg["BLOCK_N"]),)
    _gate_up_kernel[grid](
        x, w13, h, sorted_ids, block_slot, touched_out if count_direct else block_slot,
        n_assign, top_k, n_blocks, D, inter, T, sh_first, routed_cols, sh_blocks, n_sh_progs,
        sh_first if count_slots is None else count_slots,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=D % cfg["BLOCK_K"] == 0, DOT_F32=dot_f32, PRECISION=precision, DIRECT=direct,
        # one bound for every T direct mode takes: one binary
        COUNT_TOUCHED=count_direct, N_PAD=_next_pow2(max(2, DIRECT_MAX_ASSIGN // max(1, routed_cols) * top_k)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl.launch_opts(x))

    y = torch.empty(n_assign, D, dtype=x.dtype, device=x.device)  # [T*k, D]
    n_sh_progs = sh_count * sh_blocks * triton.cdiv(D, down["BLOCK_N"])
    grid = (n_sh_progs + n_blocks * triton.cdiv(D, down["BLOCK_N"]),)
    _down_kernel[grid](
        h, w2, y, weights, sorted_ids, block_slot, n_assign, top_k, n_blocks, D, inter,
        T, sh_first, routed_cols, sh_blocks, n_sh_progs,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        BLOCK_M=bm, BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
        GROUP_M=down["GROUP_M"], EVEN_K=inter % down["BLOCK_K"] == 0, DOT_F32=dot_f32,
        PRECISION=precision, PF_LINES=pdl.PREFETCH_LINES, PF_STEP=pdl.L2_LINE_BYTES // w2.element_size(),
        DIRECT=direct, num_warps=down["num_warps"], num_stages=down["num_stages"], **pdl.launch_opts(h))

    if not sum_slots:
        return y, ids
    return moe_sum(y, ids, out)


def moe_sum(y: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum of y[t * k + j] over j with ids[t, j] >= 0 (y [T*k, D], ids [T, k])."""
    T, top_k = ids.shape
    D = y.shape[1]
    if out is None:
        out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    if T == 0:
        return out
    block_d = min(1024, _next_pow2(D))
    _topk_sum_kernel[(T, triton.cdiv(D, block_d))](y, ids, out, top_k, D, BLOCK_D=block_d,
                                                    num_warps=4, **pdl.launch_opts(y))
    return out
