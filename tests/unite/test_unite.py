"""Tests of the united-expert builder: methods, grouping, calibration, manifest, loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from brownout.config import ModelLoadConfig
from brownout.runner.loader import load_model
from brownout.unite import grouping, methods
from brownout.unite.builder import UniteOptions, build_layer, build_united
from brownout.unite.calibration import StackCapture, calibration_mix, calibration_windows
from brownout.unite.options import DistillConfig
from brownout.unite.sources import SourceSpec
from brownout.unite.store import load_united, read_manifest, save_united


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return tiny_models["qwen2_moe"]  # 2 MoE layers, 8 experts of width 32, top-2


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from tiny import CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CORPUS * 3)
    return path


def _load(path, extra=None):
    return load_model(ModelLoadConfig(model=str(path), device="cpu", dtype="float32",
                                      extra_expert_slots=extra))


def _build(model_dir, calib_file, out, **kw):
    from transformers import AutoTokenizer

    opts = UniteOptions(calibration=[SourceSpec(calib_file)] if kw.get("method", "average") != "average"
                        or kw.get("grouping") == "similarity" else [], seq_len=64,
                        calibration_tokens=2048, calibration_part="all", **kw)
    loaded = _load(model_dir)
    mix = None
    if opts.calibration:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        mix = calibration_mix(tok, opts.calibration, opts.calibration_tokens, opts.seq_len, "all")
    tensors, manifest = build_united(loaded, opts, mix)
    save_united(out, tensors, manifest)
    return loaded, tensors, manifest


def _checkpoint_experts(model_dir, layer, E):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if f"model.layers.{layer}.mlp.experts.gate_up_proj" in keys:
            return (f.get_tensor(f"model.layers.{layer}.mlp.experts.gate_up_proj").float(),
                    f.get_tensor(f"model.layers.{layer}.mlp.experts.down_proj").float())
        get = lambda e, p: f.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{p}.weight").float()  # noqa
        w13 = torch.stack([torch.cat([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(E)])
        return w13, torch.stack([get(e, "down_proj") for e in range(E)])


def test_average_is_mean_of_member_weights(qwen, calib_file, tmp_path):
    loaded, tensors, manifest = _build(qwen, calib_file, tmp_path / "u", way=2)
    E = loaded.spec.num_experts
    for layer in loaded.spec.moe_layers:
        w13, w2 = _checkpoint_experts(qwen, layer, E)
        group_of = tensors[f"layers.{layer}.group_of"]
        assert group_of.tolist() == [e // 2 for e in range(E)]
        for g in range(E // 2):
            members = (group_of == g).nonzero().flatten()
            torch.testing.assert_close(tensors[f"layers.{layer}.w13"][g], w13[members].mean(0))
            torch.testing.assert_close(tensors[f"layers.{layer}.w2"][g], w2[members].mean(0))
    assert manifest["calibration"] is None and manifest["way"] == 2


def test_frequency_weights_members_by_counts():
    w13 = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    w2 = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2)
    u13, u2 = methods.frequency(w13, w2, [0, 2], torch.tensor([3, 100, 1]))
    torch.testing.assert_close(u13, 0.75 * w13[0] + 0.25 * w13[2])
    torch.testing.assert_close(u2, 0.75 * w2[0] + 0.25 * w2[2])
    u13, _ = methods.frequency(w13, w2, [0, 2], torch.tensor([0, 5, 0]))  # unused: uniform
    torch.testing.assert_close(u13, w13[[0, 2]].mean(0))


def test_distill_fits_better_than_frequency(qwen, calib_file):
    from transformers import AutoTokenizer

    loaded = _load(qwen)
    tok = AutoTokenizer.from_pretrained(str(qwen))
    windows = calibration_windows(tok, [calib_file], 4096, 64)
    opts = UniteOptions(way=4, method="distill", calibration=[SourceSpec(calib_file)],
                        distill=DistillConfig(max_steps=150, eval_every=10, patience=5))
    states = StackCapture(loaded.model, windows, 512, loaded.device).states(0)
    assert states.x.shape == (windows.numel(), loaded.spec.hidden_size)
    *_, report = build_layer(loaded.model.moe_layers()[0], states, opts, 0)
    fitted = [g for g in report if g["tokens"] > 20]
    assert fitted
    for g in fitted:  # error_before is the frequency-weighted start
        assert g["error_after"] <= g["error_before"]
    assert sum(g["error_after"] for g in fitted) < 0.8 * sum(g["error_before"] for g in fitted)


def test_capture_matches_full_forward_routing(qwen, calib_file):
    """Carrying the states layer by layer must not change what layer i sees."""
    from transformers import AutoTokenizer

    loaded = _load(qwen)
    windows = calibration_windows(AutoTokenizer.from_pretrained(str(qwen)), [calib_file], 512, 64)
    moe = loaded.model.moe_layers()[1]
    moe.capture = []
    loaded.model.forward_full(windows)
    full = moe.capture
    moe.capture = None
    states = StackCapture(loaded.model, windows, 10_000, loaded.device).states(1)
    torch.testing.assert_close(states.x, full[0]["x"])
    assert torch.equal(states.topk_ids, full[0]["topk_ids"])


def _cluster_outputs(cluster, n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(max(cluster) + 1, n * len(cluster), 8, generator=gen)
    outputs = torch.stack([base[c] + 0.01 * torch.randn(n * len(cluster), 8, generator=gen)
                           for c in cluster])  # [E, n*E, D]
    owner = torch.arange(len(cluster)).repeat_interleave(n)  # n states sampled per expert
    return outputs, owner


def test_routed_distance_matches_slow_loop():
    outputs, owner = _cluster_outputs([0, 1, 0, 2, 1], n=3)
    got = grouping.routed_distance(outputs, owner, 5)
    scale = outputs.double().pow(2).sum(-1).mean()
    for a in range(5):
        for b in range(5):
            rows = (owner == a) | (owner == b)
            want = (outputs[a, rows].double() - outputs[b, rows].double()).pow(2).sum(-1).mean() / scale
            assert got[a, b].item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)


def test_similarity_grouping_recovers_clusters():
    # experts {0,5,6}, {1,3,7}, {2,4,8} produce near-identical outputs within each cluster
    cluster = [0, 1, 2, 1, 2, 0, 0, 1, 2]
    outputs, owner = _cluster_outputs(cluster)
    affinity = grouping.merge_affinity(grouping.routed_distance(outputs, owner, 9), torch.ones(9))
    assert grouping.similarity_groups(affinity, 3).tolist() == [0, 1, 2, 1, 2, 0, 0, 1, 2]


def test_busy_experts_pair_with_rarely_used_ones():
    # four equally different experts: load decides; 0 and 1 are busy, 2 and 3 rarely used
    outputs, owner = _cluster_outputs([0, 1, 2, 3])
    distance = grouping.routed_distance(outputs, owner, 4)
    group_of = grouping.similarity_groups(grouping.merge_affinity(distance, torch.tensor([900, 800, 3, 2])), 2)
    assert group_of[0] != group_of[1] and group_of[2] != group_of[3]


def test_similarity_groups_are_balanced_last_smaller():
    sim = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    group_of = grouping.similarity_groups(sim + sim.t(), 4)
    sizes = torch.bincount(group_of).tolist()
    assert sizes == [4, 4, 2]
    assert grouping.group_sizes(10, 4) == [4, 4, 2]


def test_manifest_round_trip_and_install(qwen, calib_file, tmp_path):
    out = tmp_path / "u"
    loaded, tensors, manifest = _build(qwen, calib_file, out, way=2, grouping="similarity",
                                       method="frequency", seed=3)
    assert read_manifest(out) == json.loads(json.dumps(manifest))
    assert manifest["seed"] == 3 and manifest["grouping"]["kind"] == "similarity"
    assert manifest["calibration"]["sources"][0]["path"] == str(calib_file)
    assert all("error_before" in g for g in manifest["fit_error"]["0"])
    target = _load(qwen)
    load_united(target, out, way=2)
    E = target.spec.num_experts
    for layer, moe in zip(target.spec.moe_layers, target.model.moe_layers()):
        G = tensors[f"layers.{layer}.w13"].shape[0]
        torch.testing.assert_close(moe.w13[E:E + G], tensors[f"layers.{layer}.w13"])
        assert moe.group_of.tolist() == manifest["grouping"]["group_of"][str(layer)]
    assert target.model.brownout_ready


def test_mismatched_manifest_refused(qwen, calib_file, tmp_path, tmp_path_factory):
    from tiny import make_tiny_checkpoint

    out = tmp_path / "u"
    _build(qwen, calib_file, out, way=2)
    with pytest.raises(ValueError, match="way"):
        load_united(_load(qwen), out, way=4)
    other = make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("other") / "m", num_layers=3)
    with pytest.raises(ValueError, match="num_layers"):
        load_united(_load(other), out)
    # same shapes, another checkpoint config: refused by the config hash
    copy = tmp_path / "copy"
    shutil.copytree(qwen, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="source model"):
        load_united(_load(copy), out)


def test_needs_calibration_for_data_methods():
    with pytest.raises(ValueError, match="calibration"):
        UniteOptions(way=2, method="distill")
    with pytest.raises(ValueError, match="grouping"):
        UniteOptions(way=2, grouping="random")


def test_cli_end_to_end(qwen, calib_file, tmp_path):
    from brownout.cli import main

    out = tmp_path / "cli"
    rc = main(["unite", "--model", str(qwen), "--way", "4", "--grouping", "similarity",
               "--method", "distill", "--calibration", str(calib_file), "--calibration-tokens",
               "1024", "--seq-len", "64", "--distill-steps", "30", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    manifest = read_manifest(out)
    assert manifest["method"] == "distill" and manifest["num_groups"] == 2
    with safe_open(str(out / "united.safetensors"), "pt") as f:
        assert f.get_tensor("layers.0.w13").shape == (2, 64, 64)
        assert f.get_tensor("layers.1.group_of").shape == (8,)


def test_capture_tau_fits_later_layers_on_dimmed_states(qwen, calib_file, tmp_path):
    """With capture_tau, layer 0's united experts are installed before layer 1 is captured."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen))
    mix = calibration_mix(tok, [SourceSpec(calib_file)], 1024, 64, "all")
    opts = UniteOptions(way=2, method="frequency", calibration=[SourceSpec(calib_file)], capture_tau=0.0,
                        calibration_part="all")
    loaded = _load(qwen, extra=None)
    exact = StackCapture(loaded.model, mix.windows, 512, loaded.device).states(1)
    tensors, manifest = build_united(loaded, opts, mix)
    assert manifest["capture_tau"] == 0.0
    assert all(moe.brownout_ready for moe in loaded.model.moe_layers())
    dimmed = StackCapture(loaded.model, mix.windows, 512, loaded.device, tau=0.0).states(1)
    assert not torch.allclose(dimmed.x, exact.x)  # layer 1 saw layer 0's united experts
    again = StackCapture(loaded.model, mix.windows, 512, loaded.device).states(1)
    torch.testing.assert_close(again.x, exact.x)  # tau None stays exact
    with pytest.raises(ValueError, match="capture_tau"):
        UniteOptions(way=2, capture_tau=1.5)


