"""The wait an engine predicts for a request arriving now: what each replica publishes for
routing (`Admission.predicted_wait_s`) and exports as brownout_predicted_ttft_seconds."""

from __future__ import annotations

import pytest

from brownout.config import SchedulerConfig
from brownout.engine.admission import Admission
from brownout.engine.scheduler import QueueView


def test_predicted_wait():
    view = QueueView(max_num_seqs=4)
    adm = Admission(SchedulerConfig(max_num_seqs=4), ttft_slo_s=1.0, view=view)
    assert adm.predicted_wait_s(0.0) == 0.0  # idle: no step in flight, nothing ahead
    view.num_running, view.num_waiting = 1, 2
    # no prefill rate measured yet: a step per request ahead and one for itself
    assert adm.predicted_wait_s(0.0) == pytest.approx(3 * adm.step_time_s)
    for _ in range(8):  # 1000 prompt tokens per second
        adm.observe_step(100, 0.1, queue_left=True)
    view.waiting_tokens, view.running_prefill_tokens = 300, 200
    assert adm.predicted_wait_s(0.0) == pytest.approx(0.5 + adm.step_time_s)
    assert adm.snapshot(0.0)["admission_predicted_wait_s"] == pytest.approx(0.5 + adm.step_time_s)
