"""GPU benchmark: a dense grid of graphed step latencies for a future step-cost profile.

Measures, on dummy Qwen1.5-MoE-A2.7B weights (bf16) with way-4 uncalibrated united experts,
the graphed step latency of
  decode steps   batch in the engine's CUDA-graph batch buckets x context x tau
  mixed steps    one fresh prompt chunk of C tokens beside D decodes at context 512 x tau
  shed steps     the same mixed steps at 256-2048 chunk tokens with k' < k routed experts
                 per token (expert shedding) x tau
and writes rows that `benchmarks/fit_profile.py --grid FILE` fits directly:
  {"phase", "tokens", "batch", "context_tokens", "tau", "top_k", "step_ms", "step_ms_samples",
   "experts_touched_mean"}                 (top_k: k' of a shed step, None at the model's k)
`step_ms_samples` are single-step timings (CUDA events around each replay), so the fit can
keep the per-step noise rather than the noise of a mean. Combinations whose KV does not fit
the cache are skipped.

  python benchmarks/bench_step_cost.py --out $OUT/step_cost.json [--samples 20] [--kv-gib 48]

It needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from bench_engine import PRESET, decode_sched, mixed_sched, weight_bytes

from brownout.config import CacheConfig, ModelLoadConfig
from brownout.runner.loader import load_model
from brownout.runner.model_runner import ModelRunner
from brownout.types import Rungs
from brownout.unite.uncalibrated import install_uncalibrated

log = logging.getLogger("bench_step_cost")

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128)
DECODE_CONTEXTS = (128, 512, 1024, 2048, 4000)
CHUNKS = (16, 64, 128, 256, 512, 768, 1024)
MIXED_DECODES = (1, 15, 63, 127)  # a chunk always beside one decode at least (mixed_sched)
MIXED_CTX = 512
TAUS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
# shedding acts on compute-bound steps, so its grid is the larger chunks, at k' = 1 .. k-1
SHED_CHUNKS = (256, 512, 1024, 2048)
SHED_DECODES = 15
SHED_TAUS = (1.0, 0.5, 0.0)
WAY = 4
# extra expert slots for way-4 united experts of a 60-expert layer
UNITED_SLOTS = 30
WARMUP_STEPS = 3


def time_steps(runner: ModelRunner, sched, tau: "Rungs | float", samples: int) -> tuple[list[float], list[int]]:
    """Single-step latencies (ms) of `samples` graphed replays, and the experts touched."""
    out = None
    for _ in range(WARMUP_STEPS):
        out = runner.execute(sched, tau)
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.execute(sched, tau)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times, out.experts_touched


def fits(sched, runner: ModelRunner) -> bool:
    need = sum(len(s.block_table) for s in sched.seqs)
    return need <= runner.num_blocks


def row(phase: str, sched, rungs: Rungs, times: list[float], touched: list[int]) -> dict:
    return dict(phase=phase, tokens=sched.num_prefill_tokens + sched.num_decode_tokens,
                batch=len(sched.seqs),
                context_tokens=sum(s.start_pos + len(s.token_ids) for s in sched.seqs), tau=rungs.tau,
                top_k=rungs.top_k,
                step_ms=sum(times) / len(times), step_ms_samples=[round(t, 4) for t in times],
                experts_touched_mean=sum(touched) / max(1, len(touched)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--kv-gib", type=float, default=48.0, help="KV cache size")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    loaded = load_model(ModelLoadConfig(model=PRESET, load_format="dummy", device="cuda",
                                        dtype="bfloat16", extra_expert_slots=UNITED_SLOTS))
    install_uncalibrated(loaded.model, WAY)  # so the captured graphs include routing
    block_bytes = loaded.spec.kv_bytes_per_token(2) * 16
    runner = ModelRunner(loaded, CacheConfig(num_blocks=int(args.kv_gib * 2**30 // block_bytes)),
                         max_batch=max(DECODE_BATCHES), max_model_len=4096)
    bs, vocab = runner.block_size, loaded.spec.vocab_size
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, preset=PRESET,
                weights="dummy (random normal, std 0.02), bf16", way=WAY,
                weight_bytes=weight_bytes(loaded.model), samples=args.samples)
    rows = []
    k = loaded.spec.top_k
    plain = [Rungs(tau=t) for t in TAUS]
    shed = [Rungs(tau=t, top_k=kk) for kk in range(1, k) for t in SHED_TAUS]
    cases = [("decode", decode_sched(B, ctx, bs, vocab), plain)
             for ctx in DECODE_CONTEXTS for B in DECODE_BATCHES]
    cases += [("prefill", mixed_sched(C, D, MIXED_CTX, bs, vocab), plain)
              for C in CHUNKS for D in MIXED_DECODES]
    cases += [("prefill", mixed_sched(C, SHED_DECODES, MIXED_CTX, bs, vocab), shed) for C in SHED_CHUNKS]
    for phase, sched, ladder in cases:
        if not fits(sched, runner):
            continue
        for rungs in ladder:
            times, touched = time_steps(runner, sched, rungs, args.samples)
            rows.append(row(phase, sched, rungs, times, touched))
            log.info("%s %d tokens / %d seqs, tau %.1f, k' %s: %.3f ms", phase, rows[-1]["tokens"],
                     rows[-1]["batch"], rungs.tau, rungs.top_k, rows[-1]["step_ms"])
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # as it goes


if __name__ == "__main__":
    main()
