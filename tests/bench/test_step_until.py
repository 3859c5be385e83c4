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
