"""Benchmark of the Triton fused MoE and paged attention against their rooflines (GPU).

Measures device-to-device copy bandwidth, then
  * fused_moe at Qwen1.5-MoE-A2.7B shapes (D 2048, I 1408, 60 routed + 15 united slots, top-4,
    bf16, random weights) for 1..256 tokens: a tile sweep (winners -> configs JSON), the
    tuned and default times, a naive per-expert torch loop, and the roofline
    (bytes of the distinct slots touched + activations) / copy bandwidth;
  * paged attention decode (Hq = Hkv = 16, Dh 128, block 16, bf16) for batch x context
    against its roofline (KV bytes read) and torch SDPA on gathered KV.
Kernel times are CUDA-graph replays timed by triton.testing.do_bench (median, L2 flushed
before each replay); routing sets rotate so the slots touched are sampled, not fixed.
With --folded: only the fused MoE in the engine's decode layout (the shared expert's slots
on every token), swept per token count and keyed by assignments per token.
With --crowded: only the fused MoE at tau = 0 (every row in a united slot), swept per token
count and keyed by rows per busy slot, the winners added to the device's committed table.
With both: tau = 0 in the engine's layout (the folded shared expert's fixed blocks beside
the united slots, called as the MoE layer calls it), timed against the tiles the engine
takes from the committed table before the sweep.
Usage: python benchmarks/bench_kernels.py --out DIR [--budget-s 240] [--smoke] [--tokens ...]
       [--skip-attention] [--crowded] [--folded]
kernels_raw.json under DIR is committed as benchmarks/results/kernels/kernels_<gpu>.json (its
table by `make_tables.py`), the winning tiles as brownout/kernels/configs/<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import time
from pathlib import Path

import torch

from brownout.kernels import fused_moe as fm
from brownout.kernels import paged_attention as pa
from brownout.kernels.moe_ref import moe_experts_ref

log = logging.getLogger("bench_kernels")
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
N_ROT = 4  # routing sets per token count


def bench_ms(fn, smoke: bool, graph: bool = True) -> float:
    """Median ms of one call: a captured graph's replay (or eager calls), L2 flushed each."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    fn()  # compile
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def copy_bandwidth_gbs(smoke: bool) -> float:
    n = (1 << 20) if smoke else (1 << 30)  # bytes per buffer
    src = torch.randn(n // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), smoke, graph=False)
    return 2 * n / ms / 1e6


# ----------------------------------------------------------------------------- MoE

def brownout_routing(T, E, way, k, cold, gen):
    """Router top-k over E experts; every assignment of a `cold` expert goes to its group's
    united slot E + e // way; a token's second hit on one united slot is summed into the
    first and becomes -1 (what brownout de-duplication does)."""
    probs = torch.softmax(torch.randn(T, E, generator=gen), -1)
    w, ids = torch.topk(probs, k, -1)  # [T, k]
    ids = torch.where(cold[ids], E + ids // way, ids)
    for j in range(1, k):
        for i in range(j):
            dup = (ids[:, j] == ids[:, i]) & (ids[:, i] >= 0)
            w[:, i] += torch.where(dup, w[:, j], torch.zeros_like(w[:, j]))
            ids[:, j] = torch.where(dup, torch.full_like(ids[:, j], -1), ids[:, j])
    return w.to(DEVICE), ids.to(torch.int32).to(DEVICE)


def moe_shape(smoke):
    """`shared`: the shared expert's width in expert slots (Qwen1.5-MoE: 5632 / 1408)."""
    return dict(D=64, I=32, E=8, way=4, k=2, shared=2) if smoke else \
        dict(D=2048, I=1408, E=60, way=4, k=4, shared=4)


def folded_routing(T, E, k, first, count, gen):
    """Router top-k over E experts, then the folded shared expert's `count` slots from
    `first` on every token with its sigmoid gate (what `routing.append_shared` gives)."""
    probs = torch.softmax(torch.randn(T, E, generator=gen), -1)
    w, ids = torch.topk(probs, k, -1)  # [T, k]
    w_sh = torch.sigmoid(torch.randn(T, 1, generator=gen)).expand(T, count)
    ids_sh = torch.arange(first, first + count).expand(T, count)
    return (torch.cat([w, w_sh], 1).to(DEVICE),
            torch.cat([ids, ids_sh], 1).to(torch.int32).to(DEVICE))


class MoECase:
    """Weights once; for each token count N_ROT (x, weights, ids) sets and their roofline."""

    def __init__(self, smoke, bw_gbs, scenario, weights_from=None):
        s = self.shape = moe_shape(smoke)
        self.S = s["E"] + s["E"] // s["way"]
        self.call_kw = {}  # how the engine calls fused_moe in this scenario
        if scenario in ("folded", "folded_united"):  # the engine's layout: room for way-2 united slots, then shared
            self.S = s["E"] + s["E"] // 2 + s["shared"]
        if scenario == "folded_united":  # a brownout-routed step: fixed shared blocks, the early align
            self.call_kw = dict(shared_slots=(self.S - s["shared"], s["shared"]), x_settled=True,
                                busy_slots=s["E"] // s["way"] + s["shared"])
        gen = torch.Generator().manual_seed({"brownout": 0, "plain": 1}.get(scenario, 2))
        if weights_from is not None:
            self.w13, self.w2 = weights_from.w13, weights_from.w2
        else:
            self.w13 = (torch.randn(self.S, 2 * s["I"], s["D"], device=DEVICE)
                        / s["D"] ** 0.5).to(DTYPE)
            self.w2 = (torch.randn(self.S, s["D"], s["I"], device=DEVICE)
                       / s["I"] ** 0.5).to(DTYPE)
        cold = torch.zeros(s["E"], dtype=torch.bool)
        if scenario == "brownout":  # a third of the experts redirected (a mid-tau state)
            cold[torch.randperm(s["E"], generator=gen)[: s["E"] // 3]] = True
        elif scenario in ("united", "folded_united"):  # tau = 0: every assignment in a united slot
            cold[:] = True
        self.sets = {}
        for T in TOKENS:
            sets = []
            for _ in range(N_ROT):
                if scenario == "folded":
                    w, ids = folded_routing(T, s["E"], s["k"], self.S - s["shared"], s["shared"], gen)
                else:
                    w, ids = brownout_routing(T, s["E"], s["way"], s["k"], cold, gen)
                if scenario == "folded_united":  # the shared slots after the redirected k
                    w_sh, ids_sh = folded_routing(T, s["E"], 1, self.S - s["shared"], s["shared"], gen)
                    w, ids = torch.cat([w, w_sh[:, 1:]], 1), torch.cat([ids, ids_sh[:, 1:]], 1)
                x = torch.randn(T, s["D"], generator=gen).to(DTYPE).to(DEVICE)
                sets.append((x, w, ids, torch.empty_like(x)))
            self.sets[T] = sets
        self.bw = bw_gbs
        self.w64 = None

    def roofline_us(self, T):
        s, el = self.shape, torch.finfo(DTYPE).bits // 8
        per_slot = 3 * s["I"] * s["D"] * el  # gate, up, down
        slots = [int(torch.unique(ids[ids >= 0]).numel()) for _, _, ids, _ in self.sets[T]]
        mean_slots = sum(slots) / len(slots)
        nbytes = mean_slots * per_slot + 2 * T * s["D"] * el  # + x read, out written
        return nbytes / self.bw / 1e3, mean_slots

    def time_us(self, T, cfg, smoke, graph=True):
        """Median us of one call, cycling through the routing sets (one graph per set)."""
        fns = [(lambda x=x, w=w, ids=ids, out=out:
                fm.fused_moe(x, self.w13, self.w2, w, ids, config=cfg, out=out, **self.call_kw))
               for x, w, ids, out in self.sets[T]]
        if smoke or not graph:
            calls = itertools.cycle(fns)
            return 1e3 * bench_ms(lambda: next(calls)(), smoke, graph=False)
        import triton.testing
        replays = []
        for fn in fns:
            fn()  # compile and warm outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            replays.append(g)
        cyc = itertools.cycle(replays)
        return 1e3 * triton.testing.do_bench(lambda: next(cyc).replay(), warmup=5, rep=25,
                                             return_mode="median")

    def naive_us(self, T, smoke):
        calls = itertools.cycle(self.sets[T])

        def run():
            x, w, ids, _ = next(calls)
            return moe_experts_ref(x, self.w13, self.w2, w, ids)
        return 1e3 * bench_ms(run, smoke, graph=False)

    def check(self, T, cfg):
        """Relative error against float64 on the first routing set."""
        if self.w64 is None:
            self.w64 = (self.w13.double(), self.w2.double())
        x, w, ids, _ = self.sets[T][0]
        got = fm.fused_moe(x, self.w13, self.w2, w, ids, config=cfg, **self.call_kw).double()
        ref = moe_experts_ref(x.double(), *self.w64, w, ids)
        return float((got - ref).norm() / ref.norm())


# gate/up tiles of the folded sweep (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): at one to a
# few rows per routed slot the weights stream once, and the program count against the SMs'
# resident programs (the last wave's fill) decides more than the tile's arithmetic
FOLDED_TILES = [(16, 16, 128, 4, 4), (16, 16, 256, 3, 4), (16, 16, 256, 4, 4), (16, 32, 128, 4, 4),
                (16, 32, 128, 5, 4), (16, 32, 256, 3, 4), (16, 32, 256, 4, 4), (16, 64, 128, 3, 4),
                (16, 64, 128, 4, 4), (16, 64, 256, 3, 4), (16, 32, 128, 4, 2)]
# the shared slots hold every token's row: past a few dozen tokens they need taller tiles
FOLDED_TALL_TILES = [(32, 64, 128, 4, 4), (32, 32, 128, 4, 4), (64, 64, 128, 3, 4), (64, 128, 64, 4, 8)]
FOLDED_TALL_MIN_TOKENS = 32
# the down GEMM's tiles of the folded sweep (BLOCK_N over D, BLOCK_K over I, stages)
FOLDED_DOWN = [(16, 128, 4), (16, 256, 3), (32, 128, 4), (32, 128, 5), (32, 256, 3), (64, 64, 5),
               (64, 128, 4), (64, 256, 3), (128, 64, 4)]


def candidates(T, smoke, rows_per_slot=None, folded=False):
    """Tile candidates (gate/up tiles; the down GEMM is tuned after, see sweep).
    `rows_per_slot`: crowded calls (tau = 0), candidates sized for that many rows.
    `folded`: the shared expert's slots ride along with every token."""
    if smoke:
        return [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4,
                 "num_stages": 1}]
    if folded:
        tiles = FOLDED_TILES + (FOLDED_TALL_TILES if T >= FOLDED_TALL_MIN_TOKENS else [])
        return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1 if bm == 16 else 4,
                 "num_warps": w, "num_stages": st} for bm, bn, bk, st, w in tiles]
    if rows_per_slot is not None:
        if rows_per_slot >= 96:  # tens to hundreds of rows per united slot
            return candidates(4096, smoke)
        return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": 4,
                 "num_stages": st}
                for bm, bn, bk, gm, st in [(16, 64, 128, 1, 3), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
                                           (64, 64, 128, 4, 3), (64, 128, 64, 8, 4), (64, 64, 64, 8, 4)]]
    out = []
    for bn, bk, st in [(32, 128, 4), (32, 256, 3), (64, 64, 5), (64, 128, 3), (64, 128, 4),
                       (64, 256, 3), (128, 64, 4), (128, 128, 3)]:
        out.append({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1,
                    "num_warps": 4, "num_stages": st})
    if T >= 512:  # prefill: tens to hundreds of rows per slot, arithmetic matters
        out = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w,
                "num_stages": st}
               for bm, bn, bk, gm, w, st in [
                   (32, 64, 128, 4, 4, 4), (64, 64, 128, 4, 4, 3), (64, 128, 64, 8, 8, 3),
                   (64, 128, 64, 8, 4, 4), (64, 128, 128, 8, 8, 3), (64, 256, 64, 8, 8, 3),
                   (128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
                   (128, 256, 64, 8, 8, 3)]]
        return out
    if T >= 64:
        out += [{"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4,
                 "num_stages": 4},
                {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                 "num_stages": 3}]
    return out


