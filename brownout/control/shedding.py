"""Expert shedding in the predictive controller: how much faster a step runs at k' < k,
and which (tau, k') rung a step takes when tau alone cannot meet its target.

`ShedModel` predicts a shed step's latency as g(k') times the full model's prediction (same
tau), g(k') = 1 - s * (1 - k'/k): a share s of the step's time scales with its routed
assignments (the expert GEMMs of a compute-bound step). s starts at `shed_prior_share` and
follows each shed step's observed / predicted ratio as a moving mean; one s for every k', so
a step at one k' also teaches the others.

`choose_shed` picks a rung among every (grid tau, priced k'): the cheapest in accuracy
(`PriceTable`) that meets the target; when none does, among the rungs that keep
`gain_share` of the largest predicted speed-up over the tau-only choice, the one with the
most speed-up per unit of accuracy spent. numpy only.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from brownout.control.prices import PriceTable
from brownout.control.tuning import PredictiveTuning

# a price below this counts as free when dividing a gain by it
MIN_PRICE = 1e-6
# a step's observed / predicted ratio is capped here: one stalled step must not move the
# shared share s by more than one bounded sample
MAX_SHED_RATIO = 1.5


class ShedModel:
    def __init__(self, tuning: PredictiveTuning, model_top_k: int):
        self.alpha = tuning.shed_alpha
        self.k = model_top_k
        self.share = tuning.shed_prior_share  # s: share of latency that scales with k' / k
        self.num_samples = 0

    def ratio(self, top_k: int) -> float:
        """g(k') = 1 - s * (1 - k'/k): latency at k' over latency at the model's k."""
        return 1.0 - self.share * (1.0 - min(top_k, self.k) / self.k)

    def update(self, top_k: int, observed: float, predicted_full: float) -> None:
        """One shed step: its observed latency and the full model's prediction for it."""
        cut = 1.0 - min(top_k, self.k) / self.k
        if cut <= 0 or not (predicted_full > 0 and np.isfinite(observed) and observed >= 0):
            return
        ratio = min(observed / predicted_full, MAX_SHED_RATIO)
        share = min(1.0, max(0.0, (1.0 - ratio) / cut))
        self.num_samples += 1
        self.share += max(self.alpha, 1.0 / self.num_samples) * (share - self.share)


def choose_shed(grid: np.ndarray, p90_full: np.ndarray, chosen: tuple[float, float],
                feasible: Callable[[np.ndarray], np.ndarray], prices: PriceTable,
                model: ShedModel, gain_share: float) -> Optional[tuple[float, int]]:
    """The (tau, k') rung for a step whose tau-only choice misses its target, or None to keep
    that choice. p90_full [n]: predicted P90 at each grid tau at the model's k (the bias and
    noise terms are taken to scale with the step as its latency does); chosen: (tau, P90) of
    the tau-only choice; feasible(p90) -> bool mask of the rungs meeting the target."""
    tau_chosen, p90_chosen = chosen
    price_chosen = prices.price(tau_chosen) or 0.0
    cands = []  # (price, -p90, tau, k')
    for top_k in prices.shed_levels:
        p90 = p90_full * model.ratio(top_k)
        ok = feasible(p90)
        for i, tau in enumerate(grid):
            price = prices.price(float(tau), top_k)
            if price is not None:
                cands.append((price, float(p90[i]), float(tau), top_k, bool(ok[i])))
    if not cands:
        return None
    meets = [c for c in cands if c[4]]
    if meets:  # cheapest that meets the target; ties: the faster
        price, _, tau, top_k, _ = min(meets, key=lambda c: (c[0], c[1]))
        return tau, top_k
    gains = np.array([p90_chosen - c[1] for c in cands])
    best = float(gains.max())
    if best <= 0:
        return None
    good = [(g / max(c[0] - price_chosen, MIN_PRICE), c) for g, c in zip(gains, cands)
            if g >= gain_share * best]
    _, c = max(good, key=lambda gc: gc[0])
    return c[2], c[3]
