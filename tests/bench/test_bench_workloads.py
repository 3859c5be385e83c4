"""Arrival processes match their definitions; the SPEC parser; trace replay."""

from pathlib import Path

import numpy as np
import pytest

from brownout.bench.workloads import (Arrival, make_workload, parse_spec, read_trace,
                                      trace_arrivals)
from brownout.types import ValidationError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
AZURE = SHARED / "traces" / "azure_llm_2023_conv.csv"


def times(spec, seed=0):
    return np.array([a.send_time_s for a in make_workload(spec, seed)])


def cv(t):
    gaps = np.diff(t)
    return gaps.std() / gaps.mean()


def test_constant():
    t = times("constant:rate=4,duration=10")
    assert len(t) == 40 and t[0] == 0 and np.allclose(np.diff(t), 0.25)


def test_poisson_rate_and_cv():
    t = times("poisson:rate=20,duration=500")
    assert len(t) / 500 == pytest.approx(20, rel=0.03)
    assert cv(t) == pytest.approx(1.0, abs=0.05)
    assert np.all(np.diff(t) >= 0) and 0 <= t[0] and t[-1] < 500


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_rate_and_cv(burstiness):
    t = times(f"gamma:rate=20,burstiness={burstiness},duration=500", seed=3)
    assert len(t) / 500 == pytest.approx(20, rel=0.08)
    assert cv(t) == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_seeded():
    assert np.array_equal(times("poisson:rate=5,duration=20", 1), times("poisson:rate=5,duration=20", 1))
    assert not np.array_equal(times("poisson:rate=5,duration=20", 1), times("poisson:rate=5,duration=20", 2))


def test_step_has_two_rates():
    t = times("step:rate=10,factor=3,at=200,duration=400")
    before, after = (t < 200).sum() / 200, (t >= 200).sum() / 200
    assert before == pytest.approx(10, rel=0.06) and after == pytest.approx(30, rel=0.06)
    assert np.all(np.diff(t) >= 0)


def test_ramp_follows_the_line():
    t = times("ramp:start=2,end=38,duration=500")
    counts, _ = np.histogram(t, bins=5, range=(0, 500))
    expected = [100 * (2 + 36 * (i + 0.5) / 5) for i in range(5)]  # rate at bin middles * 100 s
    assert counts == pytest.approx(expected, rel=0.08)
    down = times("ramp:start=30,end=0,duration=100")
    assert len(down) == pytest.approx(1500, rel=0.08) and down.max() < 100
    assert (down < 50).sum() > 2.5 * (down >= 50).sum()  # 3x as many in the first half


def write_trace(path):
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:00:00.5000000,100,10\n"
                    "2023-11-16 18:00:00.0000000,50,5\n"  # out of order in the file
                    "2023-11-16 18:00:02.2500000,300,30\n"
                    "2023-11-16 18:00:10.0000000,400,40\n"
                    "2023-11-16 18:01:00.0000000,500,50\n")
    return path


def test_trace_order_scaling_and_window(tmp_path):
    path = write_trace(tmp_path / "t.csv")
    assert [r[0] for r in read_trace(path)] == pytest.approx([0, 0.5, 2.25, 10, 60])
    full = trace_arrivals(path)
    assert full[0] == Arrival(0.0, 50, 5) and full[1] == Arrival(0.5, 100, 10)
    fast = trace_arrivals(path, speedup=2)
    assert [a.send_time_s for a in fast] == pytest.approx([0, 0.25, 1.125, 5, 30])
    # window: trace seconds [0.5, 0.5 + 5 * 2) replayed twice as fast, from 0
    win = make_workload(f"trace:path={path},speedup=2,start=0.5,duration=5")
    assert [a.send_time_s for a in win] == pytest.approx([0, 0.875, 4.75])
    assert [a.prompt_len for a in win] == [100, 300, 400]
    capped = make_workload(f"trace:path={path},max_prompt=200,max_output=20,max_requests=3")
    assert [(a.prompt_len, a.output_len) for a in capped] == [(50, 5), (100, 10), (200, 20)]


def test_numeric_timestamps(tmp_path):
    p = tmp_path / "n.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,1,2\n12,3,4\n")
    assert [a.send_time_s for a in trace_arrivals(p)] == pytest.approx([0, 1.5])


@pytest.mark.skipif(not AZURE.is_file(), reason="needs ../shared/data/traces (not in a user's checkout)")
def test_azure_trace_window():
    arr = make_workload(f"trace:path={AZURE},speedup=4,start=600,duration=60")
    t = np.array([a.send_time_s for a in arr])
    assert len(arr) > 100 and t.min() >= 0 and t.max() < 60 and np.all(np.diff(t) >= 0)
    assert all(a.prompt_len > 0 and a.output_len > 0 for a in arr)
    # the same window at 1x holds the same requests, four times slower
    slow = make_workload(f"trace:path={AZURE},speedup=1,start=600,duration=240")
    assert len(slow) == len(arr)
    assert [a.send_time_s / 4 for a in slow] == pytest.approx(t.tolist())


def test_parse_spec_and_errors(tmp_path):
    assert parse_spec("poisson:rate=4, duration=30") == ("poisson", {"rate": "4", "duration": "30"})
    assert parse_spec("synthetic") == ("synthetic", {})
    for bad, field in (("nope:rate=1", "workload"), ("poisson:duration=3", "workload.rate"),
                       ("poisson:rate=-1", "workload.rate"), ("poisson:rate=x", "workload.rate"),
                       ("poisson:rate=1,bogus=2", "workload.bogus"), ("poisson:rate", "workload"),
                       ("", "workload"), ("gamma:rate=1,burstiness=0", "workload.burstiness"),
                       ("trace:path=" + str(tmp_path / "missing.csv"), "trace.path"),
                       ("ramp:start=0,end=0", "workload.end"), ("poisson:rate=nan", "workload.rate")):
        with pytest.raises(ValidationError) as e:
            make_workload(bad)
        assert e.value.field == field, bad
