"""Fit a step-cost profile for `brownout simulate` from committed GPU measurements.

Inputs (all committed):
  engine results  benchmarks/results/engine/engine_<gpu>_run*.json: graphed decode steps by
                  batch and context (tau 1), decode steps by batch and tau (way 4), steps
                  with prefill work by tokens (fresh prompts; a chunk beside 63 decodes),
                  tau 1 and 0. These fit the per-phase linear model (`brownout.sim.profile`)
                  and its relative residuals, the noise a simulated step draws.
  headline runs   benchmarks/results/headline/headline_<gpu>_runN.json, *_steps.json and
                  raw/*/{policy}/requests.jsonl.gz: the step latencies the server reported
                  under load, by phase, in 3-s windows with the running requests and the
                  scraped tau. The ratio of those means to the graphed model at the
                  window's shape is each phase's serving factor (host work around a graphed
                  step); the KV blocks and CUDA-graph buckets from the server's log; the host time between steps, and the unloaded TTFT less a lone
                  prefill step (the request's path in and out of the engine), come from
                  the same files.

With --trace (the Azure conversation trace the headline runs replayed), the serving factors
are then refined by simulation: the headline runs are simulated with brownout off, and each
phase's factor is scaled by measured / simulated mean step latency, `--refine` times. So
the off policy's mean step latencies are fitted, not predicted; every other simulated
figure (windows, goodput, refusals, tau, and all of aimd and predictive) is not.

  python benchmarks/fit_profile.py --gpu h200 --engine-runs 3,5,6 --headline-runs 15,16,17 \
      --trace ../shared/data/traces/azure_llm_2023_conv.csv --out brownout/sim/profiles/h200.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path

import numpy as np

from sim_headline import headline_setup

from brownout.sim.profile import (KILO, RoutingShape, StepCostProfile, StepShape, fit_phase,
                                  step_features)
from brownout.sim.run import sim_requests, simulate_requests

RESULTS = Path(__file__).resolve().parent / "results"
DECODE_FEATURES = ("one", "batch", "kctx", "experts", "routed")
PREFILL_FEATURES = ("one", "ktokens", "batch", "kctx", "experts")
# the engine benchmark's shapes (benchmarks/bench_engine.py): fresh prompts come as 4
# sequences; a mixed step is one prompt chunk beside 63 decodes at context 512
PREFILL_SEQS = 4
MIXED_DECODES, MIXED_CTX = 63, 512
# the united experts the headline servers ran (`--united-experts average:4`)
WAY = 4


def engine_rows(runs: list[int], gpu: str):
    """(phase, shape, tau, k' (None: the model's k), measured ms) of every graphed step measurement."""
    out, meta = [], None
    for n in runs:
        d = json.loads((RESULTS / "engine" / f"engine_{gpu}_run{n}.json").read_text())
        meta = d["meta"]
        for r in d.get("decode", []):
            if r["cuda_graph"]:
                B = r["batch"]
                out.append(("decode", StepShape(B, B, B * (r["ctx"] + 1), False), 1.0, None, r["step_ms"]))
        for r in d.get("brownout", {}).get("decode", []):
            if r["way"] == WAY:
                B = r["batch"]
                out.append(("decode", StepShape(B, B, B * (r["ctx"] + 1), False), r["tau"], None, r["step_ms"]))
        for r in d.get("prefill", []):
            if not r["cuda_graph"]:
                continue
            T = r["tokens"]
            if r["kind"] == "prefill":
                shape = StepShape(T, PREFILL_SEQS, T, True)
            else:
                chunk = T - MIXED_DECODES
                shape = StepShape(T, MIXED_DECODES + 1, chunk + MIXED_DECODES * (MIXED_CTX + 1), True)
            out.append(("prefill", shape, r["tau"], None, r["step_ms"]))
    return out, meta


def grid_rows(path: Path):
    """(phase, shape, tau, k' or None, ms) of the rows `benchmarks/bench_step_cost.py` wrote."""
    d = json.loads(Path(path).read_text())
    return [(r["phase"], StepShape(r["tokens"], r["batch"], r["context_tokens"], r["phase"] == "prefill"),
             r["tau"], r.get("top_k"), r["step_ms"]) for r in d["rows"]], d["meta"]


def mean_context(gpu: str, runs: list[int]) -> tuple[float, float]:
    """(mean prompt tokens, time-weighted mean context of a running request) over the
    headline runs' requests: a request runs about as many steps as it has output tokens,
    and its context grows from its prompt to prompt + output."""
    prompts, weighted, weights = [], 0.0, 0.0
    for n in runs:
        for path in sorted((RESULTS / "headline" / "raw" / f"headline_{gpu}_run{n}").glob("*/requests.jsonl.gz")):
            for line in gzip.open(path, "rt"):
                r = json.loads(line)
                if r.get("status") != 200 or not r.get("prompt_tokens"):
                    continue
                p, o = r["prompt_tokens"], r.get("output_tokens") or 0
                prompts.append(p)
                weighted += (p + o / 2) * o
                weights += o
    return statistics.fmean(prompts), weighted / weights


def serving_factors(profile: StepCostProfile, gpu: str, runs: list[int], budget: int,
                    prompt: float, ctx: float) -> dict[str, float]:
    """Per phase: step-weighted mean of (served mean step) / (model at the window's shape)."""
    num = {"prefill": 0.0, "decode": 0.0}
    den = {"prefill": 0.0, "decode": 0.0}
    for n in runs:
        steps = json.loads((RESULTS / "headline" / f"headline_{gpu}_run{n}_steps.json").read_text())
        for policy in steps.values():
            for w in policy["windows"]:
                B = int(w["running"])
                if B < 1:
                    continue
                shapes = {"decode": StepShape(B, B, int(B * ctx), False),
                          "prefill": StepShape(min(budget, B - 1 + int(prompt)), B,
                                               int((B - 1) * ctx + prompt), True)}
                for phase, shape in shapes.items():
                    k = w.get(f"{phase}_steps") or 0
                    if k and w.get(f"{phase}_mean_ms"):
                        model = profile.phases[phase]
                        pred = model.mean_ms(step_features(shape, w[f"tau_{phase}"], profile.routing,
                                                           profile.graph_buckets))
                        num[phase] += k * w[f"{phase}_mean_ms"]
                        den[phase] += k * pred
    return {p: num[p] / den[p] for p in num}


def host_and_edge(gpu: str, runs: list[int]) -> tuple[float, float, str]:
    gaps, unloaded, date = [], [], ""
    for n in runs:
        steps = json.loads((RESULTS / "headline" / f"headline_{gpu}_run{n}_steps.json").read_text())
        gaps += [p["burst"]["host_ms_between_steps"] for p in steps.values()]
        head = json.loads((RESULTS / "headline" / "raw" / f"headline_{gpu}_run{n}" / "headline.json").read_text())
        unloaded.append(head["calibration"]["unloaded_ttft_s"])
        meta = json.loads((RESULTS / "headline" / "raw" / f"headline_{gpu}_run{n}" / "off" / "meta.json").read_text())
        date = max(date, meta["started_at"][:10])
    return statistics.fmean(gaps) / KILO, statistics.fmean(unloaded), date


_BLOCKS = re.compile(r"KV cache: (\d+) blocks of (\d+) tokens")
_BUCKETS = re.compile(r"decode batch sizes \[([\d, ]+)\], mixed-step token counts \[([\d, ]+)\]")


def server_facts(gpu: str, run: int) -> tuple[int, int, dict[str, list[int]]]:
    """(KV blocks, block size, CUDA graph buckets) from a headline server's log."""
    path = RESULTS / "headline" / "raw" / f"headline_{gpu}_run{run}" / "server-off.log.gz"
    text = gzip.open(path, "rt").read()
    blocks, buckets = _BLOCKS.search(text), _BUCKETS.search(text)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    return (int(blocks.group(1)), int(blocks.group(2)),
            {"decode_batch": ints(buckets.group(1)), "prefill_tokens": ints(buckets.group(2))})


def fit(gpu: str, engine_runs: list[int], headline_runs: list[int], budget: int,
        grid: Path | None = None) -> StepCostProfile:
    rows, meta = grid_rows(grid) if grid else engine_rows(engine_runs, gpu)
    routing = RoutingShape(way=WAY)
    phases = {}
    for phase, names in (("decode", DECODE_FEATURES), ("prefill", PREFILL_FEATURES)):
        sel = [r for r in rows if r[0] == phase]
        if any(top_k is not None for _, _, _, top_k, _ in sel):
            # shed steps separate the expert GEMMs' arithmetic, and they and the grid's taus
            # between 1 and 0 the routing path's fixed cost
            names = tuple(dict.fromkeys(names + ("routed", "kexpert")))
        feats = [step_features(shape, tau, routing, top_k=top_k) for _, shape, tau, top_k, _ in sel]
        phases[phase] = fit_phase(feats, [ms for *_, ms in sel], names)
    profile = StepCostProfile(machine=meta["device"], date="", phases=phases, routing=routing)
    profile.num_blocks, profile.block_size, profile.graph_buckets = server_facts(gpu, headline_runs[0])
    prompt, ctx = mean_context(gpu, headline_runs)
    for phase, factor in serving_factors(profile, gpu, headline_runs, budget, prompt, ctx).items():
        profile.phases[phase].serving_factor = round(factor, 4)
    gap, unloaded_ttft, date = host_and_edge(gpu, headline_runs)
    lone = profile.step_latency_s(StepShape(int(prompt), 1, int(prompt), True), 1.0)
    edge = max(0.0, unloaded_ttft - lone - gap)
    profile.date = date
    profile.host_gap_s = round(gap, 6)
    profile.request_in_s = profile.request_out_s = round(edge / 2, 6)
    profile.sources = ([str(grid)] if grid else
                       [f"benchmarks/results/engine/engine_{gpu}_run{n}.json" for n in engine_runs])
    profile.sources += [f"benchmarks/results/headline/headline_{gpu}_run{n}_steps.json" for n in headline_runs]
    profile.sources += [f"benchmarks/results/headline/raw/headline_{gpu}_run{n}/" for n in headline_runs]
    profile.notes = {
        "model": f"{meta['preset']}, {meta['weights']}, way-{WAY} united experts (average)",
        "fit_points": {p: len(m.residuals) for p, m in profile.phases.items()},
        "fit_rms_relative_error": {p: round(float(np.sqrt(np.mean(np.square(m.residuals)))), 4)
                                   for p, m in profile.phases.items()},
        "headline_mean_prompt_tokens": round(prompt, 1),
        "headline_mean_running_context": round(ctx, 1),
        "unloaded_ttft_s": round(unloaded_ttft, 5),
        "max_num_batched_tokens_of_the_serving_fit": budget}
    return profile


def refine_by_simulation(profile: StepCostProfile, gpu: str, runs: list[int], trace: str,
                         rounds: int) -> None:
    """Scale each phase's serving factor by the off runs' measured / simulated mean step."""
    for _ in range(rounds):
        ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
        for n in runs:
            workload, setup = headline_setup(gpu, n, "off", profile, trace)
            _, _, engine = simulate_requests(sim_requests(workload), setup)
            steps = json.loads((RESULTS / "headline" / f"headline_{gpu}_run{n}_steps.json").read_text())
            for phase in ratios:
                sim_ms = KILO * engine.step_sum[phase] / max(1, engine.step_count[phase])
                ratios[phase].append(steps["off"]["summary"][phase]["mean_ms"] / sim_ms)
        for phase, r in ratios.items():
            profile.phases[phase].serving_factor = round(
                profile.phases[phase].serving_factor * statistics.fmean(r), 4)
        print("refined serving factors:", {p: m.serving_factor for p, m in profile.phases.items()})
    profile.notes["serving_factor_refined_by_simulation_rounds"] = rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--engine-runs", default="3,5,6")
    ap.add_argument("--headline-runs", default="15,16,17")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--grid", type=Path, help="rows of benchmarks/bench_step_cost.py instead of "
                                               "the engine results")
    ap.add_argument("--trace", help="the trace the headline runs replayed (refines by simulation)")
    ap.add_argument("--refine", type=int, default=2, help="rounds of refinement by simulation")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    profile = fit(args.gpu, ints(args.engine_runs), ints(args.headline_runs),
                  args.max_num_batched_tokens, args.grid)
    if args.trace:
        refine_by_simulation(profile, args.gpu, ints(args.headline_runs), args.trace, args.refine)
    profile.save(args.out)
    print(json.dumps({p: m.to_json() | {"residuals": len(m.residuals)}
                      for p, m in profile.phases.items()}, indent=1))
    print(f"host gap {profile.host_gap_s * KILO:.2f} ms, request in/out "
          f"{profile.request_in_s * KILO:.2f} ms each, {profile.num_blocks} KV blocks; wrote {args.out}")


if __name__ == "__main__":
    main()
