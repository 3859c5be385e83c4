"""Brownout through the whole engine: tau = 1 is the exact model, lower tau touches fewer slots."""

import pytest

from brownout.engine.llm import LLM
from brownout.types import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(5, 30)), [9, 8, 7, 6, 5, 4, 3], list(range(100, 140, 2))]


def _touched(llm):
    return llm.engine.last_step_stats.experts_touched


def test_tau_one_is_exact_and_tau_zero_touches_fewer_slots(tiny_models):
    path = str(tiny_models["qwen2_moe"])
    plain = LLM(path, device="cpu").generate(PROMPTS, PARAMS)
    exact = LLM(path, device="cpu", united_experts="average:2", tau=1.0)
    assert exact.engine.runner.brownout_ready
    assert [o.token_ids for o in exact.generate(PROMPTS, PARAMS)] == [o.token_ids for o in plain]

    full = LLM(path, device="cpu", united_experts="average:4", tau=1.0)
    full.generate(PROMPTS, SamplingParams(max_tokens=1))
    dimmed = LLM(path, device="cpu", united_experts="average:4", tau=0.0)
    dimmed.generate(PROMPTS, SamplingParams(max_tokens=1))
    # a prefill step of ~50 tokens touches most of the 8 experts; tau = 0 leaves at most 2 united
    # slots plus lone members (one per group of 4 at most)
    assert min(_touched(full)) >= 5
    assert max(_touched(dimmed)) <= 4
    assert _touched(dimmed) != _touched(full)
    assert dimmed.engine.last_step_stats.tau == 0.0


def test_bad_united_spec_is_refused(tiny_models):
    with pytest.raises(ValueError, match="way in 'average:WAY' must be 2, 4 or 8"):
        LLM(str(tiny_models["mixtral"]), device="cpu", united_experts="average:3")