def test_cli_bfloat16_model_fits_experts_in_float32(qwen, calib_file, tmp_path, monkeypatch):
    """--dtype bfloat16 holds the model in bfloat16 (half the memory) while each layer's
    united experts are still fitted in float32, close to those of a float32 model."""
    import brownout.runner.loader as loader_module
    from safetensors.torch import load_file

    from brownout.cli import main

    held = []
    real_load = loader_module.load_model

    def spy(cfg, *args, **kwargs):
        loaded = real_load(cfg, *args, **kwargs)
        held.append(loaded.model.moe_layers()[0].w13.dtype)
        return loaded

    monkeypatch.setattr(loader_module, "load_model", spy)
    united = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        rc = main(["unite", "--model", str(qwen), "--way", "4", "--method", "distill",
                   "--calibration", str(calib_file), "--calibration-tokens", "1024", "--seq-len", "64",
                   "--distill-steps", "20", "--device", "cpu", "--dtype", dtype,
                   "--save-dtype", "float32", "--out", str(out)])
        assert rc == 0
        united[dtype] = load_file(str(out / "united.safetensors"))
    assert held == [torch.float32, torch.bfloat16]
    w_full, w_half = united["float32"]["layers.0.w13"], united["bfloat16"]["layers.0.w13"]
    assert w_half.dtype == torch.float32
    assert not torch.equal(w_half.to(torch.bfloat16).float(), w_half)  # fitted in float32
    assert float((w_half - w_full).norm() / w_full.norm()) < 0.05
