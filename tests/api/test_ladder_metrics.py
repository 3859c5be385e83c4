"""/metrics carries the controller's rungs: k' per phase and the accuracy spent over the run."""

from __future__ import annotations

from conftest import metric_value

from brownout.api.metrics import ServerMetrics


def test_top_k_and_accuracy_spent_follow_the_snapshot():
    m = ServerMetrics("demo")
    m.on_snapshot(dict(tau_prefill=0.5, tau_decode=1.0, top_k_prefill=2, top_k_decode=4,
                       accuracy_spent={"time_weighted": 0.012, "token_weighted": 0.03}))
    text = m.render().decode()
    assert metric_value(text, "brownout_top_k", {"phase": "prefill"}) == 2
    assert metric_value(text, "brownout_top_k", {"phase": "decode"}) == 4
    assert metric_value(text, "brownout_accuracy_spent", {"weighting": "time"}) == 0.012
    assert metric_value(text, "brownout_accuracy_spent", {"weighting": "token"}) == 0.03


def test_a_snapshot_without_prices_sets_no_accuracy():
    m = ServerMetrics("demo")
    m.on_snapshot(dict(tau_prefill=1.0, tau_decode=1.0, accuracy_spent=None))
    assert "brownout_accuracy_spent{" not in m.render().decode()
