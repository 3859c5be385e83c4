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

All groups of a layer (or as many as fit in memory) are fitted together (`distill_groups`):
their models are stacked on one axis, so each step runs a few batched kernels for all of
them rather than a few per group, and each group's fit is the one it gets alone.

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


# Adam's constants: torch.optim.AdamW's defaults, with which the learning rates were tuned
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# validation rows scored in one pass over all fold models: bounds that pass's [rows, 2I] activations
VAL_ROWS_PER_PASS = 32768


def _batched_forward(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M SwiGLU experts at once: w13 [M, 2I, D], w2 [M, D, I], x [M, b, D] -> [M, b, D]."""
    inter = w2.shape[-1]
    h = torch.bmm(x, w13.transpose(1, 2))  # [M, b, 2I]
    return torch.bmm(F.silu(h[..., :inter]) * h[..., inter:], w2.transpose(1, 2))


def _pad_rows(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-index lists of unequal lengths -> (index [n, max], valid mask [n, max]); padding
    repeats row 0 of the data (a real row, so gathers stay in range) and is masked out."""
    size = max(r.numel() for r in rows)
    index = torch.zeros(len(rows), size, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), size, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        index[i, :r.numel()] = r
        valid[i, :r.numel()] = True
    return index, valid


class _Stack:
    """The models of the groups still training, stacked on one axis.

    Group j (0..len(groups)-1) owns models first[j] .. first[j] + count[j] - 1: one per fold,
    then the kept model (trained on all the group's rows). Every tensor indexed by model is
    listed in MODEL_FIELDS so that dropping stopped groups (`keep`) reindexes all of them.
    """

    MODEL_FIELDS = ("p13", "p2", "m13", "v13", "m2", "v2", "lr13", "lr2", "train", "n_train",
                    "batch_valid", "inv_batch", "scale", "s13", "s2", "s13_sq", "s2_sq")

    def keep(self, models: torch.Tensor) -> None:
        for name in self.MODEL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[models.to(value.device)])
        self.p13.requires_grad_(True)
        self.p2.requires_grad_(True)


