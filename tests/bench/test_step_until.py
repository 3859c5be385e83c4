"""The step workload's burst can end (`until`): three phases with their own rates."""

import numpy as np

from brownout.bench.workloads import make_workload


def test_step_burst_with_end_has_three_rates():
    arrivals = make_workload("step:rate=20,factor=3,at=100,until=200,duration=300", seed=3)
    t = np.array([a.send_time_s for a in arrivals])
    assert np.all(np.diff(t) >= 0)
    counts = [np.sum((t >= lo) & (t < hi)) for lo, hi in ((0, 100), (100, 200), (200, 300))]
    assert abs(counts[0] / 100 - 20) < 2 and abs(counts[2] / 100 - 20) < 2
    assert abs(counts[1] / 100 - 60) < 4


def test_trace_burst_plays_the_trace_faster_inside_the_window(shared_data):
    path = shared_data / "traces" / "azure_llm_2023_conv.csv"
    plain = make_workload(f"trace:path={path},start=600,duration=90")
    burst = make_workload(f"trace:path={path},start=600,duration=90,burst=2,burst_at=30,burst_until=60")
    t_plain = np.array([a.send_time_s for a in plain])
    t_burst = np.array([a.send_time_s for a in burst])
    assert np.all(np.diff(t_burst) >= 0)
    # before the burst the two are the same arrivals
    assert np.array_equal(t_plain[t_plain < 30], t_burst[t_burst < 30])
    in_plain = np.sum((t_plain >= 30) & (t_plain < 60))
    in_burst = np.sum((t_burst >= 30) & (t_burst < 60))
    assert 1.6 < in_burst / in_plain < 2.4  # twice the trace seconds in the same 30 s
    # the burst's arrivals are the next 60 trace seconds, in order: same lengths as plain replay
    assert [a.prompt_len for a in burst[:len(t_plain[t_plain < 30]) + 5]] == \
        [a.prompt_len for a in plain[:len(t_plain[t_plain < 30]) + 5]]