DOWN_CANDIDATES = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_stages": st}
                   for bn, bk, st in [(32, 128, 4), (64, 64, 5), (64, 128, 4), (128, 64, 4),
                                      (128, 128, 3), (64, 256, 3)]]


def sweep(case, T, smoke, deadline, rows_per_slot=None, folded=False):
    """Gate/up tiles first (down = same tiles), then the down GEMM's own tiles."""
    best, best_us, tried = None, float("inf"), []
    for cfg in candidates(T, smoke, rows_per_slot, folded):
        if time.time() > deadline:
            break
        try:
            us = case.time_us(T, cfg, smoke)
        except Exception as exc:  # e.g. out of shared memory
            log.warning("T=%d %s failed: %s", T, cfg, str(exc)[:120])
            continue
        tried.append({"config": cfg, "us": us})
        if us < best_us:
            best, best_us = cfg, us
    downs = DOWN_CANDIDATES if not folded else \
        [{"BLOCK_N": bn, "BLOCK_K": bk, "num_stages": st} for bn, bk, st in FOLDED_DOWN]
    for down in ([] if smoke else downs):
        if best is None or time.time() > deadline:
            break
        cfg = {**best, "down": {**down, "GROUP_M": best["GROUP_M"],
                                "num_warps": best["num_warps"]}}
        try:
            us = case.time_us(T, cfg, smoke)
        except Exception as exc:
            log.warning("T=%d %s failed: %s", T, cfg, str(exc)[:120])
            continue
        tried.append({"config": cfg, "us": us})
        if us < best_us:
            best, best_us = cfg, us
    return best, best_us, tried


