"""Online models behind the predictive controller: experts touched, and step latency.

`ExpertsModel` estimates E(tau, T), the distinct expert slots a step of T tokens touches
(summed over MoE layers) at threshold tau, as E1(T) * r(tau):
  E1(T)  at tau ~ 1, a running mean per log2(T) bucket, interpolated in log2(T), made
         non-decreasing in T; past the largest bucket seen it grows log-linearly, never
         faster than linearly in T (distinct experts cannot grow faster than T * top_k).
  r(tau) the ratio E / E1(T) observed at each tau bucket (0.1 wide), with r(1) = 1 and a
         prior knot at tau = 0 until that bucket is seen; made non-decreasing in tau
         (raising a noisy dip: over-predicting experts errs on the safe side). The ratio
         depends on T: a few tokens touch few experts at any tau, while a large step at tau
         1 touches nearly all and at tau 0 only the united ones (about 0.3 of them at 1024
         tokens against 0.7 at a handful), so a tau bucket seen at T's log2 bucket often
         enough uses that bucket's own ratio, the pooled one otherwise.
`StepLatencyModel` fits latency ~ a + b*tokens + c*batch + d*experts + r*routed by ridge least
squares with exponential forgetting (recent steps weigh more); the slopes are shrunk
toward a prior that gives a share `prior_expert_share` of the mean latency to expert reads (decode is
memory-bound, SPEC 1.1); the prior only decides what the data cannot (e.g. experts and
tokens moving together while tau sits at 1). Slopes are kept non-negative. `routed` is 1
for a step run with brownout routing (tau < 1): its fixed cost, which fewer expert reads
must repay, so the controller does not dim when dimming cannot make a step faster.
Both are numpy only, never raise on degenerate input and return None when unfit. Their knobs
are fields of `PredictiveTuning` (brownout.control.tuning).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from brownout.control.tuning import DEFAULT_TUNING, PredictiveTuning

# latency features: [1, tokens, batch, experts, routed]; the moments add the latency itself
NUM_FEATURES = 5
NUM_SLOPES = NUM_FEATURES - 1  # all but the intercept: [tokens, batch, experts, routed]
EXPERTS_SLOPE = 2  # index of experts among the slopes (and of its mean)
LATENCY_MEAN = NUM_SLOPES  # index of the latency among the weighted means
# tiny floors of the ridge penalty: relative to each feature's squared mean, then absolute,
# so a constant (zero-spread) feature still gets a positive penalty and the solve stays regular
RIDGE_MEAN_FLOOR = 1e-6
RIDGE_ABS_FLOOR = 1e-9
# two token buckets closer than this in log2(T) give no slope to extrapolate with
MIN_BUCKET_GAP = 1e-9
# a token bucket's own ratio E / E1 at a tau bucket replaces the pooled one after this many
# steps: one step's count of experts is noisy
BUCKET_RATIO_MIN_SAMPLES = 4
# a spread (and so a fit) needs at least two steps
MIN_FIT_SAMPLES = 2


def _running_update(mean: float, n: int, x: float, alpha: float) -> float:
    """Mean of the first samples, then an exponential moving average (tracks drift)."""
    w = max(alpha, 1.0 / n)
    return mean + w * (x - mean)


class ExpertsModel:
    def __init__(self, tuning: PredictiveTuning = DEFAULT_TUNING):
        self.alpha = tuning.experts_alpha
        self.r0_prior = tuning.r0_prior  # guess of E(tau=0)/E(tau=1) before tau=0 was observed
        self.tau_buckets = tuning.tau_buckets
        self.max_ratio = tuning.max_experts_ratio
        self.single_bucket_growth = tuning.single_bucket_growth
        self._full: dict[int, list] = {}  # log2 bucket -> [n, mean log2 T, mean E1]
        self._ratio: dict[int, list] = {}  # tau bucket -> [n, mean ratio]
        self._ratio_at: dict[tuple[int, int], list] = {}  # (log2 T bucket, tau bucket) -> same
        self._full_knots: Optional[tuple[np.ndarray, np.ndarray]] = None  # caches, reset on update
        self._ratio_knots: dict[Optional[int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def ready(self) -> bool:
        return bool(self._full)

    def update(self, tau: float, tokens: int, experts: float) -> None:
        if tokens <= 0 or not (math.isfinite(experts) and math.isfinite(tau)) or experts < 0:
            return
        if tau >= 1.0 - 0.5 / self.tau_buckets:  # the bucket of tau = 1
            lx = math.log2(tokens)
            rec = self._full.setdefault(int(lx), [0, 0.0, 0.0])
            rec[0] += 1
            rec[1] = _running_update(rec[1], rec[0], lx, self.alpha)
            rec[2] = _running_update(rec[2], rec[0], experts, self.alpha)
            self._full_knots = None
            return
        full = self.full(tokens)
        if full is None or full <= 0:
            return
        ratio = min(experts / full, self.max_ratio)
        key = self._ratio_key(tokens, tau)
        for rec in (self._ratio.setdefault(key[1], [0, 0.0]), self._ratio_at.setdefault(key, [0, 0.0])):
            rec[0] += 1
            rec[1] = _running_update(rec[1], rec[0], ratio, self.alpha)
        self._ratio_knots = {}

    def bucket_known(self, tokens: float, tau: float) -> bool:
        """Whether steps of `tokens` tokens were seen at `tau`'s bucket often enough for
        their own ratio to replace the pooled one."""
        if tokens < 1 or tau >= 1.0 - 0.5 / self.tau_buckets:
            return True  # tau 1 needs no ratio
        rec = self._ratio_at.get(self._ratio_key(tokens, tau))
        return rec is not None and rec[0] >= BUCKET_RATIO_MIN_SAMPLES

    def _ratio_key(self, tokens: float, tau: float) -> tuple[int, int]:
        """(log2 token bucket, tau bucket) of a step of `tokens` (>= 1) tokens at `tau`."""
        return int(math.log2(tokens)), int(round(tau * self.tau_buckets))

    def full(self, tokens: float) -> Optional[float]:
        """E1(T): experts touched at tau = 1 by a step of `tokens` tokens."""
        if not self._full or tokens <= 0:
            return None if not self._full else 0.0
        if self._full_knots is None:
            recs = sorted(self._full.values(), key=lambda r: r[1])
            self._full_knots = (np.array([r[1] for r in recs]),
                                np.maximum.accumulate(np.array([r[2] for r in recs])))
        xs, ys = self._full_knots
        lx = math.log2(tokens)
        if lx <= xs[0]:
            return float(ys[0] * tokens / 2.0 ** xs[0])  # below: at most linear in T
        if lx <= xs[-1]:
            return float(np.interp(lx, xs, ys))
        cap = ys[-1] * tokens / 2.0 ** xs[-1]
        if len(xs) >= 2 and xs[-1] - xs[-2] > MIN_BUCKET_GAP:
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        else:
            slope = self.single_bucket_growth * ys[-1]  # one bucket only
        return float(min(cap, ys[-1] + slope * (lx - xs[-1])))

    def ratio(self, taus: np.ndarray, tokens: Optional[float] = None) -> np.ndarray:
        """r(tau) = E(tau) / E1, non-decreasing in tau, r(1) = 1; at a step of `tokens` tokens
        where its log2 bucket was seen at a tau bucket, that bucket's own ratio there."""
        tb = int(math.log2(tokens)) if tokens is not None and tokens >= 1 else None
        if tb not in self._ratio_knots:
            knots = {1.0: 1.0}
            for b, (n, r) in self._ratio.items():
                own = self._ratio_at.get((tb, b)) if tb is not None else None
                if own is not None and own[0] >= BUCKET_RATIO_MIN_SAMPLES:
                    n, r = own
                if n > 0:
                    knots[b / self.tau_buckets] = r
            if 0.0 not in knots:
                knots[0.0] = min([self.r0_prior, *knots.values()])
            kx = np.array(sorted(knots))
            self._ratio_knots[tb] = (kx, np.maximum.accumulate(np.array([knots[x] for x in kx])))
        kx, ky = self._ratio_knots[tb]
        return np.interp(np.clip(taus, 0.0, 1.0), kx, ky)

    def predict(self, taus: np.ndarray, tokens: float) -> Optional[np.ndarray]:
        full = self.full(tokens)
        if full is None:
            return None
        return full * self.ratio(np.asarray(taus, dtype=float), tokens)


