"""The held-out price tables and the shipped estimate when only some leave-one-source-out
folds were measured (synthetic perplexities; no model, no data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

accuracy_ship = pytest.importorskip("accuracy_ship")
report_mod = pytest.importorskip("accuracy_sources_report")

SOURCES = {"shakespeare": "a", "sotu": "b", "inaugural": "c", "gsm8k": "d"}
TAUS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]


def _ppl(at_zero: float) -> dict:
    """Perplexity 10 at tau 1 rising linearly to `at_zero` at tau 0."""
    return {str(t): 10 + (at_zero - 10) * (1 - t) for t in TAUS}


def _report() -> dict:
    plain = {s: _ppl(11.0) for s in SOURCES if s != "gsm8k"}
    runs = [
        {"way": 8, "recipe": "contiguous-distill", "calibration": "all", "held_out_source": None,
         "calibration_sources": {s: 1 for s in SOURCES}, "build_s": 60.0, "fit_error": {},
         "perplexity": {**plain, "gsm8k": _ppl(12.0), "alpaca": _ppl(10.5)}},
        {"way": 8, "recipe": "contiguous-distill", "calibration": "no-gsm8k", "held_out_source": "gsm8k",
         "calibration_sources": {s: 1 for s in SOURCES if s != "gsm8k"}, "build_s": 60.0, "fit_error": {},
         "perplexity": {**plain, "gsm8k": _ppl(20.0)}},
        # the baseline priced on the gsm8k tail alone (--texts gsm8k)
        {"way": 8, "recipe": "contiguous-average", "calibration": "all", "held_out_source": None,
         "calibration_sources": {s: 1 for s in SOURCES}, "build_s": 1.0, "fit_error": {},
         "perplexity": {"gsm8k": _ppl(40.0)}},
    ]
    return {"runs": runs, "sources": SOURCES, "fifth": {"alpaca": "e"}, "taus": TAUS, "machine": "m",
            "torch": "t", "max_tokens_per_text": 16384, "calibration_tokens": 131072}


def test_estimate_uses_the_folds_measured_and_names_the_rest():
    est = accuracy_ship.loso_estimate(_report(), 8, "contiguous-distill")
    assert [f["left_out"] for f in est["folds"]] == ["gsm8k"]
    assert est["folds_missing"] == ["shakespeare", "sotu", "inaugural"]
    assert est["increase"][0] == 0.0 and est["increase"][-1] == pytest.approx(1.0)


def test_estimate_without_any_fold_is_refused():
    with pytest.raises(SystemExit, match="leaving a source out"):
        accuracy_ship.loso_estimate(_report(), 4, "contiguous-distill")


def test_markdown_quotes_the_partial_estimate_against_the_baseline(tmp_path):
    report = _report()
    report["shipped"] = {"8": "contiguous-distill"}
    report["time_taken"] = "a while"
    path = tmp_path / "held_out_sources.md"
    report_mod.write_markdown(report, path)
    text = path.read_text()
    # +100% held out against +300% for the baseline on the same fold: 67% below
    row = next(line for line in text.splitlines() if line.startswith("| 8 | contiguous-distill |"))
    assert "**+100.0%** (gsm8k left out)" in row and "| no |" in row
    assert "+300.0%" in row and "67%" in row and row.endswith("| yes |")
    assert "Time taken: a while" in text
    assert "16,384 tokens per" in text