def bench_moe(bw, smoke, deadline):
    results = {"sweep": {}, "rows": []}
    case = MoECase(smoke, bw, "brownout")
    s = case.shape
    key = fm.config_key(case.S, s["I"], s["D"], DTYPE)
    table = {key: {}}
    for T in TOKENS:
        best, best_us, tried = sweep(case, T, smoke, deadline)
        results["sweep"][T] = tried
        if best is not None:
            table[key][str(T)] = best
    plain = MoECase(smoke, bw, "plain", weights_from=case)
    for name, c in [("brownout", case), ("plain", plain)]:
        c.w64 = case.w64
        for T in TOKENS:
            tuned = fm.lookup_config(table, T, c.S, s["I"], s["D"], DTYPE)
            dflt = fm.default_config(T, s["k"], c.S, s["I"], s["D"], on_gpu=not smoke)
            roof, slots = c.roofline_us(T)
            row = {"scenario": name, "tokens": T, "slots_touched": slots, "roofline_us": roof,
                   "tuned_us": c.time_us(T, tuned or dflt, smoke),
                   "default_us": c.time_us(T, dflt, smoke),
                   "tuned_eager_us": c.time_us(T, tuned or dflt, smoke, graph=False),
                   # the per-slot loop syncs per slot: seconds of device time at prefill sizes
                   "naive_torch_us": c.naive_us(T, smoke) if T <= 256 else None,
                   "rel_err_vs_fp64": c.check(T, tuned or dflt), "config": tuned or dflt}
            row["ratio"] = row["tuned_us"] / roof
            # arithmetic: 2 * 3 * I * D flop per (token, slot) assignment kept after de-dup
            n_assign = sum(int((ids >= 0).sum()) for _, _, ids, _ in c.sets[T]) / len(c.sets[T])
            row["tflops_achieved"] = 6 * s["I"] * s["D"] * n_assign / (row["tuned_us"] * 1e-6) / 1e12
            results["rows"].append(row)
            log.info("moe %s T=%d %.1f us (roof %.1f, x%.2f)", name, T, row["tuned_us"], roof,
                     row["ratio"])
    return results, table


