"""The demo model's embedded united-expert sets: what their manifests promise, and that the
engine loads each one and serves with it at the deepest brownout."""

from __future__ import annotations

import pytest

from brownout.defaults import default_model_dir, default_united_dir
from brownout.engine.llm import LLM
from brownout.types import SamplingParams
from brownout.unite.store import read_manifest

WAYS = (2, 4, 8)
NUM_EXPERTS = 32  # the demo model's routed experts per layer


@pytest.mark.parametrize("way", WAYS)
def test_manifest_names_calibration_and_prices(way):
    united = default_united_dir(way)
    assert united is not None, f"united-way{way} is not shipped"
    manifest = read_manifest(united)
    assert manifest["way"] == way and manifest["num_groups"] == NUM_EXPERTS // way
    cal = manifest["calibration"]
    assert len(cal["sources"]) >= 2 and cal["part"] == "fit"
    assert all(s["tokens"] > 0 and len(s["sha256"]) == 64 for s in cal["sources"])
    prices = manifest["prices"]
    assert prices["quoted"] in prices
    for kind in ("in_distribution", "held_out", prices["quoted"]):
        entry = prices[kind]
        assert entry["tau"][0] == 1.0 and entry["increase"][0] == 0.0
        assert len(entry["perplexity"]) == len(entry["tau"]) == len(entry["increase"])
    calibrated = {s["sha256"] for s in cal["sources"]}
    held_out = [t for t in prices["texts"] if t["kind"] == "held_out"]
    assert held_out and all(t["sha256"] not in calibrated for t in held_out)


@pytest.mark.parametrize("way", WAYS)
def test_engine_serves_with_the_set_at_tau_zero(way):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [list(range(40, 90)), list(range(300, 340)), list(range(1000, 1060, 2))]
    llm = LLM(default_model_dir(), device="cpu", united_experts=default_united_dir(way), tau=0.0)
    try:
        assert llm.engine.runner.brownout_ready
        outputs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == 4 for o in outputs)
        # tau 0 leaves the united slots plus lone members: at most 2 slots per group
        touched = llm.engine.last_step_stats.experts_touched
        assert max(touched) <= 2 * (NUM_EXPERTS // way)
    finally:
        llm.close()
