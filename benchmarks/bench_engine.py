"""GPU benchmark of the engine on dummy Qwen1.5-MoE-A2.7B weights (random, bf16).

Stages (each writes its raw JSON under --out as soon as it finishes):
  bandwidth   device-to-device copy bandwidth (bytes read + written)
  decode      full decode step, batch x context, eager vs CUDA graph, vs the step roofline
              (all weights the step touches + KV read) / measured bandwidth
  brownout    MoE layer and decode step vs tau for way 4 and way 2 united experts (dummy:
              uniform averages of contiguous groups), batch 8..128, vs tau = 1 and the
              roofline of the expert slots actually touched; routing overhead at tau = 1
  profile     kernel time per graphed step (torch.profiler): decode batch 64 and a 512-token
              prompt chunk beside 63 decodes, tau 1 and 0
  prefill     steps with prefill work (128 / 512 / 2048 fresh tokens; a prompt chunk beside 63
              decodes), eager vs CUDA graph, tau 1 vs 0, vs the step roofline
  offline     offline throughput of our engine vs transformers `generate`, same weights
              (ours copied from the transformers model), same prompts and output lengths
  shed        expert shedding: steps of 512 / 1024 / 2048 fresh prompt tokens and a decode
              step of batch 64, graphed, at k' in {k, k-1, k/2, 1} x tau in {1, 0}, vs the
              step roofline at that k' and vs k' = k, tau = 1
  loop        the engine's own loop (`LLMEngine.step`, scheduler and outputs included): B
              requests of a 512-token prompt decoding together, the period between
              collected decode steps with async scheduling on and off, vs the roofline;
              then 512 such requests offered at once (chunks beside decodes), wall time

Run: python benchmarks/bench_engine.py --out $OUT [--stages decode,brownout,offline,shed]
The stages' JSON files, with `meta` and the command, make one results file
benchmarks/results/engine/engine_<gpu>_runN.json, whose tables `make_tables.py` renders; the
output directory itself goes to engine/raw/engine_<gpu>_runN/ through `compact_raw.py`.
Random router weights route almost uniformly; real checkpoints are skewed, so the expert
savings of brownout here are a lower bound of what a trained model gets at the same tau.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import torch
from gpu_timing import cuda_time_ms

from brownout.config import CacheConfig, ModelLoadConfig
from brownout.models.context import ForwardContext
from brownout.runner.loader import load_model
from brownout.runner.cuda_graphs import StepDescriptor
from brownout.runner.model_runner import ModelRunner
from brownout.types import Rungs, SamplingParams, ScheduledSeq, SchedulerOutput
from brownout.unite.uncalibrated import install_uncalibrated

PRESET = "qwen1.5-moe-a2.7b"
TAUS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
# the shed stage's steps: fresh prompt tokens per step, and the decode batch beside them
SHED_PREFILL_TOKENS = (512, 1024, 2048)
SHED_DECODE_BATCH = 64
SHED_DECODE_CONTEXT = 512  # tokens each decoding sequence has cached
log = logging.getLogger("bench_engine")




COPY_ROUNDS = 5  # timings of the 1 GiB copy; a single one moves by ~5% between processes


def copy_bandwidth() -> float:
    """The HBM bandwidth the rooflines divide by: the fastest of COPY_ROUNDS timings of a
    1 GiB device copy (the highest rate is the ceiling, and the conservative roofline)."""
    n = 1 << 30
    src = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = min(cuda_time_ms(lambda: dst.copy_(src), iters=20) for _ in range(COPY_ROUNDS))
    return 2 * n / (ms / 1e3)  # bytes/s, read + write


def matmul_flops(n: int = 8192) -> float:
    """bf16 matrix-product rate on random data (flop/s), the compute ceiling of a step."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time_ms(lambda: a @ b, iters=10)
    return 2 * n**3 / (ms / 1e3)


def shared_slot_params(moe) -> int:
    """Parameters of the shared expert folded into one MoE layer's expert slots (0 if none):
    read by every step, so they count with the dense weights, not the touched slots."""
    if getattr(moe, "shared_slots", None) is None:
        return 0
    return moe.shared_slots.count * 3 * moe.gate.in_features * moe.inter