def bench_moe_crowded(bw, smoke, deadline, committed: dict | None = None):
    """Brownout at tau = 0 (every row in one of E / way united slots): a sweep per token count,
    the winners keyed by expected rows per busy slot (T * k / G, as the engine's routed calls
    ask for them, `fused_moe.lookup_crowded_config`), against the default crowded tiles.
    With the `committed` table: the engine's folded layout (k + shared columns a token over
    G + shared busy slots), against the tiles the engine takes from that table."""
    results = {"sweep": {}, "rows": []}
    folded = committed is not None
    case = MoECase(smoke, bw, "folded_united" if folded else "united")
    s = case.shape
    G = s["E"] // s["way"]
    width, busy = (s["k"] + s["shared"], G + s["shared"]) if folded else (s["k"], G)
    key = fm.config_key(case.S, s["I"], s["D"], DTYPE) + fm.CROWDED
    table = {key: {}}
    for T in TOKENS:
        rows = T * width / busy
        if rows <= 16:  # served by the plain table (one row block per slot)
            continue
        best, best_us, tried = sweep(case, T, smoke, deadline, rows_per_slot=rows)
        results["sweep"][T] = tried
        if best is None:
            continue
        table[key][str(round(rows))] = best
        dflt = fm.default_config(T, width, busy, s["I"], s["D"], on_gpu=not smoke, crowded=True)
        if folded:  # what the engine ran: the committed crowded table (nearest slot count), else default
            dflt = fm.lookup_crowded_config(committed, rows, case.S, s["I"], s["D"], DTYPE) or dflt
        roof, slots = case.roofline_us(T)
        row = {"scenario": case_name(folded), "tokens": T, "rows_per_busy_slot": rows, "slots_touched": slots,
               "roofline_us": roof, "tuned_us": case.time_us(T, best, smoke),
               "default_us": case.time_us(T, dflt, smoke), "rel_err_vs_fp64": case.check(T, best),
               "config": best, "default_config": dflt}
        row["ratio"] = row["tuned_us"] / roof
        n_assign = sum(int((ids >= 0).sum()) for _, _, ids, _ in case.sets[T]) / len(case.sets[T])
        row["tflops_achieved"] = 6 * s["I"] * s["D"] * n_assign / (row["tuned_us"] * 1e-6) / 1e12
        results["rows"].append(row)
        log.info("moe %s T=%d %.1f us (default %.1f, roof %.1f)", row["scenario"], T, row["tuned_us"],
                 row["default_us"], roof)
    return results, table


