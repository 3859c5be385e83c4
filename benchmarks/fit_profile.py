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

With --grid (rows of benchmarks/bench_step_cost.py) the graphed model is fitted to that grid
instead, its steps past the token budget left out. --curve GRID fits the routing's experts
touched to the grid's counts: the kept curve over tau and the step's prompt share, and how
many tokens of different sequences a prompt chunk routes like. --bound fits the expert work
of a phase with shed steps as max(weight reads, arithmetic). --serving-time fits each phase's
served step as a fixed time plus a factor of the graphed one (where the windows part them).

With --trace (the Azure conversation trace the headline runs replayed), the serving factors
are then refined by simulation: the headline runs are simulated with brownout off, and each
phase's factor is scaled by measured / simulated mean step latency, `--refine` times. So
the off policy's mean step latencies are fitted, not predicted; every other simulated
figure (windows, goodput, refusals, tau, and all of aimd and predictive) is not. With
--refine-ttft the request path's time per running request is fitted too, to the off runs'
median TTFT.

  python benchmarks/fit_profile.py --gpu h200 --engine-runs 3,5,6 --headline-runs 15,16,17 \
      --trace ../shared/data/traces/azure_llm_2023_conv.csv --out brownout/sim/profiles/h200.json
  python benchmarks/fit_profile.py --grid benchmarks/results/engine/step_cost_h200.json \
      --curve benchmarks/results/engine/step_cost_h200.json --serving-time --refine-ttft --refine 4 \
      --trace ../shared/data/traces/azure_llm_2023_conv.csv --out brownout/sim/profiles/h200_grid.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path

import numpy as np

from compact_raw import jsonl_file, read_jsonl
from sim_headline import headline_setup

from brownout.sim.profile import (KILO, RoutingShape, StepCostProfile, StepShape, fit_phase,
                                  step_features)
from brownout.sim.run import sim_requests, simulate_requests

RESULTS = Path(__file__).resolve().parent / "results"
DECODE_FEATURES = ("one", "batch", "kctx", "experts", "routed")
PREFILL_FEATURES = ("one", "ktokens", "batch", "kctx", "experts")
# the expert work of a step: its weight reads (experts) and its arithmetic (kexpert) bound it
# by whichever is larger (`brownout.sim.profile`); fitted so where the shed steps separate them
BOUND = ("experts", "kexpert")
# the kept curve's prompt-share knots: a decode step, a chunk beside as many decode tokens, a
# prompt-only chunk, and the quarters between, where the grid's mixed steps lie
PROMPT_SHARE_KNOTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# a step shape whose tau-1 and tau-0 expert counts differ by fewer slots than this shows no
# curve (a batch of one or two touches about as many experts either way)
MIN_CURVE_GAP = 3.0
# pull of a knot toward the tau-linear share, against shapes' unit weight: small, so it only
# settles knots no measured shape lies near
CURVE_RIDGE = 1e-3
# steps touching more than this share of the experts leave the tokens they route like
# ill-determined (the uniform count's slope vanishes near every expert)
PROMPT_FIT_MAX_SHARE = 0.95
# the engine benchmark's shapes (benchmarks/bench_engine.py): fresh prompts come as 4
# sequences; a mixed step is one prompt chunk beside 63 decodes at context 512
PREFILL_SEQS = 4
MIXED_DECODES, MIXED_CTX = 63, 512
# the united experts the headline servers ran (`--united-experts average:4`)
WAY = 4
# the server's step latency counters, whose sums are the time inside steps
STEP_COUNTER = "brownout_step_latency_seconds_{kind},phase={phase}"


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


