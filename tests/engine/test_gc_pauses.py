"""Garbage-collector pauses: every collection is timed by generation; freezing the startup
heap takes what is alive now out of later full collections."""

import gc

from brownout.engine.gc_pauses import GCPauses, freeze_startup_heap


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_collections_are_timed_by_generation():
    pauses = GCPauses().install()
    try:
        gc.collect(0)
        gc.collect(2)
        snap = pauses.snapshot()
    finally:
        pauses.uninstall()
    assert snap["gc_collections"]["0"] >= 1 and snap["gc_collections"]["2"] >= 1
    assert snap["gc_seconds"]["2"] > 0 and snap["gc_longest_s"] >= snap["gc_seconds"]["2"] / snap["gc_collections"]["2"]
    assert pauses._callback not in gc.callbacks
    gc.collect(2)  # uninstalled: no longer counted
    assert pauses.snapshot()["gc_collections"]["2"] == snap["gc_collections"]["2"]


def test_freeze_moves_the_live_heap_out_of_full_collections():
    keep = [_Node() for _ in range(2000)]
    try:
        frozen = freeze_startup_heap()
        # Frozen objects still die by reference count (a background thread's frames, say), so
        # the count can only fall after the freeze, never below what this test keeps alive.
        assert frozen >= 2000 and 2000 <= gc.get_freeze_count() <= frozen
        before = len(gc.get_objects(generation=2))
        garbage = [_Node() for _ in range(500)]
        del garbage
        assert gc.collect() >= 500  # new cyclic garbage is still collected
        assert len(gc.get_objects(generation=2)) <= before + 50  # the frozen heap is not walked
    finally:
        gc.unfreeze()  # leave the test process as it was
    assert gc.get_freeze_count() == 0
    del keep
