"""The paper's step-latency violation windows, read from the server's scraped counters."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "headline_steps.py"
RESULTS = BENCHMARKS / "results" / "headline"


def _module():
    if str(BENCHMARKS) not in sys.path:  # the script imports its sibling compact_raw.py
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("headline_steps", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scrape(t, prefill_steps, prefill_over, decode_steps, decode_over):
    b = {"brownout_step_latency_seconds_count,phase=prefill": prefill_steps,
         "brownout_step_latency_seconds_count,phase=decode": decode_steps,
         "brownout_slo_violations_total,kind=prefill_step": prefill_over,
         "brownout_slo_violations_total,kind=decode_step": decode_over}
    return {"t": t, "brownout": b}


def test_a_window_violates_when_more_than_a_tenth_of_a_phase_is_over_its_slo():
    m = _module()
    metrics = [_scrape(0.0, 0, 0, 0, 0),
               _scrape(1.0, 40, 4, 10, 0),    # exactly 10% over: P90 not above the SLO
               _scrape(2.0, 80, 9, 20, 0),    # 5 of 40 prefill steps over
               _scrape(3.0, 120, 9, 30, 2),   # 2 of 10 decode steps over
               _scrape(4.0, 120, 9, 30, 2)]   # no steps
    assert m.step_violation_windows(metrics) == [2, 3]


def test_burst_summary_busy_share_step_means_and_scraped_tau():
    m = _module()
    metrics = []
    for i, tau in enumerate([1.0, 0.5, 0.2, 0.3]):  # one scrape a second, 20 + 40 steps a second
        s = _scrape(float(i), 20 * i, 0, 40 * i, 0)
        s["brownout"]["brownout_step_latency_seconds_sum,phase=prefill"] = 0.4 * i  # 20 ms steps
        s["brownout"]["brownout_step_latency_seconds_sum,phase=decode"] = 0.4 * i  # 10 ms steps
        s.update(tau_prefill=1.0, tau_decode=tau)
        metrics.append(s)
    b = m.busy_between(metrics, 1.0, 3.0)  # the scrapes at 1, 2 and 3 s
    assert abs(b["busy_fraction"] - 0.8) < 1e-12 and b["steps_per_s"] == 60
    assert abs(b["host_ms_between_steps"] - 1e3 * 0.4 / 120) < 1e-9
    assert abs(b["prefill_mean_ms"] - 20) < 1e-9 and abs(b["decode_mean_ms"] - 10) < 1e-9
    assert abs(b["tau_decode_mean"] - (0.5 + 0.2 + 0.3) / 3) < 1e-12 and b["tau_prefill_mean"] == 1.0
    assert m.busy_between(metrics, 3.0, 3.5) is None  # one scrape: nothing to difference


def test_committed_step_table_is_computed_from_the_compact_raw_data(tmp_path, monkeypatch):
    """The committed table of a headline run equals what the script computes from the run's
    compact raw data (gzipped metrics scrapes) committed beside it."""
    name = "headline_h200_run17"
    out = tmp_path / "steps.json"
    monkeypatch.setattr(sys, "argv", ["headline_steps.py", str(RESULTS / "raw" / name), "--out", str(out)])
    _module().main()
    assert json.loads(out.read_text()) == json.loads((RESULTS / f"{name}_steps.json").read_text())
