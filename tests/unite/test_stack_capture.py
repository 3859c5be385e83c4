"""The one-pass capture of calibration states (StackCapture) against a reference that runs
the model from the embedding up to each MoE layer and stops there (one pass per layer)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from brownout.config import ModelLoadConfig
from brownout.runner.loader import load_model
from brownout.unite import builder, grouping, methods
from brownout.unite.builder import UniteOptions, build_united
from brownout.unite.calibration import LayerStates, StackCapture, calibration_mix
from brownout.unite.options import DistillConfig
from brownout.unite.sources import SourceSpec

FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe")
SEQ_LEN = 64
BATCH_TOKENS = 3 * SEQ_LEN  # three windows a batch: several batches, the last one shorter
WAY = 2


class _Stop(Exception):
    """Raised once the wanted layer has run: the later layers are skipped."""


def reference_capture(model, layer: int, windows: torch.Tensor, batch_tokens: int,
                      device, tau: Optional[float] = None) -> LayerStates:
    """MoE layer `layer`'s states by `forward_full` from the embedding, stopped after it."""
    moe = model.moe_layers()[layer]
    records: list[dict] = []

    def stop(module, inputs, output):
        raise _Stop

    moe.capture = records
    handle = moe.register_forward_hook(stop)
    rows = max(1, batch_tokens // windows.shape[1])
    try:
        for start in range(0, windows.shape[0], rows):
            try:
                model.forward_full(windows[start:start + rows].to(device), tau)
            except _Stop:
                pass
    finally:
        handle.remove()
        moe.capture = None
    return LayerStates(x=torch.cat([r["x"] for r in records]).float(),
                       topk_ids=torch.cat([r["topk_ids"] for r in records]),
                       topk_weights=torch.cat([r["topk_weights"] for r in records]).float())


class ReferenceCapture:
    """StackCapture's interface over `reference_capture`."""

    def __init__(self, model, windows, batch_tokens, device, tau=None):
        self.args = (model, windows, batch_tokens, device)
        self.tau = tau

    def states(self, layer: int) -> LayerStates:
        model, windows, batch_tokens, device = self.args
        return reference_capture(model, layer, windows, batch_tokens, device, self.tau)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from tiny import CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CORPUS * 3)
    return path


def _windows(model_dir, calib_file, tokens=640):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return calibration_mix(tok, [SourceSpec(calib_file)], tokens, SEQ_LEN, "all")


def _load(path):
    return load_model(ModelLoadConfig(model=str(path), device="cpu", dtype="float32"))


def _assert_same(got: LayerStates, want: LayerStates) -> None:
    torch.testing.assert_close(got.x, want.x)
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_weights, want.topk_weights)


def _install_average(moe) -> None:
    """United experts of contiguous pairs, their members' mean (what capture_tau installs)."""
    E = moe.num_experts
    group_of = grouping.make_groups("contiguous", E, WAY)
    w13, w2 = moe.w13[:E].detach().float(), moe.w2[:E].detach().float()
    united = [methods.average(w13, w2, members) for members in grouping.groups_from_map(group_of)]
    moe.install_united(torch.stack([u[0] for u in united]), torch.stack([u[1] for u in united]), group_of)


def _compare_layer_by_layer(model, windows, tau: Optional[float]) -> list[LayerStates]:
    """Every MoE layer's states, one pass and reference, compared; with a tau, each layer's
    united experts are installed after its capture, as build_united does."""
    capture = StackCapture(model, windows, BATCH_TOKENS, torch.device("cpu"), tau)
    assert windows.shape[0] > 2 * (BATCH_TOKENS // SEQ_LEN)  # several batches
    captured = []
    for i, moe in enumerate(model.moe_layers()):
        got = capture.states(i)
        want = reference_capture(model, i, windows, BATCH_TOKENS, "cpu", tau)
        assert got.x.shape == (windows.numel(), model.spec.hidden_size)
        _assert_same(got, want)
        captured.append(got)
        if tau is not None:
            _install_average(moe)
    return captured


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_matches_per_layer_capture(tiny_models, calib_file, family):
    loaded = _load(tiny_models[family])
    windows = _windows(tiny_models[family], calib_file).windows
    _compare_layer_by_layer(loaded.model, windows, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_matches_per_layer_capture_at_capture_tau(tiny_models, calib_file, family):
    loaded = _load(tiny_models[family])
    windows = _windows(tiny_models[family], calib_file).windows
    exact = [StackCapture(loaded.model, windows, BATCH_TOKENS, "cpu").states(i) for i in range(2)]
    dimmed = _compare_layer_by_layer(loaded.model, windows, 0.5)
    assert all(moe.brownout_ready for moe in loaded.model.moe_layers())
    torch.testing.assert_close(dimmed[0].x, exact[0].x)  # nothing installed before layer 0
    assert not torch.allclose(dimmed[1].x, exact[1].x)  # layer 1 saw layer 0's united experts


def _model_with_dense_layer():
    """A Qwen3-MoE of 4 decoder layers whose layers 1 and 2 are dense: MoE layers 0 and 3."""
    from transformers import Qwen3MoeConfig

    from brownout.models import qwen3_moe
    from brownout.models.moe_lm import MoEForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=96,
                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, max_position_embeddings=512, mlp_only_layers=[1, 2])
    spec = qwen3_moe.spec_from_config(cfg)
    assert spec.moe_layers == [0, 3]
    torch.manual_seed(0)
    model = MoEForCausalLM(spec, extra_slots=spec.num_experts // WAY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    return model


@pytest.mark.parametrize("tau", [None, 0.0])
def test_one_pass_across_dense_layers(tiny_models, calib_file, tau):
    model = _model_with_dense_layer()
    windows = _windows(tiny_models["qwen3_moe"], calib_file).windows
    _compare_layer_by_layer(model, windows, tau)


def test_layers_are_asked_for_in_order(tiny_models, calib_file):
    loaded = _load(tiny_models["mixtral"])
    capture = StackCapture(loaded.model, _windows(tiny_models["mixtral"], calib_file).windows,
                           BATCH_TOKENS, "cpu")
    capture.states(1)
    with pytest.raises(ValueError, match="ascending"):
        capture.states(0)


@pytest.mark.parametrize("capture_tau", [None, 0.0])
def test_build_united_matches_per_layer_capture(tiny_models, calib_file, monkeypatch, capture_tau):
    """The united experts and fit report built from the one-pass capture equal those built
    from the per-layer reference."""
    model_dir = tiny_models["qwen2_moe"]
    mix = _windows(model_dir, calib_file, tokens=1024)
    opts = UniteOptions(way=WAY, method="distill", calibration=[SourceSpec(calib_file)],
                        calibration_part="all", seq_len=SEQ_LEN, batch_tokens=BATCH_TOKENS,
                        capture_tau=capture_tau, distill=DistillConfig(max_steps=10, eval_every=5))
    built = {}
    for name, cls in (("one pass", StackCapture), ("reference", ReferenceCapture)):
        monkeypatch.setattr(builder, "StackCapture", cls)
        built[name] = build_united(_load(model_dir), opts, mix)
    (got, got_manifest), (want, want_manifest) = built["one pass"], built["reference"]
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    for layer, groups in want_manifest["fit_error"].items():
        for g, h in zip(got_manifest["fit_error"][layer], groups):
            assert g["tokens"] == h["tokens"] and g["assignments"] == h["assignments"]
            assert g["error_after"] == pytest.approx(h["error_after"], rel=1e-4)
