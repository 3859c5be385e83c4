"""The predictive controller's tuning knobs, in one frozen dataclass.

`PredictiveController` (brownout.control.predictive) and its online models
(brownout.control.latency_model) read every threshold, window, quantile and rate from a
`PredictiveTuning`; the defaults below are the values the controller is tested and
benchmarked with. Each field's comment says what it trades.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from brownout.types import ValidationError


@dataclass(frozen=True, slots=True)
class PredictiveTuning:
    """Knobs of the predictive controller and its latency / experts models."""

    # -- the decision ------------------------------------------------------------------
    # tau grid 1.0, 0.95, ..., 0: steps of 0.05 are finer than the model's accuracy
    grid_points: int = 21
    # headroom under the SLO for what the model misses: target = SLO * (1 - margin - ...)
    margin: float = 0.05
    # one-sided standard-normal quantile of the 90th percentile (rounded): the controller
    # predicts a step's P90 latency, as the SLO windows judge P90
    z: float = 1.28
    # steps the models need before they are trusted; until then the policy acts as aimd
    min_samples: int = 24
    # share of dimmed steps in a phase's own latency fit (by its decayed weight) before it
    # replaces the pooled fit: fed mostly undimmed steps it cannot price what fewer experts save
    phase_fit_dimmed_share: float = 0.2
    # raise tau only when P90 <= target * (1 - hysteresis), so tau does not flap at the edge
    hysteresis: float = 0.05
    # tau rises at most this much per second; lowering is immediate (safety first)
    max_raise_per_s: float = 1.0
    # extra margin while the waiting queue grows, so the controller dims before latency breaks
    growth_margin: float = 0.05
    # the queue counts as growing when it is longer than this many seconds ago
    queue_growth_window_s: float = 1.0
    # best effort keeps this share of the speed-up the fastest tau offers over tau 1: a
    # latency curve flat below some tau (the knee) stops there instead of spending accuracy
    # for the last tenth
    gain_share: float = 0.9
    # idle (no queue), best effort also accepts any tau within this fraction of the fastest,
    # so a host-bound step that dimming would not speed up keeps tau 1
    effort_tolerance: float = 0.03
    # a predicted gain no larger than this many residual sigmas is not told apart from step
    # noise: tau stays 1 rather than spend accuracy for nothing
    noise_sigmas: float = 1.0

    # -- the residual (observed - predicted latency) ---------------------------------------
    # weight of the newest residual in its moving mean and spread (about the last 10 steps)
    residual_alpha: float = 0.1
    # one residual moves the mean by at most this many sigmas ...
    clip_sigmas: float = 4.0
    # ... or this share of the predicted latency when larger (the floor while sigma is
    # small), so one stalled step (a host pause) barely moves the prediction
    clip_share_of_prediction: float = 0.25

    # -- SLO pressure (user-facing TTFT / TPOT P90 over its SLO) ----------------------------
    # pressure is updated at most this often
    pressure_interval_s: float = 1.0
    # target tightening added per update while the user-facing P90 exceeds its SLO ...
    pressure_rise: float = 0.05
    # ... and removed per update while it does not (half as fast: recover cautiously)
    pressure_fall: float = 0.025
    # the most the pressure tightens a target
    max_pressure: float = 0.3
    # prefill pressure decay per update while no request waits (late TTFTs in the window
    # then belong to a drained backlog that faster steps no longer help)
    idle_decay: float = 0.1

    # -- the step-latency model ---------------------------------------------------------
    # refit the ridge regression every this many steps: the fit moves slowly, and a refit
    # costs host time per step
    refit_every: int = 4
    # exponential forgetting: a step's weight halves every this many steps
    half_life_steps: float = 256.0
    # ridge penalty on each slope, on the scale of that feature's own spread
    ridge: float = 1e-3
    # the slope prior gives this share of the mean latency to expert reads (decode is
    # memory-bound); it decides only what the data cannot, e.g. collinear features at tau 1
    prior_expert_share: float = 0.5

    # -- the experts-touched model ----------------------------------------------------------
    # weight of the newest sample in the per-bucket moving means, once a bucket has 1/alpha
    # samples (tracks drift of the traffic's expert mix)
    experts_alpha: float = 0.05
    # E(tau=0) / E(tau=1) assumed until a step at tau near 0 was seen
    r0_prior: float = 0.3
    # tau buckets of the ratio E(tau) / E(1), each 1 / tau_buckets wide
    tau_buckets: int = 10
    # a step's ratio E(tau) / E1(T) is capped here: E1(T) is an estimate, and one odd step
    # above it must not lift the whole curve
    max_experts_ratio: float = 1.5
    # past the largest token bucket seen, with a single bucket known, E1(T) grows by this
    # share of E1 per doubling of T (half of linear growth)
    single_bucket_growth: float = 0.5

    # -- expert shedding (k' < k) -------------------------------------------------------
    # share of a step's latency that scales with its routed assignments (k' / k), assumed
    # for a k' until steps at it were seen: the expert GEMMs of a compute-bound step
    shed_prior_share: float = 0.5
    # weight of the newest step in the moving mean of observed / predicted latency per k'
    shed_alpha: float = 0.1
    # the speed-up of shedding counts toward `prefill_speedup` (what admission credits) only
    # once this many shed steps taught the shedding model: before, it is the prior's guess,
    # and a queue admitted on it may need more speed than any rung gives
    shed_credit_samples: int = 8

    # -- the step's token budget and the running-batch cap (the `ladder` policy) -------------
    # a chosen step budget leaves at least this many prompt tokens beside the decodes, so
    # prefill never stalls behind decodes
    min_prefill_chunk: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValidationError(f.name, f"must be a non-negative number, got {value!r}")
        for name in ("grid_points", "min_samples", "refit_every", "tau_buckets", "min_prefill_chunk",
                     "shed_credit_samples"):
            if not isinstance(getattr(self, name), int):
                raise ValidationError(name, f"must be an integer, got {getattr(self, name)!r}")
        for name in ("grid_points", "tau_buckets"):
            if getattr(self, name) < 2:
                raise ValidationError(name, f"must be at least 2, got {getattr(self, name)}")
        for name in ("refit_every", "half_life_steps", "pressure_interval_s",
                     "queue_growth_window_s", "experts_alpha", "residual_alpha"):
            if getattr(self, name) <= 0:
                raise ValidationError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("gain_share", "experts_alpha", "residual_alpha", "shed_prior_share", "shed_alpha"):
            if getattr(self, name) > 1:
                raise ValidationError(name, f"must be in [0, 1], got {getattr(self, name)}")


DEFAULT_TUNING = PredictiveTuning()