def case_name(folded: bool) -> str:
    return "folded_united" if folded else "united"


# the folded sweep's token counts, most wanted first (a deadline cuts the tail): batch 1
# and 8 are the latency-bound decode steps, 64 the busy one
FOLDED_TOKENS = [1, 8, 64, 4, 16, 32, 2, 128]


def bench_moe_folded(bw, smoke, deadline, committed: dict):
    """The engine's decode layout (`SparseMoE.fold_shared_expert`): each token's k routed
    slots plus the shared expert's slots, in a slot table with room for way-2 united experts.
    A sweep per token count; the winners go under the width key (`fused_moe.width_key`),
    timed against the tiles the engine ran before (the `committed` table's plain entry)."""
    results = {"sweep": {}, "rows": []}
    case = MoECase(smoke, bw, "folded")
    s = case.shape
    width = s["k"] + s["shared"]
    key = fm.config_key(case.S, s["I"], s["D"], DTYPE) + fm.width_key(width)
    table = {key: {}}
    tokens = [T for T in FOLDED_TOKENS if T in TOKENS]
    for T in tokens:
        best, best_us, tried = sweep(case, T, smoke, deadline, folded=True)
        results["sweep"][T] = tried
        if best is not None:
            table[key][str(T)] = best
    for T in tokens:
        if str(T) not in table[key]:
            continue
        before = fm.lookup_config(committed, T, case.S, s["I"], s["D"], DTYPE) or \
            fm.default_config(T, width, case.S, s["I"], s["D"], on_gpu=not smoke)
        roof, slots = case.roofline_us(T)
        row = {"scenario": "folded", "tokens": T, "slots_touched": slots, "roofline_us": roof,
               "tuned_us": case.time_us(T, table[key][str(T)], smoke),
               "before_us": case.time_us(T, before, smoke),
               "rel_err_vs_fp64": case.check(T, table[key][str(T)]),
               "config": table[key][str(T)], "before_config": before}
        row["ratio"] = row["tuned_us"] / roof
        results["rows"].append(row)
        log.info("moe folded T=%d %.1f us (before %.1f, roof %.1f)", T, row["tuned_us"],
                 row["before_us"], roof)
    return results, table


