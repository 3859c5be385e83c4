"""The shared expert folded into the expert slots (`SparseMoE.fold_shared_expert`) computes
what the separate shared expert computes: logits, brownout routing, shedding and the
touched-slot count all match the unfolded model on the CPU reference path."""

from __future__ import annotations

import pytest
import torch

from brownout.config import ModelLoadConfig
from brownout.models.context import ForwardContext
from brownout.runner.loader import load_model
from brownout.unite.uncalibrated import install_uncalibrated

DEMO = "brownout/assets/demo/model"


def _pair(path: str):
    """The same checkpoint loaded unfolded and folded (float32, CPU)."""
    return [load_model(ModelLoadConfig(model=str(path), device="cpu", dtype="float32",
                                       fold_shared_expert=fold)).model for fold in (False, True)]


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_folded_logits_match_the_separate_shared_expert(tiny_models, which):
    path = tiny_models["qwen2_moe"] if which == "tiny" else DEMO
    plain, folded = _pair(path)
    moe = folded.moe_layers()[0]
    assert plain.moe_layers()[0].shared_slots is None and moe.shared_expert is None
    n = moe.shared_slots.count
    assert n == plain.spec.shared_expert_intermediate_size // plain.spec.moe_intermediate_size
    assert moe.shared_slots.first == moe.num_slots and moe.w13.shape[0] == moe.num_slots + n
    assert moe.shared_slots.gated and moe.gate.weight.shape[0] == moe.num_experts + 1
    ids = _ids(plain.spec.vocab_size)
    torch.testing.assert_close(folded.forward_full(ids), plain.forward_full(ids), rtol=1e-4, atol=1e-4)


def _step(model, ids, tau=None, top_k=None, exempt=False):
    """One cache-free forward with brownout `tau`, shedding `top_k` and every other token
    exempt when `exempt`: (logits, touched)."""
    x = ids.reshape(1, -1)
    positions = torch.arange(x.shape[1]).expand_as(x)
    ctx = ForwardContext(tau=None if tau is None else torch.tensor(float(tau)),
                         top_k=None if top_k is None else torch.tensor(top_k, dtype=torch.int32),
                         exempt=(torch.arange(x.numel()) % 2 == 0) if exempt else None,
                         count_touched=True)
    out = model.forward(x, positions, ctx)
    return model.compute_logits(out.hidden), out.experts_touched


@pytest.mark.parametrize("tau,top_k,exempt", [(None, None, False), (0.0, None, False), (0.5, None, False),
                                              (None, 2, False), (0.3, 3, False), (0.3, 2, True)])
def test_brownout_and_shedding_leave_the_shared_slots_alone(tau, top_k, exempt):
    """Brownout redirects and shedding drops routed assignments only: with united experts
    installed both models give the same logits and count the same routed/united slots."""
    plain, folded = _pair(DEMO)
    for m in (plain, folded):
        install_uncalibrated(m, 4)
    ids = _ids(plain.spec.vocab_size, seed=1)
    (lp, tp), (lf, tf) = _step(plain, ids, tau, top_k, exempt), _step(folded, ids, tau, top_k, exempt)
    torch.testing.assert_close(lf, lp, rtol=1e-4, atol=1e-4)
    assert torch.equal(tf, tp)  # the folded shared slots are not counted as touched
    assert int(tf.max()) <= folded.moe_layers()[0].num_slots


def test_families_without_a_shared_expert_are_unchanged(tiny_models):
    for family in ("mixtral", "qwen3_moe"):
        plain, folded = _pair(tiny_models[family])
        moe = folded.moe_layers()[0]
        assert moe.shared_slots is None and moe.w13.shape == plain.moe_layers()[0].w13.shape
        ids = _ids(plain.spec.vocab_size)
        assert torch.equal(folded.forward_full(ids), plain.forward_full(ids))


def test_a_width_that_is_not_whole_experts_keeps_the_separate_shared_expert(tiny_models):
    plain, _ = _pair(tiny_models["qwen2_moe"])
    moe = plain.moe_layers()[0]
    moe.inter = 24  # 64 is not a multiple: no fold, nothing changed
    assert not moe.can_fold_shared_expert() and not moe.fold_shared_expert()
    assert moe.shared_expert is not None and moe.shared_slots is None


@pytest.mark.parametrize("tau", [None, 0.5])
def test_long_steps_run_the_folded_slots_as_dense_gemms(monkeypatch, tau):
    """Past FOLDED_MAX_TOKENS the shared slots run through dense GEMMs, not the expert
    kernel's assignments; the logits stay those of the separate shared expert."""
    from brownout.models.layers import moe as moe_mod

    plain, folded = _pair(DEMO)
    for m in (plain, folded):
        install_uncalibrated(m, 4)
    ids = _ids(plain.spec.vocab_size, seed=2)  # 38 tokens
    monkeypatch.setattr(moe_mod, "FOLDED_MAX_TOKENS", 8)
    seen = []
    real = moe_mod.SparseMoE._shared_dense
    monkeypatch.setattr(moe_mod.SparseMoE, "_shared_dense",
                        lambda self, *a: seen.append(a[0].shape[0]) or real(self, *a))
    (lp, tp), (lf, tf) = _step(plain, ids, tau), _step(folded, ids, tau)
    assert seen and set(seen) == {ids.numel()}
    torch.testing.assert_close(lf, lp, rtol=1e-4, atol=1e-4)
    assert torch.equal(tf, tp)


def test_the_cpu_default_keeps_the_shared_expert_a_module_of_its_own():
    """Folding saves GPU launches; on the CPU the expert path loops over slots, so the
    loader's default folds on CUDA only."""
    model = load_model(ModelLoadConfig(model=DEMO, device="cpu", dtype="float32")).model
    moe = model.moe_layers()[0]
    assert moe.shared_slots is None and moe.shared_expert is not None
