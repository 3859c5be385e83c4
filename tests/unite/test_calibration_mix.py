"""Calibration sources and their mix: record rendering, fit/tail split, balance, manifest."""

from __future__ import annotations

import json

import pytest
import torch

from brownout.unite.calibration import calibration_mix, source_windows
from brownout.unite.sources import (SourceSpec, file_sha256, read_records, render_record,
                                    source_documents, split_plain, split_records)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["qwen2_moe"]))


def _plain(path, lines: int, tail_word: str = "omega"):
    """A plain file whose last 5% of lines (and only those) carry `tail_word`."""
    body = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(lines)]
    cut = int(lines * 0.96)
    body[cut:] = [f"{tail_word} {line}" for line in body[cut:]]
    path.write_text("\n".join(body) + "\n")
    return path


def test_source_spec_parses_weights(tmp_path):
    assert SourceSpec.parse("logs/a.jsonl:2").weight == 2.0
    assert str(SourceSpec.parse("logs/a.jsonl:2").path) == "logs/a.jsonl"
    assert SourceSpec.parse("a.txt").weight == 1.0
    odd = tmp_path / "b:3"  # an existing file whose name ends like a weight stays a file
    odd.write_text("x")
    assert SourceSpec.parse(str(odd)) == SourceSpec(odd)
    with pytest.raises(ValueError, match="weight"):
        SourceSpec.parse("a.txt:0")


def test_records_render_as_chats(tokenizer):
    gsm = {"question": "2+2?", "answer": "4"}
    chat = render_record(gsm, tokenizer)
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert render_record({"prompt": "hi", "output": "hello"}) == "hi\n\nhello\n"
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert render_record(share, tokenizer) == chat.replace("2+2?", "q").replace("\n4<", "\na<")
    assert render_record({"turns": ["one", "two"]}) == "one\n\ntwo\n"
    assert render_record({"text": "plain words"}, tokenizer) == "plain words"
    with pytest.raises(ValueError, match="no known text fields"):
        render_record({"id": 3})


def test_read_records_jsonl_json_list_and_object(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows, "name": "x"}))
    for name in ("a.jsonl", "b.json", "c.json"):
        assert read_records(tmp_path / name) == rows
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")


def test_fit_and_tail_split_like_the_demo_data():
    text = "".join(f"line {i}\n" for i in range(100))
    fit, tail = split_plain(text)
    assert fit + tail == text and fit.endswith("\n") and tail.startswith("line 9")
    assert 0.04 < len(tail) / len(text) < 0.07
    fit_rows, tail_rows = split_records(list(range(100)))
    assert fit_rows == list(range(95)) and tail_rows == list(range(95, 100))
    fit, tail = split_plain("no line breaks here at all, only spaces between words")
    assert fit and fit + tail == "no line breaks here at all, only spaces between words"


def test_source_documents_parts(tmp_path, tokenizer):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    fit, tail = source_documents(path, "fit", tokenizer), source_documents(path, "tail", tokenizer)
    assert len(fit) == 38 and len(tail) == 2 and "q39" in tail[-1]
    assert len(source_documents(path, "all", tokenizer)) == 40
    with pytest.raises(ValueError, match="part"):
        source_documents(path, "middle")


def test_mix_balances_sources_and_never_takes_the_tail(tmp_path, tokenizer):
    big = _plain(tmp_path / "big.txt", 2000)
    small = _plain(tmp_path / "small.txt", 400)
    mix = calibration_mix(tokenizer, [SourceSpec(big), SourceSpec(small)], 4096, 64, part="fit")
    per_source = torch.bincount(mix.source_of, minlength=2).tolist()
    assert per_source == [32, 32]  # equal tokens per source, whatever their sizes
    assert [s["tokens"] for s in mix.sources] == [2048, 2048]
    assert mix.sources[0]["sha256"] == file_sha256(big) and mix.sources[1]["part"] == "fit"
    assert mix.token_sources().shape == (mix.windows.numel(),)
    omega = set(tokenizer("omega", add_special_tokens=False)["input_ids"])
    text = tokenizer.decode(mix.windows.flatten().tolist())
    assert "omega" not in text and omega  # the tail (the only place the word occurs) stays out
    weighted = calibration_mix(tokenizer, [SourceSpec(big, 3.0), SourceSpec(small, 1.0)], 4096, 64)
    assert torch.bincount(weighted.source_of).tolist() == [48, 16]
    assert weighted.sources[0]["weight"] == pytest.approx(0.75)


def test_windows_spread_over_the_whole_text(tokenizer):
    text = "".join(f"{WORDS[i % len(WORDS)]} {i}\n" for i in range(3000))
    windows = source_windows(tokenizer, text, 4, 32)
    assert windows.shape == (4, 32)
    decoded = [tokenizer.decode(w.tolist()) for w in windows]
    assert " 0\n" in decoded[0] or decoded[0].startswith("alpha 0")
    assert any(f" {n}\n" in decoded[-1] for n in range(2900, 3000))  # the last window is near the end
    short = source_windows(tokenizer, "alpha beta " * 10, 10, 32)  # fewer tokens than asked: all of it
    assert 0 < short.shape[0] < 10