def kept_curve(path: Path, routing: RoutingShape) -> RoutingShape:
    """The routing with its kept curve fitted to the grid's experts touched: for each measured
    step shape (at the model's k) and tau, the share of the gap between its tau-1 and tau-0
    counts it kept; at each tau, least squares over the shapes of a curve linear between the
    prompt-share knots."""
    d = json.loads(Path(path).read_text())
    shapes: dict[tuple, dict[float, float]] = {}
    for r in d["rows"]:
        if r.get("top_k") is None:
            key = (r["phase"], r["tokens"], r["batch"], r["context_tokens"])
            shapes.setdefault(key, {})[r["tau"]] = r["experts_touched_mean"]
    taus = sorted({t for v in shapes.values() for t in v})
    knots = np.array(PROMPT_SHARE_KNOTS)
    rows = {t: ([], []) for t in taus}
    for (phase, tokens, batch, ctx), v in shapes.items():
        if 1.0 not in v or 0.0 not in v or v[1.0] - v[0.0] < MIN_CURVE_GAP:
            continue
        share = StepShape(tokens, batch, ctx, phase == "prefill").prompt_share
        # the share's weights on the knots: linear between the two around it
        hat = np.array([np.interp(share, knots, np.eye(len(knots))[j]) for j in range(len(knots))])
        for t, e in v.items():
            rows[t][0].append(hat)
            rows[t][1].append((e - v[0.0]) / (v[1.0] - v[0.0]))
    curve = np.zeros((len(knots), len(taus)))
    for i, t in enumerate(taus):
        A, b = np.array(rows[t][0]), np.array(rows[t][1])
        # a knot no shape lies near keeps the tau-linear share (the ridge pulls it there)
        prior = np.full(len(knots), t)
        w = CURVE_RIDGE
        curve[:, i] = np.linalg.solve(A.T @ A + w * np.eye(len(knots)), A.T @ b + w * prior)
    curve = np.clip(curve, 0.0, 1.0)
    scale, exponent = prompt_routing(d["rows"], routing)
    return RoutingShape(routing.num_experts, routing.top_k, routing.way, routing.num_layers,
                        tuple(taus), tuple(PROMPT_SHARE_KNOTS),
                        tuple(tuple(round(float(x), 4) for x in row) for row in curve),
                        round(scale, 4), round(exponent, 4))


def prompt_routing(rows: list[dict], routing: RoutingShape) -> tuple[float, float]:
    """(scale, exponent) of a prompt chunk's routing: the grid's steps with prefill work at
    tau 1 and the model's k, each a chunk of c prompt tokens beside batch - 1 decodes, touch
    E experts, which uniform routing gives to T = log(1 - E/n) / log(1 - k/n) tokens; less
    the decodes, that is what the chunk routes like, fitted as scale * c^exponent by least
    squares in logs. Steps touching nearly every expert say nothing of T and are left out."""
    n, k = routing.num_experts, routing.top_k
    xs, ys = [], []
    for r in rows:
        if r["phase"] != "prefill" or r["tau"] != 1.0 or r.get("top_k") is not None:
            continue
        e = r["experts_touched_mean"]
        if e >= PROMPT_FIT_MAX_SHARE * n:
            continue
        decodes = r["batch"] - 1
        chunk_eff = np.log(1.0 - e / n) / np.log(1.0 - k / n) - decodes
        if chunk_eff > 0:
            xs.append(np.log(r["tokens"] - decodes))
            ys.append(np.log(chunk_eff))
    if len(xs) < 2:
        return 0.0, 1.0
    exponent, log_scale = np.polyfit(xs, ys, 1)
    return float(np.exp(log_scale)), float(exponent)


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
                    prompt: float, ctx: float, affine: bool = False) -> dict[str, tuple[float, float]]:
    """Per phase (serving time ms, serving factor): the served mean step of each window
    against the graphed model at the window's shape, by least squares weighted by the
    window's steps. Without `affine`, or where the fitted time falls below zero (the windows'
    steps span too narrow a range to part a fixed time from a factor), the time is 0 and
    the factor the step-weighted ratio of served to modelled."""
    pairs: dict[str, list[tuple[float, float, int]]] = {"prefill": [], "decode": []}
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
                        pred = max(0.0, model.raw_ms(step_features(shape, w[f"tau_{phase}"], profile.routing,
                                                                   profile.graph_buckets)))
                        pairs[phase].append((pred, w[f"{phase}_mean_ms"], k))
    out = {}
    for phase, rows in pairs.items():
        pred, served, k = (np.array(x, dtype=float) for x in zip(*rows))
        ratio = float((k * served).sum() / (k * pred).sum())
        time, factor = 0.0, ratio
        if affine:
            A = np.vstack([np.ones_like(pred), pred]).T * np.sqrt(k)[:, None]
            a, f = np.linalg.lstsq(A, served * np.sqrt(k), rcond=None)[0]
            if a >= 0.0 and f > 0.0:
                time, factor = float(a), float(f)
        out[phase] = (time, factor)
    return out


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


