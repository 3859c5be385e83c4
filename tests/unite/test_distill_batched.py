"""Distilling the groups of a layer together gives each group the fit it gets alone."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from brownout.unite.distill import distill_groups, make_folds
from brownout.unite.methods import GroupData, expert_forward, fit_error
from brownout.unite.options import DistillConfig

D, I = 8, 5
ATOL = 2e-5  # float32 rounding of the stacked kernels and of the hand-written Adam step


def _reference_distill(w13, w2, data: GroupData, folds, cfg: DistillConfig, seed: int,
                       trace: Optional[list] = None):
    """One group alone, with torch.optim.AdamW: the per-group loop the stacked fit stands in for."""
    if not folds:
        return w13, w2, {"steps": 0, "stopped": "no data"}
    trains = [f.train for f in folds] + [torch.arange(data.x.shape[0])]
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

    def held_out(a13, a2):
        return sum(fit_error(a13, a2, f.val) for f in folds) / len(folds)

    def forward(a13, a2, x):
        h = torch.bmm(x, a13.transpose(1, 2))
        return torch.bmm(F.silu(h[..., :I]) * h[..., I:], a2.transpose(1, 2))

    def rel(p, start):
        return (p - start).pow(2).flatten(1).sum(1) / start.pow(2).sum().clamp_min(1e-30)

    best_err = held_out(s13, s2)
    if trace is not None:
        trace.append((0, [fit_error(s13, s2, f.val) for f in folds]))
    best, best_step, bad, step = (s13, s2), 0, 0, 0
    for step in range(1, cfg.max_steps + 1):
        pick = (torch.rand(M, batch, generator=gen, dtype=torch.float64) * sizes[:, None]).long()
        idx = torch.stack([trains[m][pick[m]] for m in range(M)])
        pred = data.weight[idx].unsqueeze(-1) * forward(p13, p2, data.x[idx])
        loss = ((pred - data.target[idx]).pow(2).sum(-1).mean(-1) / scale).sum()
        if cfg.anchor > 0:
            loss = loss + cfg.anchor * (rel(p13, s13) + rel(p2, s2)).sum()
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
    return best[0], best[1], {"steps": step, "best_step": best_step, "error_after": best_err}


def _expert(seed: int, scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2 * I, D, generator=gen) * scale, torch.randn(D, I, generator=gen) * scale


def _group(functions, counts, seed: int) -> GroupData:
    """A group's rows: counts[s] tokens of source s, whose targets come from functions[s]."""
    gen = torch.Generator().manual_seed(seed)
    xs, ts, ss = [], [], []
    for s, ((w13, w2), n) in enumerate(zip(functions, counts)):
        x = torch.randn(n, D, generator=gen) + 0.5 * s
        xs.append(x)
        ts.append(expert_forward(w13, w2, x))
        ss.append(torch.full((n,), s, dtype=torch.long))
    x = torch.cat(xs)
    weight = 0.2 + torch.rand(x.shape[0], generator=gen)
    return GroupData(x, weight[:, None] * torch.cat(ts), weight, torch.cat(ss))


def _layer():
    """Groups unlike each other: unequal token counts and fold counts, one random split, one
    group whose fit does not carry over to the left-out source (it stops early, keeping its
    start), one with no data; starts of unequal scale (unequal learning rates)."""
    target = _expert(10)
    starts = [_expert(20 + g, scale=0.3 + 0.2 * g) for g in range(6)]
    datas = [
        _group([target, target, target], [300, 200, 120], seed=1),  # three folds
        _group([target, target], [40, 40], seed=2),  # fewer rows than a batch
        _group([starts[2], _expert(11)], [200, 200], seed=3),  # stops early
        _group([target], [150], seed=4),  # one source: a random split
        _group([_expert(12), _expert(12)], [400, 350], seed=5),
        _group([target], [1], seed=6),  # no data to fit on
    ]
    return starts, datas


