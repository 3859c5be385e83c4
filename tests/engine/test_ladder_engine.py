"""The engine passes the controller's rungs to the runner and reports them: k' per phase and
the accuracy spent, priced from the table beside the united experts (or the demo model's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brownout.config import BrownoutConfig, EngineConfig, ModelLoadConfig, SchedulerConfig, SLOConfig
from brownout.defaults import default_model_dir
from brownout.engine import llm_engine
from brownout.engine.llm_engine import LLMEngine
from brownout.types import Rungs, SamplingParams, ValidationError

PRICES = {"model_top_k": 2, "prices": [{"top_k": 2, "tau": 1.0, "ppl_increase": 0.0},
                                       {"top_k": 1, "tau": 1.0, "ppl_increase": 0.2}]}


def test_price_dirs_are_the_united_experts_then_the_demo_models(tmp_path):
    demo = Path(default_model_dir())
    assert llm_engine._price_dirs(None, demo) == [demo.parent]
    assert llm_engine._price_dirs(str(tmp_path), None) == [tmp_path]
    assert llm_engine._price_dirs("average:4", tmp_path) == []


def test_engine_runs_the_chosen_rungs_and_reports_them(tiny_models, tmp_path, monkeypatch):
    (tmp_path / "ladder-prices.json").write_text(json.dumps(PRICES))
    monkeypatch.setattr(llm_engine, "_price_dirs", lambda united, model_dir: [tmp_path])
    eng = LLMEngine(EngineConfig(
        load=ModelLoadConfig(model=str(tiny_models["qwen2_moe"]), device="cpu"),
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64)))
    assert eng.controller.prices is not None
    monkeypatch.setattr(eng.controller, "choose_rungs", lambda planned: Rungs(tau=1.0, top_k=1))
    eng.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=4, temperature=0.0,
                                                             ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.last_step_stats.top_k == 1
    snap = eng.snapshot()
    assert snap["top_k_prefill"] == 2  # the policy's own choice (it sheds nothing)
    # sums of price x step time over step times: equal up to rounding
    assert snap["accuracy_spent"]["time_weighted"] == pytest.approx(0.2)
    assert snap["accuracy_spent"]["token_weighted"] == pytest.approx(0.2)


def test_rung_prices_flag_overrides_the_table_beside_the_united_experts(tmp_path):
    given = tmp_path / "mine.json"
    given.write_text(json.dumps(PRICES))
    table = llm_engine.rung_price_table(BrownoutConfig(rung_prices=str(given)), None, top_k=2)
    assert table.shed_levels == [1] and table.price(1.0, 1) == pytest.approx(0.2)
    # no flag, no table beside anything: no prices (no shedding, no accuracy spent)
    assert llm_engine.rung_price_table(BrownoutConfig(), None, top_k=2) is None


def test_rung_prices_of_another_top_k_are_refused_naming_the_flag(tmp_path):
    given = tmp_path / "mine.json"
    given.write_text(json.dumps(PRICES))
    with pytest.raises(ValidationError, match="rung_prices.*top-k 2.*4 experts"):
        llm_engine.rung_price_table(BrownoutConfig(rung_prices=str(given)), None, top_k=4)


def _run(eng, prompts):
    """Run the requests {id: (prompt, priority)} together; their output tokens by id."""
    for rid, (prompt, priority) in prompts.items():
        eng.add_request(rid, prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                        priority=priority)
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id] = list(out.output_token_ids)
    return tokens


def test_exempt_tokens_keep_their_experts_inside_a_dimmed_step(tiny_models):
    """--dim-exempt-priority: the tokens of a request of priority <= P keep the model's own
    top-k routing while the step (and the other requests in it) runs dimmed, so that
    request's output is the exact model's."""
    path = str(tiny_models["qwen2_moe"])
    prompts = {"vip": (list(range(5, 40)), 0), "bulk": (list(range(100, 140)), 1)}

    def engine(tau, exempt):
        return LLMEngine(EngineConfig(
            load=ModelLoadConfig(model=path, device="cpu"),
            brownout=BrownoutConfig(united_experts="average:4", tau_prefill=tau, tau_decode=tau),
            slo=SLOConfig(policy="fixed", dim_exempt_priority=exempt)))

    exact = _run(engine(1.0, None), prompts)
    assert len(exact["vip"]) == 8
    eng = engine(0.0, 0)
    dimmed = _run(eng, prompts)
    assert dimmed["vip"] == exact["vip"]
    assert eng.last_step_stats.tau == 0.0  # the steps ran dimmed around the exempt tokens
    assert eng.controller.num_exempt_steps > 0
    assert eng.snapshot()["exempt_steps_total"] == eng.controller.num_exempt_steps
    spent = eng.controller.accuracy_spent()
    assert spent is None or spent["token_weighted"] >= 0.0
    plain = _run(engine(0.0, None), prompts)  # without the exemption the request is dimmed
    assert plain["vip"] != exact["vip"]  # so the equality above is the exemption's doing


def test_exempt_tokens_keep_the_models_k_inside_a_shed_step(tiny_models, monkeypatch):
    path = str(tiny_models["qwen2_moe"])
    prompts = {"vip": (list(range(5, 40)), 0), "bulk": (list(range(100, 140)), 1)}
    config = EngineConfig(load=ModelLoadConfig(model=path, device="cpu"),
                          brownout=BrownoutConfig(united_experts="average:4"),
                          slo=SLOConfig(policy="fixed", dim_exempt_priority=0))
    exact = _run(LLMEngine(config), prompts)
    eng = LLMEngine(config)
    monkeypatch.setattr(eng.controller, "_choose_rungs", lambda planned: Rungs(tau=0.0, top_k=1))
    assert _run(eng, prompts)["vip"] == exact["vip"]
    assert eng.last_step_stats.top_k == 1