def moe_breakdown(smoke, tokens=(1, 8, 64)):
    """Per-kernel GPU time of eager fused_moe calls (profiler), beside the graph time."""
    from torch.profiler import ProfilerActivity, profile
    case = MoECase(smoke, 1.0, "plain")
    s = case.shape
    out = {}
    for T in tokens:
        cfg = fm.get_config(T, s["k"], case.S, s["I"], s["D"], DTYPE, torch.device(DEVICE))
        calls = itertools.cycle(case.sets[T])
        run = lambda: (lambda x, w, ids, o: fm.fused_moe(  # noqa: E731
            x, case.w13, case.w2, w, ids, out=o))(*next(calls))
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        n = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                run()
            torch.cuda.synchronize()
        kernels = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t > 0:
                kernels[ev.key] = t / n
        out[T] = {"config": cfg, "kernels_us": kernels, "graph_us": case.time_us(T, cfg, smoke),
                  "roofline_slots": case.roofline_us(T)[1]}
        log.info("breakdown T=%d graph %.1f us: %s", T, out[T]["graph_us"],
                 {k[:40]: round(v, 1) for k, v in kernels.items()})
    return out


# ----------------------------------------------------------------------------- attention

def bench_attention(bw, smoke):
    rows = []
    H, Dh, bs = (2, 32, 16) if smoke else (16, 128, 16)
    grid = [(1, 64), (2, 64)] if smoke else [(b, c) for c in (512, 2048) for b in (1, 16, 64, 128)]
    el = torch.finfo(DTYPE).bits // 8
    for B, ctx in grid:
        nb = ctx // bs
        k_cache = torch.randn(B * nb, bs, H, Dh, device=DEVICE).to(DTYPE)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(B * nb, device=DEVICE).to(torch.int32).view(B, nb)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
        qsl = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
        q = torch.randn(B, H, Dh, device=DEVICE).to(DTYPE)
        out = torch.empty_like(q)
        scale = Dh ** -0.5
        nbytes = 2 * B * ctx * H * Dh * el + 2 * q.numel() * el
        roof = nbytes / bw / 1e3
        row = {"batch": B, "context": ctx, "kv_bytes": nbytes, "roofline_us": roof}
        for splits in (None, 1):
            fn = (lambda s=splits: pa.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1,
                                                      scale, num_splits=s, out=out))
            row["triton_us" if splits is None else "triton_nosplit_us"] = 1e3 * bench_ms(fn, smoke)
        kd = k_cache[tables.long()].view(B, ctx, H, Dh).transpose(1, 2).contiguous()
        vd = v_cache[tables.long()].view(B, ctx, H, Dh).transpose(1, 2).contiguous()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(2).float(), kd.float(), vd.float(), scale=scale).squeeze(2)
        row["rel_err_vs_fp32"] = float((out.float() - ref).norm() / ref.norm())
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.unsqueeze(2), kd, vd, scale=scale)

        def gather_sdpa():
            kg = k_cache[tables.long()].view(B, ctx, H, Dh).transpose(1, 2)
            vg = v_cache[tables.long()].view(B, ctx, H, Dh).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kg, vg,
                                                                    scale=scale)
        row["sdpa_dense_us"] = 1e3 * bench_ms(sdpa, smoke)
        row["sdpa_gather_us"] = 1e3 * bench_ms(gather_sdpa, smoke)
        row["ratio"] = row["triton_us"] / roof
        rows.append(row)
        log.info("attn B=%d ctx=%d %.1f us (roof %.1f, x%.2f)", B, ctx, row["triton_us"], roof,
                 row["ratio"])
        del k_cache, v_cache, kd, vd
    return rows


