"""The brownout-aware autoscaling policy.

Each replica reports (`record_autoscaling_stats`) its tau (the lower of prefill and decode),
whether it refused requests lately (0 or 1), whether its latency model predicts a new
request's first token later than the TTFT SLO (0 or 1), and its load (requests running and
waiting over its batch size); Ray Serve averages each over `look_back_period_s`. Dimming is
the first signal: a replica runs below tau 1 only when its SLO controller predicts a
violation at the exact model, so a fleet whose replicas stay dimmed is short of capacity
before any request misses its SLO. Where dimming buys little (a model whose step time does
not shrink with tau, or a policy that does not dim), the predicted wait says the same: a
replica that would refuse if admission control were on.

* Scale up by one when any replica's mean tau over the window is below `tau_threshold`, it
  refused requests in the window, or its predicted first-token wait was over the SLO for at
  least half the window.
* Scale down by one when every replica ran at tau 1 and their summed load fits on one
  replica fewer at `headroom` load each (so the survivors stay undimmed).
* Hold otherwise.

"Sustained" is Ray's delay logic on top: a decision must persist for `upscale_delay_s`
(`downscale_delay_s`) before the replica count changes. While a new replica starts (minutes
for a large model), the existing replicas' controllers dim further: brownout serves the
burst until the capacity arrives.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

# Mean tau over the look-back window below which a replica counts as dimmed.
DEFAULT_TAU_THRESHOLD = 0.9
# Load (running + waiting requests over the batch size) each replica may carry after a
# scale-down: below a full batch, so the survivors stay at tau 1.
DEFAULT_HEADROOM = 0.5
# Mean tau at least this high counts as "at tau 1" (the window mean of a gauge that sat at 1).
TAU_ONE = 0.999

METRIC_TAU = "brownout_tau"
METRIC_REFUSING = "brownout_refusing"
METRIC_LOAD = "brownout_load"
METRIC_OVER_SLO = "brownout_over_slo"
# Share of the look-back window a replica's predicted wait must sit over the SLO to count.
OVER_SLO_SHARE = 0.5


def decide(tau: Mapping[Any, float], refusing: Mapping[Any, float], load: Mapping[Any, float],
           current: int, *, over_slo: Optional[Mapping[Any, float]] = None,
           tau_threshold: float = DEFAULT_TAU_THRESHOLD, headroom: float = DEFAULT_HEADROOM) -> int:
    """Desired replicas from each replica's window means (keyed by replica)."""
    if current <= 0 or not tau:
        return current
    if any(t < tau_threshold for t in tau.values()) or any(r > 0 for r in refusing.values()) \
            or any(o >= OVER_SLO_SHARE for o in (over_slo or {}).values()):
        return current + 1
    at_one = all(t >= TAU_ONE for t in tau.values())
    if current > 1 and at_one and len(load) >= current and \
            sum(load.values()) <= headroom * (current - 1):
        return current - 1
    return current


class BrownoutAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (a class, so `policy_kwargs` reach it): called with
    an `AutoscalingContext` every control-loop tick; returns (desired replicas, state)."""

    def __init__(self, tau_threshold: float = DEFAULT_TAU_THRESHOLD,
                 headroom: float = DEFAULT_HEADROOM):
        if not 0.0 < tau_threshold <= 1.0:
            raise ValueError(f"tau_threshold: {tau_threshold} is outside (0, 1]")
        if not 0.0 < headroom <= 1.0:
            raise ValueError(f"headroom: {headroom} is outside (0, 1]")
        self.tau_threshold, self.headroom = tau_threshold, headroom

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        desired = decide(metrics.get(METRIC_TAU, {}), metrics.get(METRIC_REFUSING, {}),
                         metrics.get(METRIC_LOAD, {}), ctx.current_num_replicas,
                         over_slo=metrics.get(METRIC_OVER_SLO, {}), tau_threshold=self.tau_threshold, headroom=self.headroom)
        return desired, dict(ctx.policy_state or {})
