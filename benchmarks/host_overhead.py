"""Host time of the engine loop outside the model: what one serving step costs the CPU
besides `ModelRunner.execute` (scheduling, controller, detokenisation, output packing,
the pickling of the step's outputs for the HTTP process).

The runner is replaced by a stub that samples a random token for every sequence and
reports expert counts, so the figure is the engine's own per-step host cost at a given
number of running requests, on whatever machine runs it. On the GPU this cost is paid
between steps, where the GPU idles (the headline runs measured 5-12 ms per step with
64-128 running requests, `benchmarks/results/headline_h200_run5.md`).

Run: python benchmarks/host_overhead.py [--running 128] [--steps 300] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pickle
import pstats
import random
import time

from brownout.config import CacheConfig, EngineConfig, ModelLoadConfig, SchedulerConfig, SLOConfig  # noqa: I001
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

    def execute(sched, tau=1.0):
        return RunnerOutput(sampled={s.request_id: rng.randrange(3, vocab) for s in sched.seqs if s.sample},
                            experts_touched=[20] * layers, tau=tau)

    engine.runner.execute = execute


def run(running: int, steps: int, prompt_len: int, policy: str, profile: str | None) -> dict:
    from brownout.config import BrownoutConfig
    from brownout.defaults import default_model_dir

    # KV blocks for every running request (the stub runner never touches them)
    cfg = EngineConfig(load=ModelLoadConfig(model=str(default_model_dir()), device="cpu"),
                       cache=CacheConfig(num_blocks=running * 80),
                       scheduler=SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=1024),
                       brownout=BrownoutConfig(united_experts="average:4"),
                       slo=SLOConfig(policy=policy, ttft_s=1.0, tpot_s=0.05, check_interval_s=1.0))
    engine = LLMEngine(cfg)
    vocab = min(engine.spec.vocab_size, len(engine.tokenizer))
    stub_runner(engine, vocab, engine.spec.num_layers)
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
    return dict(max_running=running, mean_running=sum(sizes) / len(sizes), steps=steps,
                host_ms_per_step=per_step * 1e3,
                pickled_kb_per_step=session.out_q.bytes / (steps + warm) / 1e3, policy=policy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompt-len", type=int, default=700)
    ap.add_argument("--policy", default="predictive")
    ap.add_argument("--profile", default=None, help="write a cProfile of the largest batch here")
    args = ap.parse_args()
    rows = []
    for i, r in enumerate(args.running):
        last = i == len(args.running) - 1
        rows.append(run(r, args.steps, args.prompt_len, args.policy, args.profile if last else None))
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