class StepLatencyModel:
    """Exponentially weighted ridge fit of step latency on [1, tokens, batch, experts, routed].

    Keeps the weighted moments S = sum_i w_i z_i z_i^T of z = [1, T, B, E, R, latency] with
    w_i halving every `half_life_steps` steps, so an update and a refit cost O(1).
    """

    def __init__(self, tuning: PredictiveTuning = DEFAULT_TUNING):
        self.decay = 0.5 ** (1.0 / tuning.half_life_steps)
        self.ridge = tuning.ridge
        self.prior_expert_share = tuning.prior_expert_share
        self._S = np.zeros((NUM_FEATURES + 1, NUM_FEATURES + 1))
        self.num_samples = 0
        self.theta: Optional[np.ndarray] = None  # [a, b, c, d, r]

    def add(self, tokens: float, batch: float, experts: float, latency: float,
            routed: float = 0.0) -> None:
        z = np.array([1.0, tokens, batch, experts, routed, latency], dtype=float)
        if not np.all(np.isfinite(z)) or latency < 0:
            return
        self._S *= self.decay
        self._S += np.outer(z, z)
        self.num_samples += 1

    def fit(self) -> bool:
        """Refit from the moments; keeps the previous fit if this one is not finite."""
        if self.num_samples < MIN_FIT_SAMPLES:
            return False
        theta = self._solve()
        if theta is None or not np.all(np.isfinite(theta)):
            return False
        self.theta = theta
        return True

    def _solve(self) -> Optional[np.ndarray]:
        w = self._S[0, 0]
        mean = self._S[0, 1:] / w  # weighted means of [T, B, E, R, latency]
        cov = self._S[1:, 1:] / w - np.outer(mean, mean)
        cxx, cxy = cov[:NUM_SLOPES, :NUM_SLOPES], cov[:NUM_SLOPES, LATENCY_MEAN]
        # Prior slopes: a share of the mean latency goes to expert reads, none to the rest.
        prior = np.zeros(NUM_SLOPES)
        if mean[EXPERTS_SLOPE] > 0:
            prior[EXPERTS_SLOPE] = self.prior_expert_share * mean[LATENCY_MEAN] / mean[EXPERTS_SLOPE]
        # Ridge on each slope on the scale of its own spread, plus a floor relative to
        # its mean: the prior only decides where the data are flat (collinear or
        # constant features, e.g. experts moving with tokens while tau sits at 1).
        lam = (self.ridge * np.maximum(np.diag(cxx), 0.0) + RIDGE_MEAN_FLOOR * mean[:NUM_SLOPES] ** 2
               + RIDGE_ABS_FLOOR)
        A, b = cxx + np.diag(lam), cxy + lam * prior
        active = list(range(NUM_SLOPES))
        slopes = np.zeros(NUM_SLOPES)
        # active set: slopes that come out negative are fixed at 0; each round drops at least
        # one, so as many rounds as slopes suffice
        for _ in range(NUM_SLOPES):
            idx = np.ix_(active, active)
            try:
                sol = np.linalg.solve(A[idx], b[active])
            except np.linalg.LinAlgError:
                sol = np.linalg.lstsq(A[idx], b[active], rcond=None)[0]
            slopes = np.zeros(NUM_SLOPES)
            slopes[active] = sol
            negative = [j for j in active if slopes[j] < 0]
            if not negative:
                break
            active = [j for j in active if j not in negative]
        slopes = np.maximum(slopes, 0.0)
        return np.concatenate([[mean[LATENCY_MEAN] - slopes @ mean[:NUM_SLOPES]], slopes])

    def predict(self, X: np.ndarray) -> Optional[np.ndarray]:
        """Latency for rows [1, tokens, batch, experts, routed]; None before the first fit."""
        if self.theta is None:
            return None
        return np.maximum(np.asarray(X, dtype=float) @ self.theta, 0.0)
