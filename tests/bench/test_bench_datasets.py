"""Prompt sources and the request list built from a workload."""

import json
from pathlib import Path

import numpy as np
import pytest

from brownout.bench.datasets import (AlpacaSource, build_requests, count_tokens, make_source,
                                     synthetic_text)
from brownout.bench.workloads import Arrival
from brownout.types import ValidationError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "prompts"


def test_count_tokens():
    assert count_tokens("one two three four five six seven eight nine ten") == 13
    assert count_tokens("") == 1
    assert count_tokens("a b c", tokenizer=lambda s: list(s)) == 5

    class Tok:
        def encode(self, s):
            return s.split()

    assert count_tokens("a b c d", Tok()) == 4


def test_synthetic_prompts_have_the_asked_length():
    rng = np.random.default_rng(0)
    assert len(synthetic_text(37, rng).split()) == 37
    src = make_source("synthetic:prompt_len=20,output_len=7")
    reqs = build_requests([Arrival(0.0), Arrival(1.0, 50, None), Arrival(2.0, None, 3)], src)
    assert [len(r.prompt.split()) for r in reqs] == [20, 50, 20]
    assert [r.max_tokens for r in reqs] == [7, 7, 3]  # the workload's hint wins
    assert [r.send_time_s for r in reqs] == [0.0, 1.0, 2.0] and [r.index for r in reqs] == [0, 1, 2]


def test_alpaca_output_lengths_and_cap(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "output": " ".join(["w"] * 100)},
                                {"instruction": "Be brief", "output": "ok"},
                                {"instruction": "", "output": "skipped"}]))
    src = make_source(f"alpaca:path={path}")
    assert sorted(p.output_len for p in src.pool) == [1, 130]
    assert sorted(p.output_len for p in AlpacaSource(path, tokenizer=str.split).pool) == [1, 100]
    reqs = build_requests([Arrival(t) for t in range(6)], src, max_tokens_cap=64)
    assert sorted({r.max_tokens for r in reqs}) == [1, 64]
    # drawn without repeats until the pool is used up
    assert sorted(r.prompt for r in reqs[:2]) == ["Be brief", "Say hi"]


def test_sharegpt_file_formats(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q1"},
                                                   {"from": "gpt", "value": "A1"}]},
                                {"conversations": []}, "plain prompt"]))
    src = make_source(f"sharegpt:path={path},output_len=33")
    assert sorted(p.text for p in src.pool) == ["Q1", "plain prompt"]
    reqs = build_requests([Arrival(0.0), Arrival(0.5, 999, None)], src, seed=4)
    assert all(r.max_tokens == 33 for r in reqs)
    assert build_requests([Arrival(0.0)] * 3, src, seed=4) == build_requests([Arrival(0.0)] * 3, src, seed=4)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/prompts (not in a user's checkout)")
def test_real_files():
    share = make_source(f"sharegpt:path={SHARED / 'sharegpt_v3_first_turns_1000.json'}")
    assert len(share.pool) > 900
    alpaca = make_source(f"alpaca:path={SHARED / 'alpaca_eval_gpt4_outputs.json'}")
    lens = [p.output_len for p in alpaca.pool]
    assert len(lens) > 800 and 50 < np.median(lens) < 1024


def test_source_spec_errors(tmp_path):
    for bad, field in (("nope", "prompts"), ("sharegpt", "prompts.sharegpt.path"),
                       ("synthetic:prompt_len=0", "prompts.prompt_len"),
                       ("synthetic:bogus=1", "prompts.bogus"),
                       (f"alpaca:path={tmp_path / 'missing.json'}", "prompts.alpaca.path")):
        with pytest.raises(ValidationError) as e:
            make_source(bad)
        assert e.value.field == field, bad
    empty = tmp_path / "e.json"
    empty.write_text("[]")
    with pytest.raises(ValidationError):
        make_source(f"sharegpt:path={empty}")
