"""The HTML report: the PNG plots' charts for every configured run, in one file that opens
offline (uPlot inlined), and draws in a real headless chromium when one is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_bench_report import make_run

from brownout.bench.html_report import REPORT_NAME, write_html_report

SLO = {"ttft_s": 0.55, "tpot_s": 0.1, "e2e_s": None}
BROWSER_TIMEOUT_S = 120
RUN_CHARTS = 6  # TTFT, TPOT, tau, rates, queue, KV use
COMPARISON_CHARTS = 4  # P90 TTFT, P90 TPOT, decode tau, served rate


def _write_run(run_dir: Path, label: str, policy, started_at: str) -> None:
    run = make_run()
    run_dir.mkdir(parents=True)
    meta = {"label": label, "policy": policy, "slo": SLO, "workload": "step:rate=2",
            "started_at": started_at}
    (run_dir / "meta.json").write_text(json.dumps(meta))
    (run_dir / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.requests))
    metrics = [dict(m, running=2, waiting=1, kv_cache_usage=0.3) for m in run.metrics]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


@pytest.fixture()
def report(tmp_path) -> Path:
    _write_run(tmp_path / "part" / "predictive", "predictive", "predictive", "2026-01-01T00:01:00")
    _write_run(tmp_path / "part" / "off", "off", "off", "2026-01-01T00:00:00")
    _write_run(tmp_path / "part" / "calib-idle", "calib-idle", None, "2026-01-01T00:00:00")
    path = write_html_report(tmp_path)
    assert path == tmp_path / REPORT_NAME
    return path


def _spec(text: str) -> dict:
    return json.loads(re.search(r"const SPEC = (.*?);\n", text).group(1).replace("<\\/", "</"))


def test_report_holds_every_configured_run_offline(report):
    text = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched
    assert "uPlot" in text and ".uplot" in text  # the library and its style, inlined
    (section,) = _spec(text)["sections"]
    assert section["title"] == "part" and section["subtitle"] == "step:rate=2"
    assert [run["title"] for run in section["runs"]] == ["off", "predictive"]  # calibration left out
    assert len(section["charts"]) == COMPARISON_CHARTS
    assert all(len(run["charts"]) == RUN_CHARTS for run in section["runs"])
    ttft = section["runs"][0]["charts"][0]
    kinds = {s["kind"]: s for s in ttft["series"]}
    assert len(kinds["points"]["x"]) == 10 and kinds["step"]["y"]  # requests and their P90
    assert kinds["slo"]["y"] == [0.55, 0.55]


def test_no_runs_no_report(tmp_path):
    assert write_html_report(tmp_path) is None and not (tmp_path / REPORT_NAME).exists()


def test_report_draws_in_chromium(report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (scripts/test.sh installs Debian's chromium when run as root)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                              "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}",
                              "--dump-dom", report.as_uri()],
                             capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S).stdout
    assert dom.count("<canvas") == COMPARISON_CHARTS + 2 * RUN_CHARTS
    assert "no data</div>" not in dom  # every chart had points
