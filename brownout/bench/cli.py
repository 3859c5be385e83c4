"""`brownout bench`: burst an OpenAI-compatible server with a load, then report.

  brownout bench --url http://127.0.0.1:8000 --workload "step:rate=2,factor=2,at=10,duration=30"
                 [--prompts synthetic] [--model NAME] [--slo-ttft 1.0 --slo-tpot 0.15]
                 [--chat] [--label aimd] --out runs/aimd [--seed 0]
  brownout bench compare --runs runs/off runs/aimd runs/predictive --out runs/compare
                 [--baseline off] [--eval-table ppl_by_tau.json]
A run writes into --out: meta.json, requests.jsonl, metrics.jsonl, report.json,
report.md and PNG plots; `compare` writes comparison.json/.md and overlay plots.
Workload and prompt SPEC strings: see `brownout.bench.workloads` and
`brownout.bench.datasets`. From Python: `run_bench(url, workload, prompts, out_dir, ...)`
returns the report dict (`run_bench_async` inside a running event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from brownout.bench.client import LoadClient
from brownout.bench.datasets import build_requests, make_source
from brownout.bench.report import compare_runs, compute_report, write_report
from brownout.bench.runs import load_run
from brownout.bench.workloads import make_workload
from brownout.cliutil import float_in, int_at_least
from brownout.types import ValidationError

logger = logging.getLogger(__name__)


async def run_bench_async(url: str, workload: str, prompts: str = "synthetic",
                          out_dir: str | Path = "runs/bench", *, model: Optional[str] = None,
                          slo_ttft: Optional[float] = 1.0, slo_tpot: Optional[float] = 0.15,
                          slo_e2e: Optional[float] = None, chat: bool = False, seed: int = 0,
                          label: Optional[str] = None, policy: Optional[str] = None,
                          tokenizer: Any = None, max_tokens: Optional[int] = None,
                          baseline_dir: Optional[str | Path] = None, plots: bool = True,
                          progress: bool = True, **client_kw: Any) -> dict[str, Any]:
    """Run one benchmark and write its files; `client_kw` goes to `LoadClient`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrivals = make_workload(workload, seed)
    requests = build_requests(arrivals, make_source(prompts, tokenizer), seed, max_tokens)
    if not requests:
        raise ValidationError("workload", f"{workload!r} produced no requests")
    client = LoadClient(url, model=model, chat=chat, **client_kw)
    span = requests[-1].send_time_s - requests[0].send_time_s
    meta = {"label": label or policy or out_dir.name, "policy": policy, "url": client.url,
            "model": model, "workload": workload, "prompts": prompts, "seed": seed, "chat": chat,
            "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "e2e_s": slo_e2e},
            "num_requests": len(requests), "offered_rate": len(requests) / span if span > 0 else None,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("bench %s: %d requests over %.1f s to %s", meta["label"], len(requests), span, url)
    await client.run(requests, out_dir, progress=progress)
    meta["model"] = client.model
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    baseline = None
    if baseline_dir is not None:
        baseline = compute_report(load_run(baseline_dir), slo_ttft, slo_tpot, slo_e2e)
    run = load_run(out_dir)
    report = compute_report(run, slo_ttft, slo_tpot, slo_e2e, baseline=baseline)
    write_report(report, out_dir)
    if plots:
        from brownout.bench.plots import plot_run  # matplotlib only when plotting
        plot_run(run, out_dir, slo_ttft, slo_tpot)
    return report


def run_bench(url: str, workload: str, prompts: str = "synthetic",
              out_dir: str | Path = "runs/bench", **kw: Any) -> dict[str, Any]:
    """Blocking `run_bench_async` (see there for the keyword arguments)."""
    return asyncio.run(run_bench_async(url, workload, prompts, out_dir, **kw))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", choices=("run", "compare"), default="run",
                   help="run a benchmark (default) or compare finished runs")
    p.add_argument("--url", help="run: the server's base URL, e.g. http://127.0.0.1:8000 (required)")
    p.add_argument("--workload", help="run: arrival SPEC, e.g. 'poisson:rate=4,duration=30' (rates in "
                                      "requests/s, times in seconds; required)")
    p.add_argument("--prompts", default="synthetic", help="prompt SPEC (default: synthetic)")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--slo-ttft", type=float_in(0.0, lo_open=True), default=1.0,
                   help="time-to-first-token SLO, seconds")
    p.add_argument("--slo-tpot", type=float_in(0.0, lo_open=True), default=0.15,
                   help="time-per-output-token SLO, seconds")
    p.add_argument("--slo-e2e", type=float_in(0.0, lo_open=True), default=None,
                   help="end-to-end latency SLO, seconds (default: none)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and prompts")
    p.add_argument("--label", help="name of this run in comparisons (default: --slo-policy or --out)")
    p.add_argument("--slo-policy", dest="policy",
                   help="the server's SLO policy, recorded for comparisons (default: none)")
    p.add_argument("--policy", dest="policy", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # former name
    p.add_argument("--max-tokens", type=int_at_least(1),
                   help="cap on max_tokens of every request, in tokens (default: the prompt SPEC's)")
    p.add_argument("--api-key", help="bearer token for the server (default: none)")
    p.add_argument("--timeout", type=float_in(0.0, lo_open=True), default=600.0,
                   help="per-request timeout, seconds")
    p.add_argument("--max-retries", type=int_at_least(0), default=0, help="retries of rejected requests")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    p.add_argument("--runs", nargs="+", help="compare: run directories (required)")
    p.add_argument("--baseline", help="run: a baseline run directory; compare: the baseline "
                                      "run's label (default 'off', else the first run)")
    p.add_argument("--eval-table", help="compare: JSON file of tau -> perplexity (default: none)")


def _print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                        for v in row))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    try:
        if args.mode == "compare":
            return _run_compare(args)
        return _run_one(args)
    except ValidationError:
        raise  # `brownout.cli.main` prints it naming its flag
    except (FileNotFoundError, ValueError) as e:  # a run directory or table that is missing or bad
        print(f"{getattr(args, '_prog', 'brownout bench')}: error: {e}", file=sys.stderr)
        return 2


