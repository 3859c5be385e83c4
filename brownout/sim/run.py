"""One simulated benchmark run: the bench's workload and prompts, a simulated engine, and
the bench's files (meta.json, requests.jsonl, metrics.jsonl, report, plots)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from brownout.bench.datasets import build_requests, count_tokens, make_source
from brownout.bench.report import compute_report, write_report
from brownout.bench.runs import load_run
from brownout.bench.workloads import make_workload
from brownout.sim.engine import SimEngine, SimRequest, SimSetup
from brownout.sim.fleet import Fleet
from brownout.types import ValidationError

log = logging.getLogger(__name__)

# the bench client scrapes /metrics this often (`LoadClient.scrape_interval_s`)
SCRAPE_INTERVAL_S = 1.0
# after the last arrival the simulation runs at most this long for requests to finish
DRAIN_LIMIT_S = 600.0
# the tokenizer adds this many tokens to a prompt of a given length (the BOS token)
PROMPT_EXTRA_TOKENS = 1


def sim_requests(workload: str, prompts: str = "synthetic", seed: int = 0,
                 max_tokens: Optional[int] = None) -> list[SimRequest]:
    """The bench's request list for a workload, with prompt lengths in tokens."""
    arrivals = make_workload(workload, seed)
    requests = build_requests(arrivals, make_source(prompts), seed, max_tokens)
    if not requests:
        raise ValidationError("workload", f"{workload!r} produced no requests")
    return [SimRequest(r.index, r.send_time_s,
                       (r.prompt_len_hint or count_tokens(r.prompt)) + PROMPT_EXTRA_TOKENS,
                       r.max_tokens, r.prompt_len_hint) for r in requests]


def simulate_requests(requests: list[SimRequest], setup: SimSetup,
                      progress: Optional[Callable[[float], None]] = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], SimEngine | Fleet]:
    """Run the simulation; returns (request records, metric scrapes, the engine or fleet)."""
    engine: SimEngine | Fleet
    if setup.replicas > 1:
        engine = Fleet(setup, setup.replicas, setup.router)
    else:
        engine = SimEngine(setup.profile, setup.scheduler, setup.slo, setup.seed,
                           setup.max_model_len, setup.fixed_tau, prices=setup.prices,
                           exempt_per_token=setup.exempt_per_token)
    for r in requests:
        engine.submit(r)
    scrapes: list[dict[str, Any]] = []
    end = max(r.send_time_s for r in requests) + DRAIN_LIMIT_S

    def scrape() -> None:
        scrapes.append(engine.scrape())
        if progress is not None:
            progress(engine.clock())
        if engine.pending() and engine.clock() < end:
            engine.events.at(engine.clock() + SCRAPE_INTERVAL_S, scrape)

    engine.events.at(0.0, scrape)
    engine.events.run(until=end)
    return engine.request_records(), scrapes, engine


def simulate(workload: str, out_dir: str | Path, setup: SimSetup, *, prompts: str = "synthetic",
             label: Optional[str] = None, max_tokens: Optional[int] = None, plots: bool = True,
             baseline: Optional[dict] = None,
             requests: Optional[list[SimRequest]] = None) -> dict[str, Any]:
    """Simulate one run, write the bench's files into `out_dir`, return its report.
    `requests`: the workload's requests when the caller already built them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if requests is None:
        requests = sim_requests(workload, prompts, setup.seed, max_tokens)
    t0 = time.process_time()
    records, scrapes, engine = simulate_requests(requests, setup)
    cpu_s = time.process_time() - t0
    span = requests[-1].send_time_s - requests[0].send_time_s
    slo = setup.slo
    meta = {"label": label or slo.policy, "policy": slo.policy, "simulated": True,
            "profile": {"machine": setup.profile.machine, "date": setup.profile.date},
            "replicas": setup.replicas, "router": setup.router if setup.replicas > 1 else None,
            "workload": workload, "prompts": prompts, "seed": setup.seed,
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "e2e_s": None},
            "num_requests": len(requests), "offered_rate": len(requests) / span if span > 0 else None,
            "sim": {"cpu_s": round(cpu_s, 3), "events": engine.events.num_fired,
                    "steps": engine.step_count}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    (out_dir / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in scrapes))
    log.info("simulated %s: %d requests, %d events in %.2f s of CPU", meta["label"],
             len(requests), engine.events.num_fired, cpu_s)
    run = load_run(out_dir)
    report = compute_report(run, slo.ttft_s, slo.tpot_s, None, baseline=baseline)
    write_report(report, out_dir)
    if plots:
        from brownout.bench.plots import plot_run  # matplotlib only when plotting
        plot_run(run, out_dir, slo.ttft_s, slo.tpot_s)
    return report
