"""The paper's step-latency violation windows, read from the server's scraped counters."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "headline_steps.py"


def _module():
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
