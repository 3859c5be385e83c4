"""Distillation of one united expert, validated on calibration sources it was not fitted on.

The united expert U is fitted with Adam so that, on calibration states routed to its group,
w * U(x) matches the routing-weighted mixture of the members' outputs (w: the token's
summed group weight). What matters is how well U stands in on text unlike the calibration,
so validation leaves whole sources out: for each left-out source k (every source, or
`max_folds` of them, rotating over groups) a fold model is trained on the other sources
and scored on k, in lockstep with the model that is kept, trained on all sources. Training stops when the mean error over
the left-out sources stops improving, and the kept model is the one at the step where that
mean was lowest (so a group whose fit does not carry over to unseen sources keeps its
start). A group whose tokens come from one source falls back to a random split.

Regularisers, both optional: an L2 pull toward the start (`anchor`, on the squared
distance relative to the start's squared norm) and AdamW's decoupled weight decay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from brownout.unite.methods import GroupData, fit_error
from brownout.unite.options import DistillConfig

log = logging.getLogger(__name__)

@dataclass
class Fold:
    """Rows a fold model trains on, and the tokens it is scored on."""

    train: torch.Tensor  # [n_train] row indices into the group's data
    val: GroupData
    held_out_source: Optional[int]  # None: a random split


def make_folds(data: GroupData, cfg: DistillConfig, seed: int) -> list[Fold]:
    """Leave-one-source-out folds, or one random split where fewer than two sources qualify."""
    n = data.x.shape[0]
    if n < 2:
        return []
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(n, device=data.x.device)
    if cfg.validation == "sources" and data.source is not None:
        sources = [s for s in data.source.unique().tolist()
                   if cfg.min_fold_tokens <= int((data.source == s).sum()) < n]
        if cfg.max_folds and len(sources) > cfg.max_folds:  # rotate which sources are left out
            first = seed % len(sources)
            sources = [sources[(first + i) % len(sources)] for i in range(cfg.max_folds)]
        folds = []
        for s in sources:
            mine = data.source == s
            val = rows[mine]
            val = val[torch.randperm(val.numel(), generator=gen)[:cfg.max_val_tokens].to(val.device)]
            folds.append(Fold(rows[~mine], data.pick(val), int(s)))
        if len(folds) >= 2:
            return folds
    perm = torch.randperm(n, generator=gen).to(data.x.device)
    n_val = min(max(1, int(n * cfg.held_out)), cfg.max_val_tokens)
    return [Fold(perm[n_val:], data.pick(perm[:n_val]), None)]


def held_out_error(w13: torch.Tensor, w2: torch.Tensor, folds: list[Fold]) -> Optional[float]:
    """Mean over folds of the relative error on each fold's validation tokens."""
    errors = [fit_error(w13, w2, f.val) for f in folds]
    errors = [e for e in errors if e is not None]
    return sum(errors) / len(errors) if errors else None


def _batched_forward(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M SwiGLU experts at once: w13 [M, 2I, D], w2 [M, D, I], x [M, b, D] -> [M, b, D]."""
    inter = w2.shape[-1]
    h = torch.bmm(x, w13.transpose(1, 2))  # [M, b, 2I]
    return torch.bmm(F.silu(h[..., :inter]) * h[..., inter:], w2.transpose(1, 2))


def _rel_distance(p: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Squared distance of each model's weights [M, ...] from the start, relative -> [M]."""
    return (p - start).pow(2).flatten(1).sum(1) / start.pow(2).sum().clamp_min(1e-30)


def distill(w13: torch.Tensor, w2: torch.Tensor, data: GroupData, folds: list[Fold],
            cfg: DistillConfig, seed: int, trace: Optional[list] = None):
    """Fit (w13 [2I, D], w2 [D, I]) to the group's mixture -> (w13, w2, info).

    Model m < len(folds) trains on fold m's rows; the last model, the one returned, on all.
    `trace`, if given, receives (step, [validation error of each fold]) at every evaluation.
    """
    if not folds:
        return w13, w2, {"steps": 0, "stopped": "no data"}
    trains = [f.train for f in folds] + [torch.arange(data.x.shape[0], device=data.x.device)]
    M = len(trains)
    s13, s2 = w13.detach().float(), w2.detach().float()
    p13 = torch.nn.Parameter(s13.unsqueeze(0).repeat(M, 1, 1))
    p2 = torch.nn.Parameter(s2.unsqueeze(0).repeat(M, 1, 1))
    rms = lambda t: float(t.pow(2).mean().sqrt()) or 1e-3  # noqa: E731
    opt = torch.optim.AdamW([{"params": [p13], "lr": cfg.lr_scale * rms(s13)},
                             {"params": [p2], "lr": cfg.lr_scale * rms(s2)}],
                            weight_decay=cfg.weight_decay)
    scale = torch.stack([data.target[t].pow(2).sum(dim=1).mean() for t in trains]).clamp_min(1e-30)
    sizes = torch.tensor([t.numel() for t in trains], dtype=torch.float64)
    batch = min(cfg.batch_tokens, data.x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    best_err = held_out_error(s13, s2, folds)
    if trace is not None:
        trace.append((0, [fit_error(s13, s2, f.val) for f in folds]))
    best, best_step, bad, step = (s13, s2), 0, 0, 0
    for step in range(1, cfg.max_steps + 1):
        pick = (torch.rand(M, batch, generator=gen, dtype=torch.float64) * sizes[:, None]).long()
        idx = torch.stack([trains[m][pick[m].to(trains[m].device)] for m in range(M)])  # [M, b]
        pred = data.weight[idx].unsqueeze(-1) * _batched_forward(p13, p2, data.x[idx])  # [M, b, D]
        loss = ((pred - data.target[idx]).pow(2).sum(-1).mean(-1) / scale).sum()
        if cfg.anchor > 0:
            loss = loss + cfg.anchor * (_rel_distance(p13, s13) + _rel_distance(p2, s2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every:
            continue
        errors = [fit_error(p13[m].detach(), p2[m].detach(), f.val) for m, f in enumerate(folds)]
        err = sum(errors) / len(errors)
        if trace is not None:
            trace.append((step, errors))
        if err < best_err:
            best_err, best_step, bad = err, step, 0
            best = (p13[-1].detach().clone(), p2[-1].detach().clone())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    info = {"steps": step, "best_step": best_step, "error_after": best_err}
    return best[0].to(w13.dtype), best[1].to(w2.dtype), info
