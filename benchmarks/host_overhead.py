"""Host time of the engine loop outside the model: what one serving step costs the CPU
besides `ModelRunner.execute` (scheduling, controller, detokenisation, output packing,
the pickling of the step's outputs for the HTTP process).

The runner is replaced by a stub that samples a random token for every sequence and
reports expert counts, so the figure is the engine's own per-step host cost at a given
number of running requests, on whatever machine runs it. On the GPU the serialized part of
this cost is paid between steps, where the GPU idles.

`serialized_ms_per_step` is the part between collecting a step's results and launching the
next (scheduling, token bookkeeping, the controller): the GPU waits for it; the rest of the
host time (detokenisation, outputs, request intake) overlaps the launched step.

Run: python benchmarks/host_overhead.py [--running 128] [--steps 300] [--profile FILE]
       [--out benchmarks/results/engine/host_overhead_cpu.json]
With --out the rows are appended to that JSON file and its markdown table is rewritten.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pickle
import platform
import pstats
import random
import time
from pathlib import Path

from brownout.config import CacheConfig, EngineConfig, ModelLoadConfig, SchedulerConfig, SLOConfig
from brownout.engine.gc_pauses import GCPauses, freeze_startup_heap
from brownout.engine.llm_engine import LLMEngine
from brownout.engine.worker import WorkerOptions, _Session
from brownout.types import RunnerOutput, SamplingParams


class _Pipe:
    """Stands in for the multiprocessing queue: pickles what a step sends, as the queue's
    feeder thread would."""

    def __init__(self):
        self.bytes = 0

    def put(self, item):
        self.bytes += len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


def stub_runner(engine: LLMEngine, vocab: int, layers: int):
    rng = random.Random(0)

    serial = []  # host time from a step's results to the next launch: the GPU idles then
    collected = [None]

    def launch(sched, tau=1.0):
        if collected[0] is not None:
            serial.append(time.perf_counter() - collected[0])
        return RunnerOutput(sampled={s.request_id: rng.randrange(3, vocab) for s in sched.seqs if s.sample},
                            experts_touched=[20] * layers, tau=tau)

    def collect(pending):
        collected[0] = time.perf_counter()
        return pending

    engine.runner.launch, engine.runner.collect = launch, collect
    engine.runner.execute = lambda sched, tau=1.0: collect(launch(sched, tau))  # callers of the one-call API
    return serial


def run(running: int, steps: int, prompt_len: int, policy: str, profile: str | None,
        gc_freeze: bool = True) -> dict:
    from brownout.config import BrownoutConfig
    from brownout.defaults import default_model_dir

    # KV blocks for every running request (the stub runner never touches them)
    cfg = EngineConfig(load=ModelLoadConfig(model=str(default_model_dir()), device="cpu"),
                       cache=CacheConfig(num_blocks=running * 80),
                       scheduler=SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=1024),
                       brownout=BrownoutConfig(united_experts="average:4"),
                       slo=SLOConfig(policy=policy, ttft_s=1.0, tpot_s=0.05, check_interval_s=1.0))
    engine = LLMEngine(cfg)
    if gc_freeze:  # as the server's engine process does once the engine is built
        freeze_startup_heap()
    pauses = GCPauses().install()
    vocab = min(engine.spec.vocab_size, len(engine.tokenizer))
    serial = stub_runner(engine, vocab, engine.spec.num_layers)
    session = _Session(engine, WorkerOptions(), _Pipe())
    rng = random.Random(1)
    pool = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(64)]  # not timed
    n = 0

    def top_up():  # keep a queue: every step has prefill work, as during a burst
        nonlocal n
        while len(engine.requests) < running + 8:
            engine.add_request(f"r{n}", pool[n % len(pool)], SamplingParams(max_tokens=rng.randint(64, 160), ignore_eos=True,
                                                               temperature=1.0))
            n += 1

    top_up()
    warm = 0
    while len(engine.scheduler.running) < running and warm < 5000:  # fill the batch first
        session.step()
        top_up()
        warm += 1
    sizes = []
    serial.clear()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(steps):
        session.step()
        sizes.append(len(engine.scheduler.running))
        top_up()
    if prof:
        prof.disable()
        prof.dump_stats(profile)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    per_step = (time.perf_counter() - t0) / steps
    gc_stats = pauses.snapshot()
    pauses.uninstall()
    return dict(max_running=running, mean_running=sum(sizes) / len(sizes), steps=steps,
                host_ms_per_step=per_step * 1e3,
                serialized_ms_per_step=1e3 * sum(serial) / max(1, len(serial)),
                pickled_kb_per_step=session.out_q.bytes / (steps + warm) / 1e3, policy=policy,
                gc_freeze=gc_freeze, gc_full_collections=gc_stats["gc_collections"]["2"],
                gc_longest_ms=1e3 * gc_stats["gc_longest_s"],
                gc_ms_per_step=1e3 * sum(gc_stats["gc_seconds"].values()) / (steps + warm))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompt-len", type=int, default=700)
    ap.add_argument("--policy", default="predictive")
    ap.add_argument("--profile", default=None, help="write a cProfile of the largest batch here")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--out", type=Path, default=None, help="append the rows to this JSON file")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="leave the startup heap to the garbage collector (the server freezes it)")
    args = ap.parse_args()
    rows = []
    for i, r in enumerate(args.running):
        last = i == len(args.running) - 1
        rows.append(dict(label=args.label, **run(r, args.steps, args.prompt_len, args.policy,
                                                   args.profile if last else None,
                                                   gc_freeze=not args.no_gc_freeze)))
        print(json.dumps(rows[-1]))
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {"machine": platform.platform(), "rows": []}
        old["rows"] += rows
        args.out.write_text(json.dumps(old, indent=1))
        write_table(args.out)


def write_table(path: Path) -> None:
    data = json.loads(path.read_text())
    md = ["# Engine host time per step outside the model", "",
          f"Machine: {data['machine']} (the development box, 2 cores). `benchmarks/host_overhead.py`: "
          "the engine loop with a stub runner (random tokens; real tokenizer, scheduler, predictive "
          "controller, output packing and pickling), 700-token prompts, a queue kept non-empty so every "
          "step carries prefill work, as in a burst. Host CPU time of this box, not serving performance: "
          "the H200 machine showed 2-3x larger gaps than this harness gives for the same code. "
          "`serialized` = from a step's results to the next launch (the GPU waits for it); the code "
          "before the overlapped loop serialized all of it. GC columns: the harness process's garbage "
          "collections during the run (`brownout/engine/gc_pauses.py`; full = generation 2); 'frozen' = "
          "the startup heap frozen (`gc.freeze`) as the server's engine process does.", "",
          "| code | max running | mean running | host ms / step | serialized ms / step | full GCs | longest GC ms "
          "| GC ms / step |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        gc_cells = (f"{r['gc_full_collections']} | {r['gc_longest_ms']:.1f} | {r['gc_ms_per_step']:.2f}"
                    if "gc_longest_ms" in r else "- | - | -")
        md.append(f"| {r['label']} | {r['max_running']} | {r['mean_running']:.1f} | {r['host_ms_per_step']:.2f} | "
                  f"{r['serialized_ms_per_step']:.2f} | {gc_cells} |")
    path.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