def main():
    global DEVICE, DTYPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=240, help="wall time for the MoE sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    ap.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=None,
                    help="token counts for the MoE (default %s)" % ",".join(map(str, TOKENS)))
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--crowded", action="store_true",
                    help="sweep the tau = 0 (united slots only) case instead of plain routing; "
                         "the device's committed table is kept and the crowded entries added")
    ap.add_argument("--folded", action="store_true",
                    help="sweep the decode layout with the shared expert folded into the slots; "
                         "the device's committed table is kept and the width-keyed entries added")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the per-kernel profile of fused_moe (tuned configs from JSON)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.tokens:
        TOKENS[:] = args.tokens
    DEVICE = "cpu" if args.smoke else "cuda"
    DTYPE = torch.float32 if args.smoke else torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cpu-interpreter" if args.smoke else torch.cuda.get_device_name()
    import triton
    res = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "dtype": str(DTYPE)}
    if args.breakdown:
        res["moe_breakdown"] = moe_breakdown(args.smoke)
        (args.out / "kernels_breakdown.json").write_text(json.dumps(res, indent=1))
        return
    t_start = time.time()
    res["copy_bw_gbs"] = copy_bandwidth_gbs(args.smoke)
    log.info("copy bandwidth %.0f GB/s", res["copy_bw_gbs"])
    res["attention"] = [] if args.skip_attention else bench_attention(res["copy_bw_gbs"], args.smoke)
    (args.out / "kernels_raw.json").write_text(json.dumps(res, indent=1))
    cfg_file = fm.device_config_file(name)
    if args.crowded:
        table = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        res["moe_crowded"], crowded = bench_moe_crowded(res["copy_bw_gbs"], args.smoke, t_start + args.budget_s,
                                                        committed=table if args.folded else None)
        (args.out / "kernels_raw.json").write_text(json.dumps(res, indent=1))
        table.update(crowded)
        (args.out / cfg_file.name).write_text(json.dumps(table, indent=1, sort_keys=True))
        for r in res["moe_crowded"]["rows"]:
            print(f"moe {r['scenario']} {r['tokens']} rows/slot {r['rows_per_busy_slot']:.0f} roof {r['roofline_us']:.1f} "
                  f"tuned {r['tuned_us']:.1f} default {r['default_us']:.1f} err {r['rel_err_vs_fp64']:.1e}")
        return
    if args.folded:
        committed = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        res["moe_folded"], folded = bench_moe_folded(res["copy_bw_gbs"], args.smoke,
                                                     t_start + args.budget_s, committed)
        (args.out / "kernels_raw.json").write_text(json.dumps(res, indent=1))
        (args.out / cfg_file.name).write_text(json.dumps({**committed, **folded}, indent=1, sort_keys=True))
        for r in res["moe_folded"]["rows"]:
            print(f"moe folded {r['tokens']} slots {r['slots_touched']:.1f} roof {r['roofline_us']:.1f} "
                  f"tuned {r['tuned_us']:.1f} ({r['ratio']:.2f}x) before {r['before_us']:.1f} "
                  f"err {r['rel_err_vs_fp64']:.1e} {r['config']}")
        return
    res["moe"], table = bench_moe(res["copy_bw_gbs"], args.smoke, t_start + args.budget_s)
    (args.out / "kernels_raw.json").write_text(json.dumps(res, indent=1))
    (args.out / cfg_file.name).write_text(json.dumps(table, indent=1, sort_keys=True))
    print(f"\n{name}: copy {res['copy_bw_gbs']:.0f} GB/s")
    print("moe scenario T slots roof_us tuned_us ratio default_us eager_us naive_us err")
    for r in res["moe"]["rows"]:
        print(f"moe {r['scenario']} {r['tokens']} {r['slots_touched']:.1f} {r['roofline_us']:.1f} "
              f"{r['tuned_us']:.1f} {r['ratio']:.2f} {r['default_us']:.1f} "
              f"{r['tuned_eager_us']:.1f} {r['naive_torch_us'] or float('nan'):.1f} "
              f"{r['rel_err_vs_fp64']:.1e}")
    print("attn B ctx roof_us triton_us ratio nosplit_us sdpa_dense_us sdpa_gather_us err")
    for r in res["attention"]:
        print(f"attn {r['batch']} {r['context']} {r['roofline_us']:.1f} {r['triton_us']:.1f} "
              f"{r['ratio']:.2f} {r['triton_nosplit_us']:.1f} {r['sdpa_dense_us']:.1f} "
              f"{r['sdpa_gather_us']:.1f} {r['rel_err_vs_fp32']:.1e}")


DEVICE, DTYPE = "cuda", torch.bfloat16

if __name__ == "__main__":
    main()
