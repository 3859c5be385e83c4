"""Distillation validated on left-out sources: folds, early stopping, regularisers, manifest."""

from __future__ import annotations

import json

import pytest
import torch

from brownout.unite.distill import distill, held_out_error, make_folds
from brownout.unite.methods import GroupData, expert_forward, fit_error
from brownout.unite.options import DistillConfig

D, I = 6, 4


def _expert(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2 * I, D, generator=gen) * 0.5, torch.randn(D, I, generator=gen) * 0.5


def _data(functions, n_per_source: int = 256, seed: int = 0) -> GroupData:
    """Tokens of len(functions) sources; source s's targets come from expert functions[s]."""
    gen = torch.Generator().manual_seed(seed)
    xs, ts, ss = [], [], []
    for s, (w13, w2) in enumerate(functions):
        x = torch.randn(n_per_source, D, generator=gen) + s  # each source its own region
        xs.append(x)
        ts.append(expert_forward(w13, w2, x))
        ss.append(torch.full((n_per_source,), s, dtype=torch.long))
    x = torch.cat(xs)
    return GroupData(x, torch.cat(ts), torch.ones(x.shape[0]), torch.cat(ss))


def test_folds_leave_one_source_out():
    data = _data([_expert(1), _expert(1), _expert(1)])
    folds = make_folds(data, DistillConfig(max_val_tokens=100, max_folds=0), seed=0)
    assert [f.held_out_source for f in folds] == [0, 1, 2]
    for f in folds:
        assert torch.all(data.source[f.train] != f.held_out_source)
        assert torch.all(f.val.source == f.held_out_source) and f.val.x.shape[0] == 100
        assert f.train.numel() == 512


def test_at_most_max_folds_rotating_over_groups():
    data = _data([_expert(1)] * 4, n_per_source=64)
    cfg = DistillConfig(max_folds=2)
    assert [f.held_out_source for f in make_folds(data, cfg, seed=0)] == [0, 1]
    assert [f.held_out_source for f in make_folds(data, cfg, seed=3)] == [3, 0]
    with pytest.raises(ValueError, match="max_folds"):
        DistillConfig(max_folds=1)


def test_folds_fall_back_to_a_random_split():
    one = _data([_expert(1)])
    (fold,) = make_folds(one, DistillConfig(), seed=0)
    assert fold.held_out_source is None and fold.val.x.shape[0] == int(256 * 0.1)
    few = _data([_expert(1), _expert(1)])
    few.source[:250] = 1  # source 0 routes only 6 tokens to the group: too few for a fold
    assert make_folds(few, DistillConfig(min_fold_tokens=32), 0)[0].held_out_source is None
    assert make_folds(_data([_expert(1), _expert(1)]), DistillConfig(validation="random"), 0)[0] \
        .held_out_source is None


def test_stops_early_and_keeps_the_start_when_fitting_does_not_carry_over():
    start = _expert(1)
    # source 0 follows the start exactly, source 1 another function: fitting either one
    # moves away from what the other needs, so the error on the left-out source rises
    data = _data([start, _expert(2)])
    cfg = DistillConfig(max_steps=2000, eval_every=10, patience=3, batch_tokens=64)
    folds = make_folds(data, cfg, 0)
    trace = []
    w13, w2, info = distill(*start, data, folds, cfg, seed=0, trace=trace)
    assert info["best_step"] == 0 and info["steps"] == 30  # three evaluations without improvement
    assert [s for s, _ in trace] == [0, 10, 20, 30]
    assert torch.equal(w13, start[0]) and torch.equal(w2, start[1])
    assert info["error_after"] == pytest.approx(held_out_error(*start, folds))


def test_fits_when_the_sources_agree():
    target = _expert(3)
    data = _data([target, target, target])
    start = _expert(4)
    cfg = DistillConfig(max_steps=300, eval_every=20, patience=3, batch_tokens=128)
    folds = make_folds(data, cfg, 0)
    w13, w2, info = distill(*start, data, folds, cfg, seed=0)
    assert info["best_step"] > 0
    assert info["error_after"] < 0.5 * held_out_error(*start, folds)
    assert fit_error(w13, w2, data) < 0.5 * fit_error(*start, data)


def test_anchor_keeps_the_weights_near_the_start():
    data = _data([_expert(3), _expert(3)])
    start = _expert(4)
    moved = {}
    for anchor in (0.0, 10.0):
        cfg = DistillConfig(max_steps=100, eval_every=100, patience=5, batch_tokens=128, anchor=anchor)
        w13, _, _ = distill(*start, data, make_folds(data, cfg, 0), cfg, seed=0)
        moved[anchor] = float((w13 - start[0]).norm())
    assert 0 < moved[10.0] < 0.5 * moved[0.0]


def test_config_is_validated():
    with pytest.raises(ValueError, match="validation"):
        DistillConfig(validation="kfold")
    with pytest.raises(ValueError, match="start"):
        DistillConfig(start="median")
    with pytest.raises(ValueError, match=">= 0"):
        DistillConfig(anchor=-1.0)


def test_manifest_records_the_calibration_mix(tiny_models, tmp_path):
    from tiny import CORPUS

    from brownout.cli import main
    from brownout.unite.sources import file_sha256

    text = tmp_path / "plain.txt"
    text.write_text("\n".join([CORPUS[:200]] * 20))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"question": CORPUS[i:i + 90], "answer": CORPUS[i + 90:i + 200]})
                               for i in range(0, 2000, 50)))
    out = tmp_path / "u"
    assert main(["unite", "--model", str(tiny_models["qwen2_moe"]), "--way", "2", "--method", "distill",
                 "--calibration", str(text), f"{chats}:3", "--calibration-tokens", "1024",
                 "--seq-len", "64", "--distill-steps", "20", "--distill-anchor", "0.1",
                 "--device", "cpu", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["calibration"]
    assert [s["name"] for s in cal["sources"]] == ["plain.txt", "chats.jsonl"]
    assert [s["kind"] for s in cal["sources"]] == ["plain", "records"]
    assert [s["tokens"] for s in cal["sources"]] == [256, 768]  # weights 1 : 3 of 1024 tokens
    assert cal["sources"][1]["sha256"] == file_sha256(chats) and cal["sources"][1]["weight"] == 0.75
    assert cal["part"] == "fit" and cal["balance"] == "weights" and cal["tokens"] == 1024
    assert manifest["distill"]["anchor"] == 0.1 and manifest["distill"]["validation"] == "sources"
    groups = [g for layer in manifest["fit_error"].values() for g in layer]
    assert all(g["validation"] in ("sources", "random") for g in groups)
    assert any(g["validation"] == "sources" for g in groups)
    assert all({"error_before", "error_after", "error_in_sample", "best_step"} <= set(g) for g in groups)
