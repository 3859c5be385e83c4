"""The virtual clock and the event queue: time order, ties in scheduling order, no going back."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.sim.clock import EventQueue, VirtualClock

times = st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=60)


@given(times)
def test_events_fire_in_time_order_and_ties_in_scheduling_order(ts):
    clock = VirtualClock()
    q = EventQueue(clock)
    fired = []
    for i, t in enumerate(ts):
        q.at(t, lambda i=i, t=t: fired.append((clock(), t, i)))
    q.run()
    assert [(t, i) for _, t, i in fired] == sorted((t, i) for i, t in enumerate(ts))
    assert all(now == t for now, t, _ in fired)  # each fires at its own time


@given(times, st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), max_size=20))
@settings(max_examples=50)
def test_the_clock_never_goes_back_even_when_events_schedule_into_the_past(ts, offsets):
    clock = VirtualClock()
    q = EventQueue(clock)
    seen = []
    extra = iter(offsets)

    def fire():
        seen.append(clock())
        off = next(extra, None)
        if off is not None:  # an event scheduled from an event, possibly before now
            q.at(clock() + off, fire)

    for t in ts:
        q.at(t, fire)
    q.run()
    assert seen == sorted(seen)
    assert q.num_fired == len(ts) + len(offsets)


@given(times, st.floats(min_value=0, max_value=1e4, allow_nan=False))
def test_run_until_stops_before_later_events(ts, until):
    clock = VirtualClock()
    q = EventQueue(clock)
    for t in ts:
        q.at(t, lambda: None)
    q.run(until=until)
    assert q.num_fired == sum(t <= until for t in ts)
    assert q.peek_time() is None or q.peek_time() > until


def test_clock_refuses_to_go_back():
    clock = VirtualClock(5.0)
    clock.advance_to(6.0)
    with pytest.raises(ValueError):
        clock.advance_to(5.5)