CONFIGS = {
    "plain": DistillConfig(max_steps=120, eval_every=10, patience=3, batch_tokens=128, max_folds=0),
    "regularised": DistillConfig(max_steps=70, eval_every=20, patience=2, batch_tokens=96, max_folds=2,
                                 anchor=0.3, weight_decay=0.05, max_val_tokens=50),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stacked_groups_match_the_per_group_fits(name):
    cfg = CONFIGS[name]
    starts, datas = _layer()
    seeds = [100 + g for g in range(len(datas))]
    folds = [make_folds(d, cfg, s) for d, s in zip(datas, seeds)]
    assert [len(f) for f in folds] == [3 if name == "plain" else 2, 2, 2, 1, 2, 0]
    traces, done = [[] for _ in datas], []
    stacked = distill_groups(starts, datas, folds, cfg, seeds, traces, on_done=done.append)
    assert sorted(done) == list(range(len(datas)))  # each group reported once, when final
    steps = []
    for g, (data, f, seed) in enumerate(zip(datas, folds, seeds)):
        trace: list = []
        w13, w2, info = _reference_distill(*starts[g], data, f, cfg, seed, trace)
        s13, s2, s_info = stacked[g]
        assert s_info.keys() == info.keys()
        assert s_info["steps"] == info["steps"] and s_info.get("best_step") == info.get("best_step")
        if "error_after" in info:
            assert s_info["error_after"] == pytest.approx(info["error_after"], rel=1e-4, abs=1e-7)
        torch.testing.assert_close(s13, w13, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(s2, w2, atol=ATOL, rtol=1e-4)
        assert [s for s, _ in traces[g]] == [s for s, _ in trace]
        for (_, a), (_, b) in zip(traces[g], trace):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
        steps.append(info["steps"])
    # the layer really holds groups that stop at different steps, one of them early with its start
    assert stacked[2][2]["best_step"] == 0 and steps[2] < cfg.max_steps
    assert torch.equal(stacked[2][0], starts[2][0]) and torch.equal(stacked[2][1], starts[2][1])
    assert stacked[5][2] == {"steps": 0, "stopped": "no data"}
    assert min(len(d.x) for d in datas[:5]) < cfg.batch_tokens < max(len(d.x) for d in datas)
    assert max(steps) == cfg.max_steps and any(0 < s < cfg.max_steps for s in steps)
    assert any(stacked[g][2]["best_step"] > 0 for g in range(5))


def test_a_group_fits_the_same_alone_and_in_a_stack():
    cfg = CONFIGS["plain"]
    starts, datas = _layer()
    seeds = [7 * g for g in range(len(datas))]
    folds = [make_folds(d, cfg, s) for d, s in zip(datas, seeds)]
    stacked = distill_groups(starts, datas, folds, cfg, seeds)
    for g in range(len(datas)):
        (alone,) = distill_groups([starts[g]], [datas[g]], [folds[g]], cfg, [seeds[g]])
        torch.testing.assert_close(stacked[g][0], alone[0], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(stacked[g][1], alone[1], atol=ATOL, rtol=1e-4)
        assert stacked[g][2]["steps"] == alone[2]["steps"]


class _Bar:
    """Records what the builder reports to its progress bar."""

    def __init__(self, total):
        self.total, self.n, self.closed = total, 0, False

    def update(self, n):
        self.n += n

    def set_description(self, text):
        pass

    def close(self):
        self.closed = True


def test_layers_fit_the_same_however_groups_are_batched(tiny_models, tmp_path, monkeypatch):
    from tiny import CORPUS
    from transformers import AutoTokenizer

    from brownout.config import ModelLoadConfig
    from brownout.runner.loader import load_model
    from brownout.unite import builder
    from brownout.unite.calibration import calibration_mix
    from brownout.unite.sources import SourceSpec

    model_dir = tiny_models["qwen2_moe"]  # 2 MoE layers, 8 experts
    files = []
    for i in range(2):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(CORPUS[i * len(CORPUS) // 2:] * 2)
    specs = [SourceSpec(f) for f in files]
    mix = calibration_mix(AutoTokenizer.from_pretrained(str(model_dir)), specs, 2048, 64, "all")
    cfg = DistillConfig(max_steps=60, eval_every=10, patience=2, batch_tokens=128)
    built, bars = {}, {}
    for batch in (None, 4, 1, 3):  # None: the CPU's default
        opts = builder.UniteOptions(way=2, method="distill", calibration=specs, seq_len=64,
                                    distill=cfg, distill_group_batch=batch)
        loaded = load_model(ModelLoadConfig(model=str(model_dir), device="cpu", dtype="float32"))
        chunks = []
        monkeypatch.setattr(builder, "_chunks",
                            lambda *a, f=builder._chunks: chunks.append(f(*a)) or chunks[-1])
        bars[batch] = []
        built[batch] = builder.build_united(loaded, opts, mix,
                                            progress_factory=lambda total: bars[batch].append(_Bar(total))
                                            or bars[batch][-1])
        monkeypatch.undo()
        assert [len(c) for c in chunks[0]] == {None: [1, 1, 1, 1], 4: [4], 1: [1, 1, 1, 1], 3: [3, 1]}[batch]
        (bar,) = bars[batch]
        assert bar.n == bar.total == 2 * 4 and bar.closed
    tensors, manifest = built[4]
    groups = [g for layer in manifest["fit_error"].values() for g in layer]
    assert any(g["best_step"] > 0 for g in groups)
    for batch in (None, 1, 3):
        other, other_manifest = built[batch]
        for key, value in tensors.items():
            torch.testing.assert_close(other[key], value, atol=ATOL, rtol=1e-4)
        for layer, entries in manifest["fit_error"].items():
            for a, b in zip(entries, other_manifest["fit_error"][layer]):
                assert a["steps"] == b["steps"] and a["best_step"] == b["best_step"]
                assert a["error_after"] == pytest.approx(b["error_after"], rel=1e-4, abs=1e-7)


def test_groups_are_batched_within_the_memory_budget(monkeypatch):
    from brownout.unite import builder
    from brownout.unite.calibration import LayerStates

    N, E = 400, 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(N)])
    states = LayerStates(torch.zeros(N, 16), ids, torch.ones(N, 2), torch.arange(N) % 3)
    group_of = torch.arange(E) // 2
    opts = builder.UniteOptions(way=2, method="distill", calibration=["x"])
    # off the GPU one group at a time unless asked for more
    assert builder._chunks(opts, states, group_of, 16, 4, torch.device("cpu")) == [[0], [1], [2], [3]]
    opts = builder.UniteOptions(way=2, method="distill", calibration=["x"], distill_group_batch=64)
    rows = builder._group_rows(states, group_of, None)
    assert rows == [int((group_of[ids] == g).any(1).sum()) for g in range(4)]
    need = [builder._group_bytes(n, 3, 16, 4, opts.distill) for n in rows]
    budget = max(need[0] + need[1], need[2] + need[3])
    assert sum(need[:3]) > budget
    monkeypatch.setattr(builder, "STACK_BYTES_HOST", budget)
    assert builder._chunks(opts, states, group_of, 16, 4, torch.device("cpu")) == [[0, 1], [2, 3]]
    monkeypatch.setattr(builder, "STACK_BYTES_HOST", 1)  # each group alone, however small the budget
    assert builder._chunks(opts, states, group_of, 16, 4, torch.device("cpu")) == [[0], [1], [2], [3]]
    monkeypatch.setattr(builder, "STACK_BYTES_HOST", 2**40)
    assert builder._chunks(opts, states, group_of, 16, 4, torch.device("cpu")) == [[0, 1, 2, 3]]
