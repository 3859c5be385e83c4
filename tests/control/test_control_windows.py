"""Latency windows: percentiles over a sliding time window on an injectable clock."""

import math

import numpy as np
import pytest

from brownout.control.windows import DECODE, PREFILL, LatencyWindows, phase_of


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_percentile_matches_numpy_over_the_window():
    clock = Clock()
    w = LatencyWindows(horizon_s=10.0, clock=clock)
    for i in range(1, 11):
        clock.t = float(i)
        w.add(DECODE, i / 100)
    # window (8, 10] holds the samples stamped 9 and 10
    assert w.values(DECODE, 2.0).tolist() == [0.09, 0.10]
    assert w.percentile(DECODE, 50, 2.0) == pytest.approx(0.095)
    assert w.percentile(DECODE, 90, 100.0) == pytest.approx(np.percentile(np.arange(1, 11) / 100, 90))


def test_empty_window_and_unknown_key_give_none():
    w = LatencyWindows(horizon_s=5.0, clock=Clock())
    assert w.percentile(PREFILL, 90, 2.0) is None
    assert w.percentile("nope", 90, 2.0) is None
    assert w.count(DECODE, 2.0) == 0


def test_old_samples_are_pruned_past_the_horizon():
    clock = Clock()
    w = LatencyWindows(horizon_s=3.0, clock=clock)
    w.add(DECODE, 1.0)
    clock.t = 10.0
    w.add(DECODE, 2.0)
    assert w.values(DECODE, 100.0).tolist() == [2.0]


def test_non_finite_values_are_dropped():
    w = LatencyWindows(horizon_s=3.0, clock=Clock())
    assert not w.add(DECODE, math.nan)
    assert not w.add(DECODE, math.inf)
    assert not w.add(DECODE, None)
    assert w.add(DECODE, 0.5)
    assert w.values(DECODE, 1.0).tolist() == [0.5]


def test_explicit_timestamps_and_future_samples():
    clock = Clock()
    clock.t = 5.0
    w = LatencyWindows(horizon_s=10.0, clock=clock)
    w.add(PREFILL, 0.3, t=4.5)
    w.add(PREFILL, 0.4, t=6.0)  # stamped after "now": not in the window ending now
    assert w.values(PREFILL, 1.0).tolist() == [0.3]
    assert w.values(PREFILL, 2.0, now=6.0).tolist() == [0.3, 0.4]


def test_phase_of():
    assert phase_of(True) == PREFILL and phase_of(False) == DECODE


def test_bad_horizon_rejected():
    with pytest.raises(ValueError):
        LatencyWindows(horizon_s=0.0)
