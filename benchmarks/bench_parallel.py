"""Tensor / expert parallelism on several GPUs: an exactness check and the decode step.

Stages, each in its own process (a crash or a stuck NCCL teardown costs that stage only):
  check-tp, check-ep  tiny Qwen2-MoE checkpoint (tests/tiny.py), float32: greedy tokens of
                      tensor_parallel_size=2 (expert parallel off / on) against one GPU,
                      plain (tau 1) and with brownout (average:2 united experts, tau 0);
                      CUDA graphs on for decode (batches <= 4)
  single              decode step, batch x context (64 x 512), dummy Qwen1.5-MoE-A2.7B, bf16,
                      one GPU; CUDA graph and eager; tau 1 and tau 0 (average:4 united experts)
  ep                  the same over 2 GPUs with expert parallelism (attention and the shared
                      expert tensor parallel, routed experts split by rank)
  tp                  the same over 2 GPUs, routed experts split along their width

Step time is wall clock of `runner.execute` (rank 0: broadcast to the workers, forward,
sampling) after a device synchronise, median of repeats. Eager steps are forced on every
rank by asking for (empty) prompt logprobs, which no CUDA graph serves.

Run: python benchmarks/bench_parallel.py --out $OUT [--stages check-tp,check-ep,single,ep,tp]
Writes $OUT/parallel_<stage>.json per stage, then $OUT/parallel.json and $OUT/parallel.md,
committed as benchmarks/results/parallel/parallel_<gpus>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAFE_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(SAFE_GPU_ENV)  # before torch touches NCCL, here and in every child

REPO = Path(__file__).resolve().parents[1]
STAGES = ["check-ep", "single", "ep", "check-tp", "tp"]  # most needed first
log = logging.getLogger("bench_parallel")


# ---------------------------------------------------------------- exactness check (tiny)
def _set_tau(engine, tau: float) -> None:
    from brownout.config import SLOConfig
    from brownout.control import make_controller

    engine.controller = make_controller(SLOConfig(policy="fixed"), fixed_tau=tau)


def stage_check(args, ep: bool) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tiny_checkpoint

    from brownout.config import CacheConfig, SchedulerConfig
    from brownout.engine.llm import LLM
    from brownout.types import SamplingParams

    path = make_tiny_checkpoint("qwen2_moe", Path(tempfile.mkdtemp()) / "tiny")  # not under $OUT
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 23, 37, 2)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    kw = dict(device=args.device, dtype="float32", united_experts="average:2",
              cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_seqs=4))
    taus = (1.0, 0.0)
    single = LLM(str(path), **kw)
    ref = {}
    for tau in taus:
        _set_tau(single.engine, tau)
        ref[tau] = [o.token_ids for o in single.generate(prompts, greedy)]
    del single
    rows = []
    llm = LLM(str(path), tensor_parallel_size=2, enable_expert_parallel=ep, **kw)
    graphs = llm.engine.runner.graphs is not None
    for tau in taus:
        _set_tau(llm.engine, tau)
        got = [o.token_ids for o in llm.generate(prompts, greedy)]
        rows.append(dict(expert_parallel=ep, tau=tau, equal=got == ref[tau], cuda_graphs=graphs,
                         single=ref[tau], parallel=got))
        log.info("check ep=%s tau=%s equal=%s", ep, tau, rows[-1]["equal"])
    result = dict(rows=rows)
    _write(args, "check-ep" if ep else "check-tp", result)  # before close
    _close(llm.engine)
    return result


# ---------------------------------------------------------------- decode step (dummy model)
def decode_sched(B: int, ctx: int, block_size: int, vocab: int, eager: bool):
    import torch

    from brownout.types import SamplingParams, ScheduledSeq, SchedulerOutput

    gen = torch.Generator().manual_seed(B * 7919 + ctx)
    per_seq = -(-(ctx + 1) // block_size)
    seqs = []
    for b in range(B):
        tok = int(torch.randint(0, vocab, (1,), generator=gen))
        seqs.append(ScheduledSeq(request_id=f"s{b}", token_ids=[tok], start_pos=ctx,
                                 block_table=list(range(b * per_seq, (b + 1) * per_seq)), sample=True,
                                 sampling=SamplingParams(temperature=0.0, max_tokens=8), output_len=1,
                                 prompt_logprob_targets=[] if eager else None))
    return SchedulerOutput(seqs=seqs, num_prefill_tokens=0, num_decode_tokens=B)


def time_step(runner, sched, tau: float, iters: int, warmup: int = 3) -> tuple[float, list[int]]:
    import torch

    out = None
    for _ in range(warmup):
        out = runner.execute(sched, tau)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        runner.execute(sched, tau)  # ends with a host read of the sampled tokens
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out.experts_touched


def stage_decode(args, world_size: int, ep: bool) -> dict:
    import torch

    from brownout.config import (BrownoutConfig, CacheConfig, EngineConfig, ModelLoadConfig,
                                 SchedulerConfig)
    from brownout.engine.llm_engine import LLMEngine

    B, ctx, bs = args.batch, args.context, 16
    blocks = B * -(-(ctx + 1) // bs) + 16
    config = EngineConfig(
        load=ModelLoadConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                             device=args.device, tensor_parallel_size=world_size,
                             enable_expert_parallel=ep),
        cache=CacheConfig(block_size=bs, num_blocks=blocks), scheduler=SchedulerConfig(max_num_seqs=B),
        brownout=BrownoutConfig(united_experts=f"average:{args.way}"))
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t0
    runner, vocab = engine.runner, engine.spec.vocab_size
    rows = []
    graphs = [True, False] if runner.graphs is not None else [False]
    for graph in graphs:
        sched = decode_sched(B, ctx, bs, vocab, eager=not graph)
        for tau in (1.0, 0.0):
            ms, touched = time_step(runner, sched, tau, args.iters)
            rows.append(dict(cuda_graph=graph, tau=tau, step_ms=ms,
                             experts_touched_mean=sum(touched) / max(1, len(touched))))
            log.info("decode ws=%d ep=%s %s", world_size, ep, rows[-1])
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result = dict(world_size=world_size, expert_parallel=ep, batch=B, context=ctx, way=args.way,
                  model=args.model, dtype=args.dtype, load_s=load_s, rank0_max_memory_gib=mem,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  rows=rows)
    _write(args, "ep" if ep else ("single" if world_size == 1 else "tp"), result)  # before close
    _close(engine)
    return result


def _close(engine, timeout_s: float = 30.0) -> None:
    t = threading.Thread(target=engine.close, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(timeout_s)
    log.info("engine close took %.1f s%s", time.perf_counter() - t0, "" if not t.is_alive() else " (gave up)")


def _write(args, stage: str, result: dict) -> None:
    result["stage"] = stage
    (Path(args.out) / f"parallel_{stage}.json").write_text(json.dumps(result, indent=1))


def run_stage(args) -> None:
    stage = args.stage
    if stage.startswith("check"):
        stage_check(args, ep=stage == "check-ep")
    else:
        stage_decode(args, 1 if stage == "single" else 2, ep=stage == "ep")


# ---------------------------------------------------------------- driver and report
def drive(args, argv: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results = {}
    for stage in args.stages.split(","):
        left = args.budget_s - (time.monotonic() - start)
        if left < 20:
            results[stage] = dict(stage=stage, skipped=f"time budget spent ({args.budget_s:.0f} s)")
            continue
        cmd = [sys.executable, __file__, "--stage", stage] + argv
        t0 = time.monotonic()
        try:
            code = subprocess.run(cmd, env=dict(os.environ, **SAFE_GPU_ENV), timeout=left).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        path = out / f"parallel_{stage}.json"
        results[stage] = json.loads(path.read_text()) if path.is_file() else dict(stage=stage, failed=code)
        results[stage]["stage_s"] = time.monotonic() - t0
        log.info("stage %s: exit %s in %.0f s", stage, code, time.monotonic() - t0)
        (out / "parallel.json").write_text(json.dumps(results, indent=1))  # after every stage
        path.unlink(missing_ok=True)  # merged into parallel.json
    (out / "parallel.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    lines = ["| check | tau | CUDA graphs | tokens equal to one GPU |", "|---|---|---|---|"]
    for stage in ("check-tp", "check-ep"):
        for r in results.get(stage, {}).get("rows", []):
            lines.append(f"| {stage} | {r['tau']} | {r['cuda_graphs']} | {r['equal']} |")
    lines += ["", "| stage | GPUs | expert parallel | CUDA graph | tau | step ms | one GPU / this "
              "| experts touched/layer |", "|---|---|---|---|---|---|---|---|"]
    base = {(r["cuda_graph"], r["tau"]): r["step_ms"] for r in results.get("single", {}).get("rows", [])}
    for stage in ("single", "ep", "tp"):
        res = results.get(stage, {})
        for r in res.get("rows", []):
            one = base.get((r["cuda_graph"], r["tau"]))
            ratio = f"{one / r['step_ms']:.2f}" if one else "-"
            lines.append(f"| {stage} | {res['world_size']} | {res['expert_parallel']} | {r['cuda_graph']} | "
                         f"{r['tau']} | {r['step_ms']:.2f} | {ratio} | {r['experts_touched_mean']:.1f} |")
    for stage, res in results.items():
        if "rows" not in res:
            lines.append(f"\n{stage}: {res.get('skipped') or 'failed: ' + str(res.get('failed'))}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # one stage, in a child
    p.add_argument("--budget-s", type=float, default=210.0, help="skip stages past this time")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="qwen1.5-moe-a2.7b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--way", type=int, default=4)
    p.add_argument("--iters", type=int, default=15)
    args, _ = p.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.stage:
        run_stage(args)
        sys.stdout.flush()
        os._exit(0)  # results are written; skip interpreter teardown
    drive(args, _strip_driver_flags(sys.argv[1:]))


def _strip_driver_flags(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--stages", "--budget-s"):
            skip = True
            continue
        if a.startswith(("--stages=", "--budget-s=")):
            continue
        kept.append(a)
    return kept


if __name__ == "__main__":
    main()
