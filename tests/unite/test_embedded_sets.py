"""The demo model's embedded united-expert sets: what their manifests promise (way, the
calibration named, prices by kind of text with the held-out price quoted), that their
weights match the model's shapes, and that the engine serves with each at the deepest
brownout. Reads only the package's assets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from brownout.defaults import default_model_dir, default_united_dir
from brownout.engine.llm import LLM
from brownout.types import SamplingParams
from brownout.unite.store import WEIGHTS_FILE, read_manifest

WAYS = (2, 4, 8)
MAX_SET_BYTES = 8 * 2**20  # an embedded set stays small: the package ships it


def _config() -> dict:
    return json.loads((Path(default_model_dir()) / "config.json").read_text())


def _manifest(way: int) -> dict:
    united = default_united_dir(way)
    assert united is not None, f"united-way{way} is not shipped"
    return read_manifest(united)


@pytest.mark.parametrize("way", WAYS)
def test_manifest_names_way_and_calibration(way):
    cfg, manifest = _config(), _manifest(way)
    assert manifest["way"] == way and manifest["num_groups"] == cfg["num_experts"] // way
    assert manifest["shapes"] == {"num_experts": cfg["num_experts"], "hidden_size": cfg["hidden_size"],
                                  "moe_intermediate_size": cfg["moe_intermediate_size"],
                                  "num_layers": cfg["num_hidden_layers"],
                                  "moe_layers": list(range(cfg["num_hidden_layers"]))}
    cal = manifest["calibration"]
    assert len(cal["sources"]) >= 2 and cal["part"] == "fit"
    assert all(s["name"] and s["tokens"] > 0 and len(s["sha256"]) == 64 for s in cal["sources"])


@pytest.mark.parametrize("way", WAYS)
def test_prices_by_kind_with_held_out_quoted(way):
    manifest = _manifest(way)
    cal = manifest["calibration"]
    prices = manifest["prices"]
    assert prices["quoted"] == "held_out_estimate"  # the controller spends a held-out price
    for kind in ("in_distribution", "held_out", "held_out_estimate"):
        entry = prices[kind]
        assert entry["tau"][0] == 1.0 and entry["tau"][-1] == 0.0 and entry["increase"][0] == 0.0
        assert len(entry["perplexity"]) == len(entry["tau"]) == len(entry["increase"])
    calibrated = {s["sha256"] for s in cal["sources"]}
    held_out = [t for t in prices["texts"] if t["kind"] == "held_out"]
    assert held_out and all(t["sha256"] not in calibrated for t in held_out)
    estimate = prices["held_out_estimate"]
    assert estimate["folds"] and all(f["left_out"] not in f["calibration"] for f in estimate["folds"])


@pytest.mark.parametrize("way", WAYS)
def test_weights_load_with_the_model_shapes(way):
    cfg, united = _config(), Path(default_united_dir(way))
    groups, hidden, width = cfg["num_experts"] // way, cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert (united / WEIGHTS_FILE).stat().st_size <= MAX_SET_BYTES
    with safe_open(str(united / WEIGHTS_FILE), "pt") as f:
        for layer in range(cfg["num_hidden_layers"]):
            assert list(f.get_slice(f"layers.{layer}.w13").get_shape()) == [groups, 2 * width, hidden]
            assert list(f.get_slice(f"layers.{layer}.w2").get_shape()) == [groups, hidden, width]
            group_of = f.get_tensor(f"layers.{layer}.group_of")
            assert group_of.shape == (cfg["num_experts"],)
            assert sorted(set(group_of.tolist())) == list(range(groups))
            assert all((group_of == g).sum() == way for g in range(groups))


@pytest.mark.parametrize("way", WAYS)
def test_engine_serves_with_the_set_at_tau_zero(way):
    num_experts = _config()["num_experts"]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [list(range(40, 90)), list(range(300, 340)), list(range(1000, 1060, 2))]
    llm = LLM(default_model_dir(), device="cpu", united_experts=default_united_dir(way), tau=0.0)
    try:
        assert llm.engine.runner.brownout_ready
        outputs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == 4 for o in outputs)
        # tau 0 leaves the united slots plus lone members: at most 2 slots per group
        touched = llm.engine.last_step_stats.experts_touched
        assert max(touched) <= 2 * (num_experts // way)
    finally:
        llm.close()