def distill_groups(starts: list, datas: list[GroupData], folds: list[list[Fold]], cfg: DistillConfig,
                   seeds: list[int], traces: Optional[list] = None, on_done=None) -> list:
    """Fit every group's united expert in one stacked optimisation -> [(w13, w2, info)] per group.

    starts[g] = (w13 [2I, D], w2 [D, I]) is group g's start; datas[g], folds[g] and seeds[g]
    its calibration rows, validation folds and seed. Each group's result is the one it gets
    fitted alone (`distill`), to floating-point rounding: the loss is the sum of the groups'
    own losses (each a mean over its own batch, which is padded to the largest and masked),
    Adam's update is elementwise with each group's own learning rate, each group draws its
    batches from its own generator, and a group that stops early leaves the stack, its best
    weights kept. The groups' rows (and their folds' validation rows) are joined into one
    tensor, of which each GroupData's tensors become views. `traces[g]`, if given, receives group g's (step, [fold errors]);
    `on_done(g)` is called once group g's fit is final.
    """
    out: list = [None] * len(starts)
    groups = []
    for g, f in enumerate(folds):
        if f:
            groups.append(g)
        else:
            out[g] = (starts[g][0], starts[g][1], {"steps": 0, "stopped": "no data"})
            if on_done is not None:
                on_done(g)
    if not groups:
        return out
    device = datas[groups[0]].x.device
    offset = [0]
    for g in groups:
        offset.append(offset[-1] + datas[g].x.shape[0])
    x_all = torch.cat([datas[g].x for g in groups])  # every group's rows, one after the other
    target_all = torch.cat([datas[g].target for g in groups])
    weight_all = torch.cat([datas[g].weight for g in groups])
    for j, g in enumerate(groups):  # each group's rows become a view of the joined ones: one copy
        rows = slice(offset[j], offset[j + 1])
        datas[g].x, datas[g].target, datas[g].weight = x_all[rows], target_all[rows], weight_all[rows]

    st = _Stack()
    trains, group_of, first, batch = [], [], [], []
    for j, g in enumerate(groups):
        first.append(len(trains))
        rows = [f.train for f in folds[g]] + [torch.arange(datas[g].x.shape[0], device=device)]
        trains += [r + offset[j] for r in rows]
        group_of += [j] * len(rows)
        batch.append(min(cfg.batch_tokens, datas[g].x.shape[0]))
    count = [len(folds[g]) + 1 for g in groups]
    model_group = torch.tensor(group_of, device=device)
    st.train, valid = _pad_rows(trains, device)  # [T, n_max] global rows each model trains on
    st.n_train = valid.sum(1)
    st.scale = ((target_all.pow(2).sum(1)[st.train] * valid).sum(1) / st.n_train).clamp_min(1e-30)
    del valid
    per_model_batch = torch.tensor([batch[j] for j in group_of], device=device)
    st.batch_valid = torch.arange(max(batch), device=device)[None, :] < per_model_batch[:, None]
    st.inv_batch = 1.0 / per_model_batch.float()

    s13 = torch.stack([starts[g][0].detach().float() for g in groups])  # [G, 2I, D]
    s2 = torch.stack([starts[g][1].detach().float() for g in groups])  # [G, D, I]
    st.p13 = s13[model_group].clone().requires_grad_(True)
    st.p2 = s2[model_group].clone().requires_grad_(True)
    st.m13, st.v13 = torch.zeros_like(st.p13), torch.zeros_like(st.p13)
    st.m2, st.v2 = torch.zeros_like(st.p2), torch.zeros_like(st.p2)

    def lr(s: torch.Tensor) -> torch.Tensor:  # cfg.lr_scale x each start's RMS (1e-3 for a zero start)
        rms = s.pow(2).flatten(1).mean(1).sqrt()
        rate = cfg.lr_scale * torch.where(rms > 0, rms, torch.full_like(rms, 1e-3))
        return rate[model_group][:, None, None]

    st.lr13, st.lr2 = lr(s13), lr(s2)
    st.s13 = st.s2 = st.s13_sq = st.s2_sq = None
    if cfg.anchor > 0:  # each model's start, and the start's squared norm, for the pull toward it
        st.s13, st.s2 = s13[model_group], s2[model_group]
        st.s13_sq = s13.pow(2).flatten(1).sum(1).clamp_min(1e-30)[model_group]
        st.s2_sq = s2.pow(2).flatten(1).sum(1).clamp_min(1e-30)[model_group]

    # validation rows of every fold, one after the other, and each fold's padded row index
    val_x = torch.cat([f.val.x for g in groups for f in folds[g]])
    val_target = torch.cat([f.val.target for g in groups for f in folds[g]])
    val_weight = torch.cat([f.val.weight for g in groups for f in folds[g]])
    val_rows, start_row = [], 0
    for g in groups:
        for f in folds[g]:
            rows = slice(start_row, start_row + f.val.x.shape[0])
            f.val.x, f.val.target, f.val.weight = val_x[rows], val_target[rows], val_weight[rows]
            val_rows.append(torch.arange(rows.start, rows.stop, device=device))
            start_row = rows.stop

    def fold_errors(live: list[int]) -> list[list[float]]:
        """Validation error of every fold model of the live groups (indices into `groups`)."""
        fold_models, rows = [], []
        for pos, j in enumerate(live):
            fold_models += [first_live[pos] + m for m in range(count[j] - 1)]
            rows += [val_rows[fold_start[j] + m] for m in range(count[j] - 1)]
        index, valid = _pad_rows(rows, device)
        models = torch.tensor(fold_models, device=device)
        with torch.no_grad():
            w13, w2 = st.p13[models], st.p2[models]
            num = torch.zeros(len(rows), dtype=torch.float64, device=device)
            den = torch.zeros_like(num)
            chunk = max(1, VAL_ROWS_PER_PASS // len(rows))
            for s in range(0, index.shape[1], chunk):
                idx, ok = index[:, s:s + chunk], valid[:, s:s + chunk]
                target = val_target[idx]
                pred = val_weight[idx].unsqueeze(-1) * _batched_forward(w13, w2, val_x[idx])
                num += ((pred - target).pow(2).sum(-1) * ok).sum(-1).double()
                den += (target.pow(2).sum(-1) * ok).sum(-1).double()
            errors = (num / den.clamp_min(1e-30)).tolist()
        result, at = [], 0
        for j in live:
            result.append(errors[at:at + count[j] - 1])
            at += count[j] - 1
        return result

    fold_start = [0]
    for j in range(len(groups) - 1):
        fold_start.append(fold_start[-1] + count[j] - 1)
    live = list(range(len(groups)))  # groups still training, in stack order
    first_live = list(first)  # position of each live group's first model in the stack
    gens = [torch.Generator().manual_seed(seeds[g]) for g in groups]
    sizes = [torch.tensor([t.numel() for t in trains[first[j]:first[j] + count[j]]], dtype=torch.float64)
             for j in range(len(groups))]
    best_err, best_step, bad, best = {}, {}, {}, {}
    for j, errors in zip(live, fold_errors(live)):
        best_err[j], best_step[j], bad[j] = sum(errors) / len(errors), 0, 0
        best[j] = (s13[j], s2[j])
        if traces is not None:
            traces[groups[j]].append((0, errors))

    def finish(j: int, step: int) -> None:
        g = groups[j]
        info = {"steps": step, "best_step": best_step[j], "error_after": best_err[j]}
        out[g] = (best[j][0].to(starts[g][0].dtype), best[j][1].to(starts[g][1].dtype), info)
        if on_done is not None:
            on_done(g)

    beta1, beta2 = ADAM_BETAS
    step = 0
    while live and step < cfg.max_steps:
        # the batches of every live group up to the next evaluation, each from its own generator
        span = min(cfg.eval_every - step % cfg.eval_every, cfg.max_steps - step)
        picks = torch.zeros(span, st.p13.shape[0], st.batch_valid.shape[1], dtype=torch.long)
        for pos, j in enumerate(live):
            u = torch.rand(span, count[j], batch[j], generator=gens[j], dtype=torch.float64)
            picks[:, first_live[pos]:first_live[pos] + count[j], :batch[j]] = (u * sizes[j][:, None]).long()
        picks = picks.to(device)
        for k in range(span):
            step += 1
            idx = st.train.gather(1, picks[k])  # [T, b] global rows
            pred = weight_all[idx].unsqueeze(-1) * _batched_forward(st.p13, st.p2, x_all[idx])
            err = (pred - target_all[idx]).pow(2).sum(-1) * st.batch_valid  # [T, b]
            loss = (err.sum(-1) * st.inv_batch / st.scale).sum()
            if cfg.anchor > 0:
                loss = loss + cfg.anchor * ((st.p13 - st.s13).pow(2).flatten(1).sum(1) / st.s13_sq
                                            + (st.p2 - st.s2).pow(2).flatten(1).sum(1) / st.s2_sq).sum()
            g13, g2 = torch.autograd.grad(loss, (st.p13, st.p2))
            with torch.no_grad():  # AdamW, as torch.optim.AdamW, with a learning rate per model
                bias1, bias2 = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
                for p, grad, m, v, rate in ((st.p13, g13, st.m13, st.v13, st.lr13),
                                            (st.p2, g2, st.m2, st.v2, st.lr2)):
                    if cfg.weight_decay:
                        p.mul_(1 - rate * cfg.weight_decay)
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    update = v.sqrt().div_(bias2).add_(ADAM_EPS).reciprocal_().mul_(m).mul_(rate / bias1)
                    p.sub_(update)
                    del update
        if step % cfg.eval_every:
            continue
        stopped = []
        for pos, (j, errors) in enumerate(zip(live, fold_errors(live))):
            if traces is not None:
                traces[groups[j]].append((step, errors))
            e = sum(errors) / len(errors)
            if e < best_err[j]:
                best_err[j], best_step[j], bad[j] = e, step, 0
                kept = first_live[pos] + count[j] - 1
                best[j] = (st.p13[kept].detach().clone(), st.p2[kept].detach().clone())
            else:
                bad[j] += 1
                if bad[j] >= cfg.patience:
                    stopped.append(j)
        if stopped:  # a stopped group leaves the stack: its weights change no more
            for j in stopped:
                finish(j, step)
            pos_of = {j: pos for pos, j in enumerate(live)}
            live = [j for j in live if j not in stopped]
            if live:
                models = torch.cat([torch.arange(first_live[pos_of[j]], first_live[pos_of[j]] + count[j])
                                    for j in live])
                with torch.no_grad():
                    st.keep(models)
            first_live = [sum(count[i] for i in live[:pos]) for pos in range(len(live))]
    for j in live:
        finish(j, step)
    return out


def distill(w13: torch.Tensor, w2: torch.Tensor, data: GroupData, folds: list[Fold],
            cfg: DistillConfig, seed: int, trace: Optional[list] = None):
    """Fit (w13 [2I, D], w2 [D, I]) to one group's mixture -> (w13, w2, info) (`distill_groups`).

    Model m < len(folds) trains on fold m's rows; the last model, the one returned, on all.
    `trace`, if given, receives (step, [validation error of each fold]) at every evaluation.
    """
    (result,) = distill_groups([(w13, w2)], [data], [folds], cfg, [seed],
                               None if trace is None else [trace])
    return result
