"""Ways to build one united expert from its group's members (SPEC 1.2).

`average`: uniform mean of the members' weights. `frequency`: mean weighted by how often
each member is routed to on calibration data. `distill`: start from `frequency`, then fit
the united expert with Adam so that, on calibration states routed to the group, its
output times the token's summed group weight matches the routing-weighted mixture of the
members' outputs (mean squared error, held-out split, early stopping).

Expert weights follow the packed layout: w13 [2I, D] (gate rows then up rows), w2 [D, I].
"""

from __future__ import annotations

import copy
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

    def split(self, held_out: float, seed: int) -> tuple["GroupData", "GroupData"]:
        n = self.x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.x.device)
        n_val = max(1, int(n * held_out)) if n > 1 else 0
        val, train = perm[:n_val], perm[n_val:]
        pick = lambda i: GroupData(self.x[i], self.target[i], self.weight[i])  # noqa: E731
        return pick(train), pick(val)


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


@dataclass
class DistillConfig:
    max_steps: int = 1000
    batch_tokens: int = 1024
    lr_scale: float = 0.02  # Adam step relative to the RMS of each weight tensor
    eval_every: int = 25
    patience: int = 4  # evaluations without improvement before stopping
    held_out: float = 0.1


def distill(w13: torch.Tensor, w2: torch.Tensor, train: GroupData, val: GroupData,
            cfg: DistillConfig, seed: int):
    """Fit (w13 [2I, D], w2 [D, I]) to the group's mixture; returns the best on `val`."""
    if train.x.shape[0] == 0 or val.x.shape[0] == 0:
        return w13, w2, {"steps": 0, "stopped": "no data"}
    p13 = torch.nn.Parameter(w13.detach().clone().float())
    p2 = torch.nn.Parameter(w2.detach().clone().float())
    rms = lambda t: float(t.detach().pow(2).mean().sqrt()) or 1e-3  # noqa: E731
    opt = torch.optim.Adam([{"params": [p13], "lr": cfg.lr_scale * rms(p13)},
                            {"params": [p2], "lr": cfg.lr_scale * rms(p2)}])
    scale = float(train.target.pow(2).sum(dim=1).mean()) or 1.0
    gen = torch.Generator().manual_seed(seed)
    best_err = fit_error(p13, p2, val)
    best = (copy.deepcopy(p13.data), copy.deepcopy(p2.data))
    best_step, bad, step = 0, 0, 0
    n = train.x.shape[0]
    for step in range(1, cfg.max_steps + 1):
        idx = torch.randint(0, n, (min(cfg.batch_tokens, n),), generator=gen).to(train.x.device)
        pred = train.weight[idx, None] * expert_forward(p13, p2, train.x[idx])  # [b, D]
        loss = (pred - train.target[idx]).pow(2).sum(dim=1).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0:
            err = fit_error(p13, p2, val)
            if err < best_err:
                best_err, best, best_step, bad = err, (p13.data.clone(), p2.data.clone()), step, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    info = {"steps": step, "best_step": best_step}
    return best[0].to(w13.dtype), best[1].to(w2.dtype), info
