"""Ways to build one united expert from its group's members (SPEC 1.2).

`average`: uniform mean of the members' weights. `frequency`: mean weighted by how often
each member is routed to on calibration data. `distill` (brownout.unite.distill): start
from one of those, then fit the united expert to the members' routed mixture on
calibration states.

Expert weights follow the packed layout: w13 [2I, D] (gate rows then up rows), w2 [D, I].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def expert_forward(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x [n, D] -> [n, D]."""
    inter = w2.shape[-1]
    h = x @ w13.t()  # [n, 2I]
    return (F.silu(h[:, :inter]) * h[:, inter:]) @ w2.t()  # [n, D]


def average(w13: torch.Tensor, w2: torch.Tensor, members: Sequence[int]):
    """w13 [E, 2I, D], w2 [E, D, I] -> united (w13 [2I, D], w2 [D, I]), uniform mean."""
    idx = torch.as_tensor(list(members), device=w13.device)
    return w13[idx].mean(dim=0), w2[idx].mean(dim=0)


def frequency(w13: torch.Tensor, w2: torch.Tensor, members: Sequence[int], counts: torch.Tensor):
    """Mean weighted by routing counts [E]; uniform when no member was routed to."""
    idx = torch.as_tensor(list(members), device=w13.device)
    c = counts.to(w13.device, torch.float64)[idx]  # [m]
    if float(c.sum()) <= 0:
        return average(w13, w2, members)
    p = (c / c.sum()).to(w13.dtype)
    return torch.einsum("m,mod->od", p, w13[idx]), torch.einsum("m,mdi->di", p, w2[idx])


@dataclass
class GroupData:
    """Calibration tokens routed to one group (see calibration.group_targets)."""

    x: torch.Tensor  # [n, D]
    target: torch.Tensor  # [n, D] routing-weighted mixture of the members' outputs
    weight: torch.Tensor  # [n] summed routing weight of the group for each token
    source: Optional[torch.Tensor] = None  # [n] calibration source of each token

    def pick(self, rows: torch.Tensor) -> "GroupData":
        return GroupData(self.x[rows], self.target[rows], self.weight[rows],
                         None if self.source is None else self.source[rows])

    def split(self, held_out: float, seed: int) -> tuple["GroupData", "GroupData"]:
        """(train, val): a random `held_out` share of the tokens for validation."""
        n = self.x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.x.device)
        n_val = max(1, int(n * held_out)) if n > 1 else 0
        return self.pick(perm[n_val:]), self.pick(perm[:n_val])


def fit_error(w13: torch.Tensor, w2: torch.Tensor, data: GroupData, chunk: int = 8192) -> Optional[float]:
    """Relative squared error sum ||w U(x) - target||^2 / sum ||target||^2 (None: no data)."""
    if data.x.shape[0] == 0:
        return None
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, data.x.shape[0], chunk):
            pred = data.weight[s:s + chunk, None] * expert_forward(w13, w2, data.x[s:s + chunk])
            num += float(((pred - data.target[s:s + chunk]) ** 2).sum())
            den += float((data.target[s:s + chunk] ** 2).sum())
    return num / max(den, 1e-30)