def gap_intervals(metrics: list[dict], t0: float, t1: float) -> list[tuple[float, float, float]]:
    """(mean running requests, host seconds per step, steps) of each scrape interval inside
    [t0, t1] that holds steps and starts and ends with requests running: the interval's
    wall time less the time inside steps, per step. An interval that starts or ends empty
    may hold idle time, which is no host work, and is left out."""
    out = []
    for a, b in zip(metrics, metrics[1:]):
        if a["t"] < t0 or b["t"] > t1 or min(a["running"], b["running"]) < 1:
            continue
        delta = {kind: sum(b["brownout"].get(STEP_COUNTER.format(kind=kind, phase=p), 0.0)
                           - a["brownout"].get(STEP_COUNTER.format(kind=kind, phase=p), 0.0)
                           for p in ("prefill", "decode")) for kind in ("count", "sum")}
        if delta["count"] > 0:
            out.append(((a["running"] + b["running"]) / 2,
                        (b["t"] - a["t"] - delta["sum"]) / delta["count"], delta["count"]))
    return out


def fit_host_gap(intervals: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(seconds, seconds per running request) of the host gap: least squares of each
    interval's host time per step over its running requests, weighted by its steps. Where
    the fitted slope or intercept falls below zero (the intervals span too narrow a load),
    the gap is the step-weighted mean and no slope."""
    run, gap, w = (np.array(x, dtype=float) for x in zip(*intervals))
    A = np.vstack([np.ones_like(run), run]).T * np.sqrt(w)[:, None]
    fixed, per = np.linalg.lstsq(A, gap * np.sqrt(w), rcond=None)[0]
    if fixed < 0.0 or per < 0.0:
        return float(np.average(gap, weights=w)), 0.0
    return float(fixed), float(per)


def host_gap_by_policy(gpu: str, runs: list[int]) -> dict[str, tuple[float, float]]:
    """Per policy of the headline runs, and pooled over them all under "" (the default of a
    policy not named), the host gap's fixed time and time per running request, fitted to
    the /metrics scrapes of each run's burst window: there the queue keeps the engine
    stepping, so the time outside steps is host work between them."""
    by_policy: dict[str, list[tuple[float, float, float]]] = {}
    for n in runs:
        root = RESULTS / "headline" / "raw" / f"headline_{gpu}_run{n}"
        head = json.loads((root / "headline.json").read_text())
        t0, t1 = head["burst_window_s"]
        for policy in {r["policy"] for r in head["rows"]}:
            path = jsonl_file(root / policy, "metrics")
            if path is not None:
                by_policy.setdefault(policy, []).extend(gap_intervals(read_jsonl(path), t0, t1))
    out = {p: fit_host_gap(v) for p, v in sorted(by_policy.items())}
    out[""] = fit_host_gap([x for v in by_policy.values() for x in v])
    return out


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
        grid: Path | None = None, curve: Path | None = None, bound: bool = False,
        serving_time: bool = False, host_gap_runs: list[int] | None = None) -> StepCostProfile:
    rows, meta = grid_rows(grid) if grid else engine_rows(engine_runs, gpu)
    # a served step holds at most the token budget: larger grid steps run past the largest
    # captured graph, eagerly, at a cost no served step pays
    rows = [r for r in rows if r[1].num_tokens <= budget]
    routing = kept_curve(curve, RoutingShape(way=WAY)) if curve else RoutingShape(way=WAY)
    phases = {}
    for phase, names in (("decode", DECODE_FEATURES), ("prefill", PREFILL_FEATURES)):
        sel = [r for r in rows if r[0] == phase]
        shed = any(top_k is not None for _, _, _, top_k, _ in sel)
        if shed:
            # shed steps separate the expert GEMMs' arithmetic, and they and the grid's taus
            # between 1 and 0 the routing path's fixed cost
            names = tuple(dict.fromkeys(names + ("routed", "kexpert")))
        feats = [step_features(shape, tau, routing, top_k=top_k) for _, shape, tau, top_k, _ in sel]
        phases[phase] = fit_phase(feats, [ms for *_, ms in sel], names,
                                  bound=BOUND if bound and shed else ())
    profile = StepCostProfile(machine=meta["device"], date="", phases=phases, routing=routing)
    profile.num_blocks, profile.block_size, profile.graph_buckets = server_facts(gpu, headline_runs[0])
    prompt, ctx = mean_context(gpu, headline_runs)
    for phase, (time, factor) in serving_factors(profile, gpu, headline_runs, budget, prompt, ctx,
                                                 serving_time).items():
        profile.phases[phase].serving_ms = round(time, 4)
        profile.phases[phase].serving_factor = round(factor, 4)
    gap, unloaded_ttft, date = host_and_edge(gpu, headline_runs)
    lone = profile.step_latency_s(StepShape(int(prompt), 1, int(prompt), True), 1.0)
    edge = max(0.0, unloaded_ttft - lone - gap)
    profile.date = date
    profile.host_gap_s = round(gap, 6)
    if host_gap_runs:
        terms = host_gap_by_policy(gpu, host_gap_runs)
        fixed, per = terms.pop("")
        profile.host_gap_s, profile.host_gap_s_per_running = round(fixed, 7), round(per, 9)
        profile.host_gap_by_policy = {p: [round(a, 7), round(b, 9)] for p, (a, b) in terms.items()}
    profile.request_in_s = profile.request_out_s = round(edge / 2, 6)
    profile.sources = ([str(grid)] if grid else
                       [f"benchmarks/results/engine/engine_{gpu}_run{n}.json" for n in engine_runs])
    if curve and curve != grid:
        profile.sources.append(str(curve))
    profile.sources += [f"benchmarks/results/headline/headline_{gpu}_run{n}_steps.json" for n in headline_runs]
    profile.sources += [f"benchmarks/results/headline/raw/headline_{gpu}_run{n}/" for n in headline_runs]
    if host_gap_runs:
        profile.sources += [f"benchmarks/results/headline/raw/headline_{gpu}_run{n}/{{policy}}/metrics.jsonl.gz"
                            for n in host_gap_runs if n not in headline_runs]
    profile.notes = {
        "model": f"{meta['preset']}, {meta['weights']}, way-{WAY} united experts (average)",
        "kept_curve": f"fitted to the experts touched in {curve}" if curve else "linear in tau",
        "bound_phases": [p for p, m in profile.phases.items() if m.bound],
        "serving": "a fixed time plus a factor of the graphed step" if serving_time else "a factor of the graphed step",
        "fit_points": {p: len(m.residuals) for p, m in profile.phases.items()},
        "fit_rms_relative_error": {p: round(float(np.sqrt(np.mean(np.square(m.residuals)))), 4)
                                   for p, m in profile.phases.items()},
        "headline_mean_prompt_tokens": round(prompt, 1),
        "headline_mean_running_context": round(ctx, 1),
        "unloaded_ttft_s": round(unloaded_ttft, 5),
        "max_num_batched_tokens_of_the_serving_fit": budget}
    if host_gap_runs:
        profile.notes["host_gap"] = (
            "per policy, seconds plus seconds per running request, fitted to the burst-window "
            f"/metrics scrapes of headline runs {','.join(map(str, host_gap_runs))}; "
            "host_gap_s and host_gap_s_per_running pool every policy")
    return profile


def refine_by_simulation(profile: StepCostProfile, gpu: str, runs: list[int], trace: str,
                         rounds: int, ttft: bool = False) -> None:
    """Scale each phase's serving factor (and time) by the off runs' measured / simulated
    mean step; with `ttft`, also fit the request path's time per running request (in and out
    alike) to the off runs' measured less simulated median TTFT: under load the path in and
    out of the engine takes longer than the unloaded TTFT shows."""
    for _ in range(rounds):
        ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
        shifts, running = [], []
        for n in runs:
            workload, setup = headline_setup(gpu, n, "off", profile, trace)
            records, scrapes, engine = simulate_requests(sim_requests(workload), setup)
            steps = json.loads((RESULTS / "headline" / f"headline_{gpu}_run{n}_steps.json").read_text())
            for phase in ratios:
                sim_ms = KILO * engine.step_sum[phase] / max(1, engine.step_count[phase])
                ratios[phase].append(steps["off"]["summary"][phase]["mean_ms"] / sim_ms)
            report = json.loads((RESULTS / "headline" / "raw" / f"headline_{gpu}_run{n}" / "off" /
                                 "report.json").read_text())
            sim_ttft = [r["first_token"] - r["sent"] for r in records
                        if r.get("status") == 200 and r.get("first_token") is not None]
            shifts.append(report["latency"]["ttft"]["p50"] - float(np.median(sim_ttft)))
            running.append(statistics.fmean(s["running"] for s in scrapes if s["running"] > 0))
        for phase, r in ratios.items():
            model = profile.phases[phase]
            model.serving_factor = round(model.serving_factor * statistics.fmean(r), 4)
            model.serving_ms = round(model.serving_ms * statistics.fmean(r), 4)
        if ttft:
            # the TTFT holds the path in and out once each, at about the mean running load
            per = statistics.fmean(shifts) / (2 * statistics.fmean(running))
            profile.request_s_per_running = round(max(0.0, profile.request_s_per_running + per), 8)
        print("refined serving (ms, factor):", {p: (m.serving_ms, m.serving_factor)
                                                for p, m in profile.phases.items()},
              f"off TTFT median measured less simulated {statistics.fmean(shifts) * KILO:.1f} ms")
    profile.notes["serving_factor_refined_by_simulation_rounds"] = rounds
    if ttft:
        profile.notes["request_path_per_running_fitted_to_off_ttft_median"] = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--engine-runs", default="3,5,6")
    ap.add_argument("--headline-runs", default="15,16,17")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--grid", type=Path, help="rows of benchmarks/bench_step_cost.py instead of "
                                               "the engine results")
    ap.add_argument("--curve", type=Path, help="rows of benchmarks/bench_step_cost.py whose experts "
                                                "touched fit the routing's kept curve over tau")
    ap.add_argument("--bound", action="store_true", help="fit each phase with shed steps with its "
                                                         "expert work bound by max(weight reads, arithmetic)")
    ap.add_argument("--serving-time", action="store_true",
                    help="fit each phase's served step as a fixed time plus a factor of the graphed one")
    ap.add_argument("--host-gap-runs", default="",
                    help="headline runs whose burst scrapes fit the host gap between steps per policy, "
                         "as a time plus a time per running request (default: one gap, the burst mean "
                         "of --headline-runs, for every policy)")
    ap.add_argument("--trace", help="the trace the headline runs replayed (refines by simulation)")
    ap.add_argument("--refine-ttft", action="store_true",
                    help="fit also the request path's time per running request to the off runs' median TTFT")
    ap.add_argument("--refine", type=int, default=2, help="rounds of refinement by simulation")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    profile = fit(args.gpu, ints(args.engine_runs), ints(args.headline_runs),
                  args.max_num_batched_tokens, args.grid, args.curve, args.bound,
                  args.serving_time, ints(args.host_gap_runs))
    if args.trace:
        refine_by_simulation(profile, args.gpu, ints(args.headline_runs), args.trace, args.refine,
                             args.refine_ttft)
    profile.save(args.out)
    print(json.dumps({p: m.to_json() | {"residuals": len(m.residuals)}
                      for p, m in profile.phases.items()}, indent=1))
    for policy, (fixed, per) in profile.host_gap_by_policy.items():
        print(f"host gap {policy}: {fixed * KILO:.3f} ms + {per * 1e6:.2f} us per running request")
    print(f"host gap {profile.host_gap_s * KILO:.2f} ms, request in/out "
          f"{profile.request_in_s * KILO:.2f} ms each, {profile.num_blocks} KV blocks; wrote {args.out}")


if __name__ == "__main__":
    main()
