"""Accuracy prices of the degradation rungs, read from a measured table.

A price is the relative perplexity increase of the model at a rung (tau, k') over the exact
model (tau = 1, k' = k), as `brownout eval perplexity --tau ... --top-k ...` measures it on
held-out text. The table lists measured points; a price between two measured taus of one k'
is interpolated linearly in tau, and a k' absent from the table has no price (the controller
does not use a rung it cannot price). The controller uses prices to choose among rungs and to
account the accuracy spent over a run.

Table format (JSON): {"model_top_k": k, "prices": [{"top_k": k', "tau": t, "ppl_increase": p}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

# name of the price table beside a united-expert directory (and of the demo model's default)
PRICE_FILE = "ladder-prices.json"


@dataclass(frozen=True)
class PriceTable:
    model_top_k: int
    # k' -> (taus ascending, prices at those taus)
    points: dict[int, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def from_dict(cls, data: dict) -> "PriceTable":
        k = int(data["model_top_k"])
        rows: dict[int, dict[float, float]] = {}
        for row in data["prices"]:
            top_k = k if row.get("top_k") is None else int(row["top_k"])
            rows.setdefault(top_k, {})[float(row["tau"])] = max(0.0, float(row["ppl_increase"]))
        points = {kk: (np.array(sorted(r)), np.array([r[t] for t in sorted(r)])) for kk, r in rows.items()}
        return cls(k, points)

    @classmethod
    def load(cls, path: Path) -> "PriceTable":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def shed_levels(self) -> list[int]:
        """The priced k' below the model's k, largest first."""
        return sorted((kk for kk in self.points if kk < self.model_top_k), reverse=True)

    def price(self, tau: float, top_k: Optional[int] = None) -> Optional[float]:
        """Perplexity increase at (tau, k'), None when k' was not measured. A k' measured
        at one tau only is priced there at every tau."""
        kk = self.model_top_k if top_k is None or top_k >= self.model_top_k else int(top_k)
        if kk not in self.points:
            return None if kk != self.model_top_k else 0.0
        taus, prices = self.points[kk]
        return float(np.interp(tau, taus, prices))


def find_price_table(dirs: list[Path], model_top_k: int) -> Optional[PriceTable]:
    """The first `PRICE_FILE` in `dirs` measured for a model of `model_top_k` routed experts."""
    for d in dirs:
        path = Path(d) / PRICE_FILE
        if path.is_file():
            table = PriceTable.load(path)
            if table.model_top_k == model_top_k:
                return table
    return None
