"""End to end: a 20-second bench against the real server (demo model, CPU) writes a report
and plots whose numbers agree with the per-request log."""

import json

import numpy as np
import pytest

from brownout.bench.cli import run_bench
from brownout.bench.experiment import server_process
from brownout.defaults import default_model_dir

SLO_TTFT, SLO_TPOT = 2.0, 0.2


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    flags = ["--model", default_model_dir(), "--device", "cpu", "--united-experts", "average:4",
             "--slo-policy", "aimd", "--slo-check-interval", "1", "--slo-window", "2",
             "--slo-decode-step", "0.0001", "--slo-prefill-step", "0.0001", "--max-num-seqs", "8"]
    with server_process(flags, out / "server.log", startup_timeout_s=180) as url:
        report = run_bench(url, "poisson:rate=2,duration=20", "synthetic:prompt_len=32", out / "run",
                           slo_ttft=SLO_TTFT, slo_tpot=SLO_TPOT, max_tokens=16, progress=False,
                           policy="aimd")
    return out / "run", report


def _requests(run_dir):
    return [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]


def test_files_exist(bench_run):
    run_dir, _ = bench_run
    for name in ("requests.jsonl", "metrics.jsonl", "report.json", "report.md", "meta.json",
                 "latency.png", "tau.png", "rate.png", "queue.png"):
        assert (run_dir / name).stat().st_size > 0, name


def test_report_agrees_with_the_request_log(bench_run):
    run_dir, report = bench_run
    assert json.loads((run_dir / "report.json").read_text())["num_requests"] == report["num_requests"]
    recs = _requests(run_dir)
    ok = [r for r in recs if r["status"] == 200 and r["first_token"] is not None and not r["error"]]
    assert report["num_requests"] == len(recs) >= 20
    assert report["num_ok"] == len(ok) == len(recs)  # light load: every request served
    assert report["output_tokens"] == sum(r["output_tokens"] for r in ok) == 16 * len(ok)
    ttft = [r["first_token"] - r["first_sent"] for r in ok]
    assert report["latency"]["ttft"]["p90"] == pytest.approx(float(np.percentile(ttft, 90)))
    tpot = [(r["done"] - r["first_token"]) / (r["output_tokens"] - 1) for r in ok]
    assert report["latency"]["tpot"]["p50"] == pytest.approx(float(np.percentile(tpot, 50)))
    good = sum(t <= SLO_TTFT and p <= SLO_TPOT for t, p in zip(ttft, tpot))
    span = max(r["done"] for r in recs) - min(r["first_sent"] for r in recs)
    assert report["goodput_req_s"] == pytest.approx(good / span)


def test_metrics_scrape_sees_the_controller(bench_run):
    run_dir, report = bench_run
    samples = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(samples) >= 15  # once a second
    assert all(0.0 <= s["tau_decode"] <= 1.0 for s in samples)
    # a 0.1 ms step SLO cannot be met on a CPU: aimd dims below 1
    assert min(s["tau_decode"] for s in samples) < 1.0
    assert report["tau"]["mean"] < 1.0
