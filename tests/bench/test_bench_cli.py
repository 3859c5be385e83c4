"""`brownout bench` and `run_bench` end to end against the fake streaming server."""

import json

import pytest

from brownout.bench.cli import run_bench
from brownout.cli import main
from fake_openai_server import serve_fake


def test_run_bench_writes_everything(tmp_path):
    with serve_fake(first_delay=0.02, itl=0.005, tau=0.6) as (url, server):
        report = run_bench(url, "constant:rate=20,duration=1", "synthetic:prompt_len=8,output_len=4",
                           tmp_path / "run", slo_ttft=0.5, slo_tpot=0.1, policy="aimd",
                           progress=False, scrape_interval_s=0.2)
    assert len(server.bodies) == 20 and server.metrics_hits >= 2
    assert report["num_ok"] == 20 and report["label"] == "aimd"
    assert report["violations"]["any"]["count"] == 0 and report["goodput_fraction"] == 1.0
    assert report["tau"]["prefill"] == pytest.approx(0.6) and report["tau"]["decode"] == pytest.approx(0.3)
    assert report["output_tokens"] == 80
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"meta.json", "requests.jsonl", "metrics.jsonl", "report.json", "report.md",
            "latency.png", "tau.png", "rate.png", "queue.png"} <= names
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["model"] == "fake-moe" and meta["num_requests"] == 20 and meta["policy"] == "aimd"


def test_cli_run_and_compare(tmp_path, capsys):
    with serve_fake(first_delay=0.02, itl=0.005) as (url, _):
        for label in ("off", "predictive"):
            rc = main(["bench", "--url", url, "--workload", "poisson:rate=20,duration=0.5",
                       "--prompts", "synthetic:prompt_len=4,output_len=3", "--label", label,
                       "--out", str(tmp_path / label), "--no-progress", "--no-plots",
                       "--seed", "1", "--slo-ttft", "0.5", "--chat"])
            assert rc == 0
    rc = main(["bench", "compare", "--runs", str(tmp_path / "off"), str(tmp_path / "predictive"),
               "--out", str(tmp_path / "cmp"), "--no-plots"])
    assert rc == 0
    out = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["label"] for r in out["rows"]] == ["off", "predictive"] and out["baseline"] == "off"
    assert "comparison.md" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--url", "http://x", "--workload", "nope:rate=1", "--out", str(tmp_path)]) == 2
    assert main(["bench", "compare", "--out", str(tmp_path)]) == 2
    assert "unknown kind" in capsys.readouterr().err  # errors go to stderr, one line each
