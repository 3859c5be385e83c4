"""Prices by kind of text: in-distribution (a calibration source) vs held-out, in the manifest."""

from __future__ import annotations

import json
import math

import pytest

from brownout.eval.prices import (by_kind, calibration_digests, manifest_prices, quoted_kind, quoted_table,
                                  record_prices, summarise, text_kind)
from brownout.unite.sources import file_sha256


def _text(kind, ppls, name="t.txt"):
    return {"path": name, "name": name, "sha256": "x", "part": "tail", "kind": kind, "tokens": 100,
            "results": [{"tau": tau, "nll": math.log(p), "perplexity": p, "tokens_scored": 99,
                         "mean_slots_touched": [4.0, 2.0]} for tau, p in zip((1.0, 0.0), ppls)]}


def test_summary_counts_each_text_once():
    rows = summarise([_text("held_out", (10.0, 12.0)), _text("held_out", (100.0, 150.0))])
    assert [r["tau"] for r in rows] == [1.0, 0.0]
    assert rows[0]["increase"] == 0.0
    assert rows[1]["increase"] == pytest.approx((0.2 + 0.5) / 2)
    assert rows[1]["perplexity"] == pytest.approx(math.sqrt(12.0 * 150.0))  # geometric mean
    assert rows[1]["tokens_scored"] == 198 and rows[1]["mean_slots_touched"] == [4.0, 2.0]


def test_kinds_and_the_quoted_price():
    texts = [_text("in_distribution", (10.0, 11.0), "a"), _text("held_out", (20.0, 30.0), "b")]
    kinds = by_kind(texts)
    assert list(kinds) == ["held_out", "in_distribution"]
    assert quoted_kind(kinds) == "held_out"
    prices = manifest_prices(texts, window=512, batch_tokens=2048)
    assert prices["held_out"]["increase"] == [0.0, pytest.approx(0.5)]
    assert prices["in_distribution"]["increase"] == [0.0, pytest.approx(0.1)]
    assert [t["kind"] for t in prices["texts"]] == ["in_distribution", "held_out"]
    assert quoted_kind(by_kind(texts[:1])) == "in_distribution"


def test_record_merges_and_quotes_an_estimate_first(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"way": 2}))
    texts = [_text("in_distribution", (10.0, 11.0), "a"), _text("held_out", (20.0, 30.0), "b")]
    prices = record_prices(tmp_path, manifest_prices(texts, 512, 2048))
    assert prices["quoted"] == "held_out"
    estimate = {"tau": [1.0, 0.0], "perplexity": [15.0, 24.0], "increase": [0.0, 0.6]}
    record_prices(tmp_path, {"held_out_estimate": estimate})
    prices = record_prices(tmp_path, manifest_prices(texts[:1], 512, 2048))  # measured kinds replaced
    assert "held_out" not in prices and prices["held_out_estimate"] == estimate
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["way"] == 2 and manifest["prices"]["quoted"] == "held_out_estimate"
    assert quoted_table(manifest) == {"quoted": "held_out_estimate", **estimate}
    with pytest.raises(ValueError, match="no prices"):
        quoted_table({"way": 2})


def test_text_kind_follows_the_calibration_digests(tmp_path):
    seen, unseen = tmp_path / "seen.txt", tmp_path / "unseen.txt"
    seen.write_text("calibrated on")
    unseen.write_text("never seen")
    manifest = {"calibration": {"sources": [{"path": "elsewhere/seen.txt", "sha256": file_sha256(seen)}]}}
    assert calibration_digests(manifest) == {file_sha256(seen)}
    assert text_kind(seen, manifest) == "in_distribution"
    assert text_kind(unseen, manifest) == "held_out"
    assert text_kind(seen, {"calibration": None}) == "held_out"  # calibration-free sets
    assert text_kind(seen, None) == "held_out"


def test_cli_prices_both_kinds_and_records_them(tiny_models, tmp_path):
    from tiny import CORPUS

    from brownout.cli import main

    qwen = str(tiny_models["qwen2_moe"])
    seen, unseen = tmp_path / "seen.txt", tmp_path / "unseen.jsonl"
    seen.write_text("\n".join([CORPUS[:300]] * 12))
    unseen.write_text("\n".join(json.dumps({"prompt": CORPUS[i:i + 80], "output": CORPUS[i + 80:i + 200]})
                                for i in range(0, 1600, 40)))
    united = tmp_path / "u"
    assert main(["unite", "--model", qwen, "--way", "2", "--method", "frequency", "--calibration",
                 str(seen), "--calibration-tokens", "512", "--seq-len", "64", "--device", "cpu",
                 "--out", str(united)]) == 0
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", qwen, "--united", str(united), "--tau", "1,0.5,0",
                 "--text", str(seen), str(unseen), "--part", "all", "--window", "32",
                 "--batch-tokens", "64", "--max-tokens", "256", "--device", "cpu", "--record",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [t["kind"] for t in report["texts"]] == ["in_distribution", "held_out"]
    assert report["quoted"] == "held_out"
    assert report["results"] == report["kinds"]["held_out"]  # what a bench report reads
    assert [r["tau"] for r in report["results"]] == [1.0, 0.5, 0.0]
    prices = json.loads((united / "manifest.json").read_text())["prices"]
    assert prices["quoted"] == "held_out"
    for kind in ("held_out", "in_distribution"):
        assert prices[kind]["tau"] == [1.0, 0.5, 0.0] and prices[kind]["increase"][0] == 0.0
        assert len(prices[kind]["perplexity"]) == 3
    assert {t["name"] for t in prices["texts"]} == {"seen.txt", "unseen.jsonl"}
