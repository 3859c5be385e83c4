"""`brownout eval perplexity --top-k`: every k' scored at every tau; k' = k is the model."""

from __future__ import annotations

import argparse
import json

import pytest

from brownout.eval.cli import parse_top_ks


def test_parse_top_ks():
    assert parse_top_ks("4,2, 1") == [4, 2, 1]
    for bad in ("0", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_top_ks(bad)


def test_cli_scores_each_k_at_each_tau(tiny_models, tmp_path):
    from tiny import CORPUS

    from brownout.cli import main

    text = tmp_path / "t.txt"
    text.write_text(CORPUS)
    out = tmp_path / "ppl.json"
    args = ["eval", "perplexity", "--model", str(tiny_models["qwen2_moe"]), "--tau", "1",
            "--text", str(text), "--window", "32", "--batch-tokens", "64", "--device", "cpu"]
    assert main(args + ["--top-k", "2,1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["top_k"], r["tau"]) for r in rows] == [(2, 1.0), (1, 1.0)]
    assert rows[1]["perplexity"] != rows[0]["perplexity"]
    plain = tmp_path / "plain.json"
    assert main(args + ["--out", str(plain)]) == 0
    base = json.loads(plain.read_text())["results"]
    assert [r["top_k"] for r in base] == [None]
    assert base[0]["perplexity"] == rows[0]["perplexity"]  # k' = k is the model itself
