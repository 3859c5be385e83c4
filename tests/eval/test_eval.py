"""Tests of the fixed-tau evaluations: perplexity and multiple-choice scoring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from brownout.eval.choice import encode_candidates, evaluate_choice, read_questions, score_candidates
from brownout.eval.perplexity import evaluate_perplexity, make_batches, tokenize_text
from brownout.eval.scoring import check_taus, load_eval_model, run_step


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return tiny_models["qwen2_moe"]


@pytest.fixture(scope="module")
def united(qwen, tmp_path_factory):
    from brownout.cli import main

    out = tmp_path_factory.mktemp("united") / "way2"
    assert main(["unite", "--model", str(qwen), "--way", "2", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_model(qwen):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(qwen), dtype=torch.float32).eval()


def test_make_batches_drops_partial_batch():
    batches = make_batches(torch.arange(1000), window=100, batch_tokens=300)
    assert len(batches) == 3 and batches[0].shape == (3, 100)
    assert batches[2][2, -1].item() == 899
    with pytest.raises(ValueError, match="window"):
        make_batches(torch.arange(50), window=100, batch_tokens=300)


def test_perplexity_at_tau_one_matches_transformers(qwen, united, hf_model):
    em = load_eval_model(str(qwen), str(united), device="cpu")
    from tiny import CORPUS

    ids = tokenize_text(em.tokenizer, CORPUS, max_tokens=256)
    batches = make_batches(ids, window=64, batch_tokens=128)
    (res,) = evaluate_perplexity(em.model, batches, [1.0], em.device)
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = hf_model(batch).logits
            nll += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            n += batch[:, 1:].numel()
    assert res["tokens_scored"] == n
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_brownout_changes_perplexity_and_touches_fewer_slots(qwen, united):
    em = load_eval_model(str(qwen), str(united), device="cpu")
    ids = torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(0))
    one, zero = evaluate_perplexity(em.model, make_batches(ids, 64, 256), [1.0, 0.0], em.device)
    assert one["perplexity"] != zero["perplexity"]
    # tau 0 leaves only united slots and lone members: at most G + G per layer (way 2, 8 experts)
    assert all(t <= 8 for t in zero["mean_slots_touched"])
    assert sum(zero["mean_slots_touched"]) < sum(one["mean_slots_touched"])


def test_check_taus():
    with pytest.raises(ValueError, match="united"):
        check_taus([1.0, 0.5], has_united=False)
    check_taus([1.0], has_united=False)
    with pytest.raises(ValueError, match="tau"):
        check_taus([1.5], has_united=True)


def test_read_questions_validates(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "label": 1}) + "\n\n")
    assert read_questions(good)[0].label == 1
    for row, field in [({"context": 1, "choices": ["x", "y"], "label": 0}, "context"),
                       ({"context": "a", "choices": ["x"], "label": 0}, "choices"),
                       ({"context": "a", "choices": ["x", "y"], "label": 2}, "label")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:1: '{field}'"):
            read_questions(bad)


def test_choice_scores_match_transformers_despite_padding(qwen, united, hf_model, tmp_path):
    em = load_eval_model(str(qwen), str(united), device="cpu")
    path = tmp_path / "q.jsonl"
    rows = [{"context": "The quick brown fox", "choices": [" jumps over the lazy dog", " runs"], "label": 0},
            {"context": "experts route", "choices": [" tokens", " cats and dogs and birds"], "label": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    questions = read_questions(path)
    cands = encode_candidates(em.tokenizer, questions, 128)
    scores = score_candidates(em.model, cands, 1.0, 4096, em.device, pad_id=0)  # one padded step
    for (ids, n_cont), score in zip(cands, scores):
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], -1)
        want = sum(float(logp[p - 1, ids[p]]) for p in range(len(ids) - n_cont, len(ids)))
        assert score == pytest.approx(want, abs=1e-3)
    results = evaluate_choice(em.model, em.tokenizer, questions, [1.0, 0.0], 4096, em.device, 128)
    assert [r["tau"] for r in results] == [1.0, 0.0]
    assert all(0.0 <= r["acc"] <= 1.0 and r["questions"] == 2 for r in results)


def test_padding_is_not_counted_by_brownout(qwen, united):
    em = load_eval_model(str(qwen), str(united), device="cpu")
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, 4:] = False
    pad_a, pad_b = ids.clone(), ids.clone()
    pad_a[1, 4:], pad_b[1, 4:] = 5, 77  # long runs of one token would skew the counts
    out_a, _ = run_step(em.model, pad_a, 0.5, valid)
    out_b, _ = run_step(em.model, pad_b, 0.5, valid)
    torch.testing.assert_close(out_a[valid], out_b[valid])
    # counted, padding does change the keep set for some filler (so the check above can fail);
    # which filler flips a keep decision depends on the random tiny model, so try several
    cnt_a, _ = run_step(em.model, pad_a, 0.5)
    gen = torch.Generator().manual_seed(2)
    changed = False
    for _ in range(8):
        pad_c = ids.clone()
        pad_c[1, 4:] = torch.randint(0, 300, (28,), generator=gen)
        cnt_c, _ = run_step(em.model, pad_c, 0.5)
        changed = changed or not torch.allclose(cnt_a[valid], cnt_c[valid])
    assert changed


def test_cli_perplexity_and_choice(qwen, united, tmp_path):
    from tiny import CORPUS

    from brownout.cli import main

    text = tmp_path / "t.txt"
    text.write_text(CORPUS)
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", str(qwen), "--united", str(united), "--tau", "1,0",
                 "--text", str(text), "--window", "32", "--batch-tokens", "64", "--device", "cpu",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["tau"] for r in report["results"]] == [1.0, 0.0] and report["united_way"] == 2
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"context": "The quick", "choices": [" brown", " red"], "label": 0}))
    out = tmp_path / "choice.json"
    assert main(["eval", "choice", "--model", str(qwen), "--united", str(united), "--tau", "1",
                 "--data", str(data), "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["questions"] == 1