def _run_compare(args: argparse.Namespace) -> int:
    if not args.runs:
        raise ValidationError("--runs", "required by compare: the run directories, --runs DIR [DIR ...]")
    for run_dir in args.runs:
        if not (Path(run_dir) / "requests.jsonl").is_file():
            raise ValidationError("--runs", f"expected directories written by `brownout bench`, got {run_dir} "
                                            "(no requests.jsonl)")
    result = compare_runs(args.runs, args.out, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
                          slo_e2e=args.slo_e2e, baseline_label=args.baseline or "off",
                          eval_table=args.eval_table, plots=not args.no_plots)
    keys = ["label", "violations", "reduction", "goodput_req_s", "throughput_tok_s",
            "p90_ttft_s", "p90_tpot_s", "mean_tau", "perplexity"]
    _print_table(f"baseline: {result['baseline']}", keys, [[r[k] for k in keys] for r in result["rows"]])
    print(f"wrote {Path(args.out) / 'comparison.md'}")
    return 0


def _run_one(args: argparse.Namespace) -> int:
    for flag, value in (("--url", args.url), ("--workload", args.workload)):
        if not value:
            raise ValidationError(flag, "required by a benchmark run (--url http://HOST:PORT "
                                        "--workload SPEC)")
    report = run_bench(
        args.url, args.workload, args.prompts, args.out, model=args.model,
        slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, slo_e2e=args.slo_e2e, chat=args.chat,
        seed=args.seed, label=args.label, policy=args.policy, max_tokens=args.max_tokens,
        baseline_dir=args.baseline, plots=not args.no_plots, progress=not args.no_progress,
        api_key=args.api_key, timeout_s=args.timeout, max_retries=args.max_retries,
        ignore_eos=not args.no_ignore_eos)
    lat = report["latency"]
    _print_table(f"{report['label']}: {report['num_ok']}/{report['num_requests']} ok",
                 ["metric", "value"],
                 [["throughput tok/s", report["throughput_tok_s"]],
                  ["goodput req/s", report["goodput_req_s"]],
                  ["P90 TTFT s", lat["ttft"]["p90"]], ["P90 TPOT s", lat["tpot"]["p90"]],
                  ["violation windows", report["violations"]["any"]["count"]],
                  ["mean tau", report["tau"]["mean"]], ["rejected", report["num_rejected"]]])
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0