def weight_bytes(model) -> dict:
    spec = model.spec
    expert = 3 * spec.hidden_size * spec.moe_intermediate_size * 2  # one expert, bf16
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if not n.endswith((".w13", ".w2")) and n != "embed_tokens.weight")
    dense += 2 * sum(shared_slot_params(m) for m in model.moe_layers())
    moe = model.moe_layers()[0]
    moe_dense = sum(p.numel() * p.element_size() for n, p in moe.named_parameters()
                    if not n.endswith(("w13", "w2"))) + 2 * shared_slot_params(moe)
    return dict(expert=expert, dense=dense, moe_layer_dense=moe_dense,
                kv_per_token=spec.kv_bytes_per_token(2))


def decode_sched(B: int, ctx: int, block_size: int, vocab: int) -> SchedulerOutput:
    gen = torch.Generator().manual_seed(B * 7919 + ctx)
    per_seq = -(-(ctx + 1) // block_size)
    seqs = []
    for b in range(B):
        table = list(range(b * per_seq, (b + 1) * per_seq))
        tok = int(torch.randint(0, vocab, (1,), generator=gen))
        seqs.append(ScheduledSeq(request_id=f"s{b}", token_ids=[tok], start_pos=ctx, block_table=table,
                                 sample=True, sampling=SamplingParams(temperature=0.0, max_tokens=8),
                                 output_len=1))
    return SchedulerOutput(seqs=seqs, num_prefill_tokens=0, num_decode_tokens=B)


def prefill_sched(T: int, block_size: int, vocab: int, seqs: int = 4) -> SchedulerOutput:
    """`seqs` fresh prompts of T / seqs tokens each in one step (a chunked-prefill step)."""
    gen = torch.Generator().manual_seed(T)
    n = T // seqs
    per_seq = -(-n // block_size)
    out = [ScheduledSeq(request_id=f"p{b}", token_ids=torch.randint(0, vocab, (n,), generator=gen).tolist(),
                        start_pos=0, block_table=list(range(b * per_seq, (b + 1) * per_seq)), sample=True,
                        sampling=SamplingParams(temperature=0.0, max_tokens=8), output_len=0)
           for b in range(seqs)]
    return SchedulerOutput(seqs=out, num_prefill_tokens=n * seqs, num_decode_tokens=0)


def mixed_sched(prefill: int, decodes: int, ctx: int, block_size: int, vocab: int) -> SchedulerOutput:
    """A serving step with prefill work: one fresh prompt chunk beside `decodes` decodes."""
    dec = decode_sched(decodes, ctx, block_size, vocab).seqs
    first_free = max(b for s in dec for b in s.block_table) + 1
    gen = torch.Generator().manual_seed(prefill + decodes)
    table = list(range(first_free, first_free + -(-prefill // block_size)))
    pre = ScheduledSeq(request_id="p", token_ids=torch.randint(0, vocab, (prefill,), generator=gen).tolist(),
                       start_pos=0, block_table=table, sample=True,
                       sampling=SamplingParams(temperature=0.0, max_tokens=8), output_len=0)
    return SchedulerOutput(seqs=[pre] + dec, num_prefill_tokens=prefill, num_decode_tokens=decodes)


def step_flops(model, sched: SchedulerOutput, top_k: int | None = None) -> float:
    """Matrix flops of one step: every token through the dense weights and its top-k experts
    (`top_k` k' when shed), the sampled rows through lm_head, attention QK and PV over each
    token's causal context."""
    spec = model.spec
    k = spec.top_k if top_k is None else min(top_k, spec.top_k)
    dense = sum(p.numel() for n, p in model.named_parameters()
                if not n.endswith((".w13", ".w2")) and n not in ("embed_tokens.weight", "lm_head.weight"))
    dense += sum(shared_slot_params(m) for m in model.moe_layers())
    per_token = dense + len(model.moe_layers()) * k * 3 * spec.hidden_size * spec.moe_intermediate_size
    T = sum(len(s.token_ids) for s in sched.seqs)
    sampled = sum(s.sample for s in sched.seqs)
    pairs = sum(sum(s.start_pos + i + 1 for i in range(len(s.token_ids))) for s in sched.seqs)
    attn = 4 * pairs * spec.num_heads * spec.head_dim * spec.num_layers
    return 2 * T * per_token + 2 * sampled * spec.vocab_size * spec.hidden_size + attn


def stage_prefill(runner, wb, bw, peak, out_dir: Path) -> list[dict]:
    """Steps with prefill work (fresh prompts; a prompt chunk beside 63 decodes), eager vs
    CUDA graph, tau 1 vs 0: wall time per step (host included) against the step roofline,
    max(bytes / copy bandwidth, flops / measured bf16 matmul rate)."""
    rows = []
    vocab = runner.model.spec.vocab_size
    cases = [("prefill", T, prefill_sched(T, runner.block_size, vocab)) for T in (128, 512, 2048)] + \
            [("mixed", 512 + 63, mixed_sched(512, 63, 512, runner.block_size, vocab)),
             ("mixed", 1024 + 63, mixed_sched(1024, 63, 512, runner.block_size, vocab))]
    for kind, T, sched in cases:
        base = {}
        for graphs in (False, True):
            for tau in (1.0, 0.0):
                ms, touched = time_step(runner, sched, tau, graphs)
                kv = sum((s.start_pos + len(s.token_ids)) for s in sched.seqs) * wb["kv_per_token"]
                byts = wb["dense"] + sum(touched) * wb["expert"] + kv
                flops = step_flops(runner.model, sched)
                roof = max(byts / bw, flops / peak) * 1e3
                base.setdefault(graphs, ms)
                rows.append(dict(kind=kind, tokens=T, seqs=len(sched.seqs), cuda_graph=graphs, tau=tau,
                                 step_ms=ms, roofline_ms=roof, bytes_ms=byts / bw * 1e3,
                                 flops_ms=flops / peak * 1e3, ratio_roofline=ms / roof,
                                 vs_tau1=ms / base[graphs],
                                 experts_touched_mean=sum(touched) / max(1, len(touched))))
                log.info("prefill %s", rows[-1])
    (out_dir / "prefill.json").write_text(json.dumps(rows, indent=1))
    return rows


def step_roofline_s(wb: dict, touched: list[int], B: int, ctx: int, bw: float) -> float:
    byts = wb["dense"] + sum(touched) * wb["expert"] + B * (ctx + 1) * wb["kv_per_token"]
    return byts / bw


def time_step(runner: ModelRunner, sched: SchedulerOutput, tau: "float | Rungs", graphs: bool):
    """Milliseconds per step at `tau` (or the `Rungs` tau and k') and the slots it touched."""
    saved = runner.graphs
    if not graphs:
        runner.graphs = None
    try:
        out = runner.execute(sched, tau)
        ms = cuda_time_ms(lambda: runner.execute(sched, tau), iters=10)
    finally:
        runner.graphs = saved
    return ms, out.experts_touched


def replay_ms(runner: ModelRunner, sched: SchedulerOutput) -> float | None:
    """Milliseconds of the step's CUDA graph replayed alone (inputs already staged): the
    forward without the host's preparation, the logits and the sampler around it."""
    key = runner.graphs.dispatch(StepDescriptor.of(sched, routed=False))
    if key is None:
        return None
    return cuda_time_ms(runner.graphs.graphs[key].replay, iters=20)


def stage(runner: ModelRunner, key, sched: SchedulerOutput) -> None:
    """Stage a step's inputs into graph `key`'s buffers as `ModelRunner.forward` does (this
    engine: host lists then two copies; an engine without `_host_step`: its device uploads,
    then the graph's fill)."""
    if hasattr(runner, "_host_step"):
        runner.graphs._fill(key, runner._host_step(sched))
    else:
        ids, pos, meta = runner._prepare(sched)
        runner.graphs._fill(key, ids, pos, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                            meta.query_start_loc)


def host_phases_ms(runner: ModelRunner, sched: SchedulerOutput, iters: int = 20) -> dict:
    """Host (CPU) milliseconds of a graphed step's phases, medians, each started on an idle GPU:
    `prepare` (the step's inputs as host lists, staged into the graph's inputs: two copies),
    `replay` (the graph launch call alone),
    `launch` (`ModelRunner.launch`: prepare, fill, replay, logits and sampler queued) and
    `step` (launch + collect, the GPU included). The GPU idles for what precedes the replay."""
    import statistics

    key = runner.graphs.dispatch(StepDescriptor.of(sched, routed=False))
    graph = runner.graphs.graphs[key]
    timed: dict[str, list[float]] = {"prepare": [], "replay": [], "launch": [], "step": []}
    for i in range(iters + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stage(runner, key, sched)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        graph.replay()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        pending = runner.launch(sched, 1.0)
        t5 = time.perf_counter()
        runner.collect(pending)
        t6 = time.perf_counter()
        if i >= 3:
            for name, dt in (("prepare", t1 - t0), ("replay", t3 - t2), ("launch", t5 - t4), ("step", t6 - t4)):
                timed[name].append(dt * 1e3)
    return {k: statistics.median(v) for k, v in timed.items()}


def pipelined_ms(runner: ModelRunner, sched: SchedulerOutput, tau: "float | Rungs" = 1.0,
                 steps: int = 20) -> float | None:
    """Milliseconds per decode step when each step is launched before the previous one is
    collected and reads its input tokens from that step's samples on the device (the
    engine's async scheduling): the period at which the host's work hides behind the GPU's.
    None for an engine without steps planned ahead."""
    import inspect

    if "prev" not in inspect.signature(runner.launch).parameters:
        return None
    ahead = SchedulerOutput(seqs=sched.seqs, num_prefill_tokens=0, num_decode_tokens=len(sched.seqs),
                            prev_rows=list(range(len(sched.seqs))))
    pending = runner.launch(sched, tau)
    for timed in (False, True):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps if timed else 3):
            nxt = runner.launch(ahead, tau, prev=pending)
            runner.collect(pending)
            pending = nxt
        if timed:
            runner.collect(pending)
            return (time.perf_counter() - t0) * 1e3 / steps
    return None


def shed_levels(k: int) -> list[int]:
    """The k' of the shed stage: k, k - 1, k / 2 and 1, distinct, largest first."""
    return sorted({k, max(1, k - 1), max(1, k // 2), 1}, reverse=True)


def shed_cases(block_size: int, vocab: int) -> list[tuple[str, int, SchedulerOutput]]:
    return [("prefill", T, prefill_sched(T, block_size, vocab)) for T in SHED_PREFILL_TOKENS] + \
        [("decode", SHED_DECODE_BATCH,
          decode_sched(SHED_DECODE_BATCH, SHED_DECODE_CONTEXT, block_size, vocab))]


def graph_of(runner, sched: SchedulerOutput, rungs: Rungs) -> str | None:
    """The graph a step at `rungs` replays ("mixed:2048:dimmed"), None when it runs eager."""
    if runner.graphs is None:
        return None
    shed = runner.shed_to(rungs) is not None
    key = runner.graphs.dispatch(StepDescriptor.of(sched, routed=rungs.tau < 1.0, shed=shed))
    return None if key is None else f"{key.kind}:{key.size}:{'dimmed' if key.routed else 'plain'}"


def stage_shed(runner, wb, bw, peak, out_dir: Path, timer=time_step) -> list[dict]:
    """Expert shedding: graphed steps at every (k', tau) of `shed_levels` x {1, 0}, wall time
    per step against the roofline at that k' (bytes of the slots touched, flops of k' experts
    per token) and against k' = k, tau = 1 of the same step."""
    rows = []
    model = runner.model
    k = model.spec.top_k
    for kind, T, sched in shed_cases(runner.block_size, model.spec.vocab_size):
        base = None
        kv = sum(s.start_pos + len(s.token_ids) for s in sched.seqs) * wb["kv_per_token"]
        for top_k in shed_levels(k):
            for tau in (1.0, 0.0):
                rungs = Rungs(tau=tau, top_k=top_k)
                ms, touched = timer(runner, sched, rungs, True)
                byts = wb["dense"] + sum(touched) * wb["expert"] + kv
                flops = step_flops(model, sched, top_k)
                roof = max(byts / bw, flops / peak) * 1e3
                base = base or ms  # the first case is k' = k, tau = 1
                rows.append(dict(kind=kind, tokens=T, seqs=len(sched.seqs), top_k=top_k, tau=tau,
                                 graph=graph_of(runner, sched, rungs), step_ms=ms, roofline_ms=roof,
                                 bytes_ms=byts / bw * 1e3, flops_ms=flops / peak * 1e3,
                                 ratio_roofline=ms / roof, vs_full=ms / base,
                                 experts_touched_mean=sum(touched) / max(1, len(touched))))
                log.info("shed %s", rows[-1])
    (out_dir / "shed.json").write_text(json.dumps(rows, indent=1))
    return rows


def stage_decode(runner, wb, bw, out_dir: Path, gen, graph_modes=(False, True)) -> list[dict]:
    rows = []
    for ctx in (512, 2048):
        for B in (1, 8, 32, 64, 128):
            if B * (ctx + 1) > runner.num_blocks * runner.block_size:
                continue
            sched = decode_sched(B, ctx, runner.block_size, runner.model.spec.vocab_size)
            for graphs in graph_modes:
                ms, touched = time_step(runner, sched, 1.0, graphs)
                roof = step_roofline_s(wb, touched, B, ctx, bw) * 1e3
                rows.append(dict(ctx=ctx, batch=B, cuda_graph=graphs, step_ms=ms, roofline_ms=roof,
                                 ratio=ms / roof, experts_touched_mean=sum(touched) / len(touched)))
                if graphs and runner.graphs is not None:
                    rows[-1]["replay_ms"] = replay_ms(runner, sched)
                    rows[-1]["host_ms"] = host_phases_ms(runner, sched)
                    rows[-1]["pipelined_ms"] = pipelined_ms(runner, sched)
                log.info("decode %s", rows[-1])
    (out_dir / "decode.json").write_text(json.dumps(rows, indent=1))
    return rows


def stage_profile(runner, out_dir: Path, sched: SchedulerOutput, tag: str, graphs: bool = True,
                  tau: float = 1.0) -> dict:
    """Where a step's time goes: kernel totals over 5 steps (CUDA-graph replays, or eager
    steps, where the table sorted by host time shows the launch cost)."""
    from torch.profiler import ProfilerActivity, profile

    saved = runner.graphs
    if not graphs:
        runner.graphs = None
    for _ in range(3):
        runner.execute(sched, tau)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner.execute(sched, tau)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    runner.graphs = saved
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if dev_us and ev.device_type.name == "CUDA":
            rows.append(dict(name=ev.key[:120], calls=ev.count // 5, device_us_per_step=dev_us / 5))
    rows.sort(key=lambda r: -r["device_us_per_step"])
    result = dict(tag=tag, tokens=sum(len(s.token_ids) for s in sched.seqs), seqs=len(sched.seqs),
                  cuda_graph=graphs, tau=tau, profiled_wall_ms_per_step=wall_ms, kernels=rows,
                  total_device_us_per_step=sum(r["device_us_per_step"] for r in rows),
                  timeline=kernel_timeline(prof, steps=5))
    (out_dir / f"profile_{tag}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"profile_{tag}.txt").write_text(
        prof.key_averages().table(sort_by="device_time_total", row_limit=40) + "\n\n" +
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    log.info("profile %s: %.0f us of kernels per step, %.1f ms wall per profiled step", tag,
             result["total_device_us_per_step"], wall_ms)
    return result


def kernel_timeline(prof, steps: int) -> dict:
    """The last profiled step's kernels in launch order (name, start and duration in us from
    the step's first kernel) and the idle time before each kernel name within a step: where a
    graph's time between kernels goes."""
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                     key=lambda e: e.time_range.start)
    per_step = len(kernels) // steps
    last = kernels[-per_step:] if per_step else []
    t0 = last[0].time_range.start if last else 0
    order = [dict(name=e.name[:80], start_us=round(e.time_range.start - t0, 2),
                  dur_us=round(e.time_range.end - e.time_range.start, 2)) for e in last]
    idle: dict[str, list[float]] = {}
    for prev, e in zip(last, last[1:]):
        idle.setdefault(e.name[:80], []).append(max(0.0, e.time_range.start - prev.time_range.end))
    gaps = {k: dict(calls=len(v), idle_us_total=round(sum(v), 1), idle_us_mean=round(sum(v) / len(v), 2))
            for k, v in idle.items()}
    span = (last[-1].time_range.end - t0) if last else 0.0
    return dict(span_us=round(span, 1), busy_us=round(sum(o["dur_us"] for o in order), 1),
                idle_before=gaps, kernels=order)


def moe_layer_graph(moe, x, tau_t, with_routing: bool):
    ctx = ForwardContext(tau=tau_t if with_routing else None, use_kernels=True)
    moe(x, ctx)  # warm-up / compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, touched = moe(x, ctx)
    return graph, touched


def stage_brownout(runner, wb, bw, out_dir: Path, gen) -> dict:
    model = runner.model
    moe = model.moe_layers()[0]
    D = model.spec.hidden_size
    result = dict(moe_layer=[], decode=[], routing_overhead=[])
    for way in (4, 2, 8):
        install_uncalibrated(model, way)
        for B in (8, 16, 32, 64, 128):
            x = torch.randn(B, D, dtype=torch.bfloat16, device="cuda", generator=gen) * 0.5
            tau_t = torch.ones((), device="cuda")
            g_plain, _ = moe_layer_graph(moe, x, tau_t, with_routing=False)
            g_route, touched_t = moe_layer_graph(moe, x, tau_t, with_routing=True)
            base = cuda_time_ms(g_plain.replay, iters=50)
            if way == 4:
                routed = cuda_time_ms(g_route.replay, iters=50)
                result["routing_overhead"].append(dict(batch=B, plain_ms=base, routed_tau1_ms=routed,
                                                       overhead=routed / base - 1))
            for tau in TAUS:
                tau_t.fill_(tau)
                ms = cuda_time_ms(g_route.replay, iters=50)
                touched = int(touched_t)
                roof = (touched * wb["expert"] + wb["moe_layer_dense"] + 4 * B * D * 2) / bw * 1e3
                result["moe_layer"].append(dict(way=way, batch=B, tau=tau, ms=ms, slots_touched=touched,
                                                roofline_ms=roof, ratio_roofline=ms / roof,
                                                vs_no_brownout=ms / base))
                log.info("moe %s", result["moe_layer"][-1])
        for B in (8, 32, 64, 128):
            sched = decode_sched(B, 512, runner.block_size, model.spec.vocab_size)
            base_ms = base_period = None
            for tau in TAUS:
                ms, touched = time_step(runner, sched, tau, graphs=True)
                base_ms = base_ms or ms
                period = pipelined_ms(runner, sched, tau)
                base_period = base_period or period
                roof = step_roofline_s(wb, touched, B, 512, bw) * 1e3
                result["decode"].append(dict(way=way, batch=B, ctx=512, tau=tau, step_ms=ms,
                                             vs_tau1=ms / base_ms, roofline_ms=roof, ratio_roofline=ms / roof,
                                             experts_touched_mean=sum(touched) / len(touched),
                                             pipelined_ms=period,
                                             pipelined_vs_tau1=period / base_period if period else None,
                                             pipelined_ratio_roofline=period / roof if period else None))
                log.info("decode-tau %s", result["decode"][-1])
    (out_dir / "brownout.json").write_text(json.dumps(result, indent=1))
    return result


def stage_offline(out_dir: Path, n_prompts: int = 64, prompt_len: int = 128, out_len: int = 128,
                  preset: str = PRESET, device: str = "cuda") -> dict:
    from transformers import GenerationConfig

    from brownout.engine.llm import LLM
    from brownout.models.registry import preset_config
    from brownout.runner.weights import load_tensors

    cfg = preset_config(preset)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (n_prompts, prompt_len), generator=gen)
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    gcfg = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    ids = prompts.to(device)
    with torch.inference_mode():
        hf.generate(ids[:2, :16], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                                                                   pad_token_id=0))
        sync()
        t0 = time.perf_counter()
        hf_out = hf.generate(ids, generation_config=gcfg)
        sync()
        hf_s = time.perf_counter() - t0
    hf_tokens = hf_out[:, prompt_len:].tolist()
    # transformers' weights go into the built engine, whose graphs hold its tensors: the shared
    # expert stays a module of its own (folding replaces the expert tensors)
    llm = LLM(preset, load_format="dummy", device=device, dtype="bfloat16", fold_shared_expert=False,
              cache=CacheConfig(num_blocks=n_prompts * ((prompt_len + out_len) // 16 + 2)),
              scheduler=__import__("brownout.config", fromlist=["SchedulerConfig"]).SchedulerConfig(
                  max_num_seqs=n_prompts, max_num_batched_tokens=8192))
    load_tensors(llm.engine.runner.model, hf.state_dict(), "transformers' state dict")
    del hf
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate([p[:16] for p in prompts.tolist()[:4]], SamplingParams(max_tokens=4, temperature=0))
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts.tolist(), sp)
    ours_s = time.perf_counter() - t0
    same = sum(o.token_ids[:16] == h[:16] for o, h in zip(outs, hf_tokens))
    result = dict(n_prompts=n_prompts, prompt_len=prompt_len, out_len=out_len,
                  transformers_s=hf_s, transformers_tok_s=n_prompts * out_len / hf_s,
                  ours_s=ours_s, ours_tok_s=n_prompts * out_len / ours_s, speedup=hf_s / ours_s,
                  shared_expert="unfolded",
                  first16_tokens_equal=f"{same}/{n_prompts}")
    log.info("offline %s", result)
    (out_dir / "offline.json").write_text(json.dumps(result, indent=1))
    del llm
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    return result


LOOP_BATCHES = (1, 8, 64)
LOOP_PROMPT = 512  # prompt tokens of each request: the decode stage's context
LOOP_OUTPUT = 48  # tokens each request generates: enough steady decode steps to take a median
LOOP_QUEUE_REQUESTS = 512  # the queue part: eight batches' worth, so steps mix chunks and decodes


def stage_loop(out_dir: Path, wb: dict, bw: float, preset: str = PRESET, device: str = "cuda",
               batches=LOOP_BATCHES, prompt_len: int = LOOP_PROMPT, out_len: int = LOOP_OUTPUT) -> list[dict]:
    """The engine's loop on dummy weights: per batch size B, B requests of LOOP_PROMPT random
    tokens generate LOOP_OUTPUT tokens each (EOS ignored), once with async scheduling and once
    without, in one engine. The period of a decode step is the median time between two
    `step()` calls that each collected a decode step of all B requests: what a streaming
    client sees between tokens, the scheduler and the output building included."""
    import dataclasses
    import statistics

    from brownout.config import SchedulerConfig
    from brownout.engine.llm import LLM

    gen = torch.Generator().manual_seed(1)
    blocks = max(batches) * -(-(prompt_len + out_len + 16) // 16) + 64
    llm = LLM(preset, load_format="dummy", device=device, dtype="bfloat16" if device == "cuda" else "float32",
              cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
              scheduler=SchedulerConfig(max_num_seqs=max(batches)))
    engine = llm.engine
    vocab = engine.spec.vocab_size
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    rows = []
    for B in batches:
        for on in (True, False):
            engine.config = dataclasses.replace(
                engine.config, scheduler=dataclasses.replace(engine.config.scheduler, async_scheduling=on))
            for i in range(B):
                prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
                engine.add_request(f"loop{B}-{on}-{i}", prompt, sp)
            stamps, touched = [], []
            while engine.has_unfinished_requests():
                engine.step()
                st = engine.fresh_step_stats
                full = st is not None and not st.has_prefill and st.batch_size == B
                stamps.append((time.perf_counter(), full))
                if full:
                    touched.append(st.experts_touched)
            gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:]) if a[1] and b[1]]
            ctx = prompt_len + out_len // 2
            slots = [sum(t) / len(t) for t in zip(*touched)] if touched else []
            roof = step_roofline_s(wb, slots, B, ctx, bw) * 1e3 if slots else None
            period = statistics.median(gaps) * 1e3 if gaps else None
            rows.append(dict(batch=B, async_scheduling=on, prompt=prompt_len, output=out_len,
                             decode_steps_timed=len(gaps), period_ms=period, roofline_ms=roof,
                             ratio=period / roof if period and roof else None,
                             period_p90_ms=sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1e3 if gaps else None))
            log.info("loop %s", rows[-1])
    # a queue: LOOP_QUEUE_REQUESTS requests offered at once to a batch of max(batches), so
    # most steps carry prompt chunks and admissions beside the decodes
    n_req = LOOP_QUEUE_REQUESTS if device == "cuda" else 2 * max(batches)
    for on in (True, False):
        engine.config = dataclasses.replace(
            engine.config, scheduler=dataclasses.replace(engine.config.scheduler, async_scheduling=on))
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(n_req)]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        wall = time.perf_counter() - t0
        rows.append(dict(kind="queue", async_scheduling=on, requests=n_req, prompt=prompt_len, output=out_len,
                         max_num_seqs=max(batches), wall_s=wall,
                         output_tok_s=sum(len(o.token_ids) for o in outs) / wall,
                         total_tok_s=n_req * (prompt_len + out_len) / wall))
        log.info("loop %s", rows[-1])
    (out_dir / "loop.json").write_text(json.dumps(rows, indent=1))
    del llm, engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# the steps the profile stage knows, by tag (decode batches at context 512, mixed and prefill steps)
PROFILE_TAGS = ("b1", "b8", "b64", "b64_tau0", "mixed575", "mixed575_tau0", "mixed1087", "mixed1087_tau0",
                "prefill2048")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="decode,profile,brownout,offline")
    ap.add_argument("--graphs-only", action="store_true", help="decode stage: CUDA-graphed steps only")
    ap.add_argument("--profile-tags", default=",".join(PROFILE_TAGS),
                    help=f"profile stage: steps to profile, comma-separated, of {','.join(PROFILE_TAGS)}")
    ap.add_argument("--no-fold-shared", action="store_true",
                    help="keep the shared expert a module of its own (the layout before folding)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, preset=PRESET,
                weights="dummy (random normal, std 0.02), bf16")
    meta["copy_bandwidth_Bps"] = bw = copy_bandwidth()
    meta["matmul_flops"] = matmul_flops()
    log.info("copy bandwidth %.2f TB/s, bf16 matmul %.0f TFLOP/s", bw / 1e12, meta["matmul_flops"] / 1e12)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    if {"decode", "brownout", "profile", "prefill", "shed"} & set(stages):
        # the flag only when asked: the script also times older engine trees (PYTHONPATH)
        fold = dict(fold_shared_expert=False) if args.no_fold_shared else {}
        loaded = load_model(ModelLoadConfig(model=PRESET, load_format="dummy", device="cuda",
                                            dtype="bfloat16", extra_expert_slots=30, **fold))
        install_uncalibrated(loaded.model, 4)  # so the captured graphs include routing
        num_blocks = 64 * -(-2049 // 16) + 64
        runner = ModelRunner(loaded, CacheConfig(num_blocks=num_blocks), max_batch=128,
                             max_model_len=4096)
        for k, v in runner.kv_caches:
            k.normal_(generator=gen)
            v.normal_(generator=gen)
        wb = weight_bytes(loaded.model)
        meta["weight_bytes"] = wb
        (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
        if "decode" in stages:
            stage_decode(runner, wb, bw, args.out, gen, (True,) if args.graphs_only else (False, True))
        if "profile" in stages:
            bs, vocab = runner.block_size, loaded.spec.vocab_size
            steps = {"b1": (lambda: decode_sched(1, 512, bs, vocab), 1.0),
                     "b8": (lambda: decode_sched(8, 512, bs, vocab), 1.0),
                     "b64": (lambda: decode_sched(64, 512, bs, vocab), 1.0),
                     "b64_tau0": (lambda: decode_sched(64, 512, bs, vocab), 0.0),
                     "mixed575": (lambda: mixed_sched(512, 63, 512, bs, vocab), 1.0),
                     "mixed575_tau0": (lambda: mixed_sched(512, 63, 512, bs, vocab), 0.0),
                     "mixed1087": (lambda: mixed_sched(1024, 63, 512, bs, vocab), 1.0),
                     "mixed1087_tau0": (lambda: mixed_sched(1024, 63, 512, bs, vocab), 0.0),
                     "prefill2048": (lambda: prefill_sched(2048, bs, vocab), 1.0)}
            for tag in args.profile_tags.split(","):
                make, tau = steps[tag]
                sched = make()
                try:
                    stage_profile(runner, args.out, sched, tag, graphs=True, tau=tau)
                except Exception:  # a profiler problem must not cost the other stages
                    log.exception("profile stage failed")
        if "prefill" in stages:
            stage_prefill(runner, wb, bw, meta["matmul_flops"], args.out)
        if "shed" in stages:  # before `brownout`, which reinstalls the united experts
            stage_shed(runner, wb, bw, meta["matmul_flops"], args.out)
        if "brownout" in stages:
            stage_brownout(runner, wb, bw, args.out, gen)
        del runner, loaded
        gc.collect()
        torch.cuda.empty_cache()
    if "loop" in stages:
        if "weight_bytes" not in meta:  # the loop's roofline needs the byte counts
            loaded = load_model(ModelLoadConfig(model=PRESET, load_format="dummy", device="cuda",
                                                dtype="bfloat16"))
            meta["weight_bytes"] = weight_bytes(loaded.model)
            (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
            del loaded
            gc.collect()
            torch.cuda.empty_cache()
        stage_loop(args.out, meta["weight_bytes"], bw)
    if "offline" in stages:
        stage_offline(args.out)


if __name__ == "__main__":
    main()
