"""Multiple-choice accuracy by log-likelihood at fixed brownout thresholds.

Data: JSON lines, one question each:
  {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}
`label` is the index of the right choice. Each choice is scored by the sum of the log
probabilities of its tokens after the context (`acc`) and by that sum divided by the
choice's length in characters (`acc_norm`, fairer between choices of unequal length).
Candidates are packed into steps of at most `batch_tokens` tokens (right padding, which
brownout does not count and which touches no expert).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from brownout.eval.scoring import run_step

log = logging.getLogger(__name__)


@dataclass
class Question:
    context: str
    choices: list[str]
    label: int


def read_questions(path: Path) -> list[Question]:
    """Parse and validate the JSON-lines file; errors name the line and the field."""
    questions = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("context"), str):
            raise ValueError(f"{path}:{n}: 'context' must be a string")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{path}:{n}: 'choices' must be a list of at least 2 non-empty strings")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"{path}:{n}: 'label' must be an integer in [0, {len(choices)})")
        questions.append(Question(row["context"], choices, label))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def encode_candidates(tokenizer, questions: Sequence[Question], max_len: int):
    """One (tokens, number of choice tokens) per (question, choice), context left-truncated."""
    out = []
    for q in questions:
        ctx = tokenizer(q.context, add_special_tokens=False)["input_ids"]
        if not ctx:
            ctx = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
        for choice in q.choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"][: max_len - 1]
            ids = (ctx + cont)[-max_len:]
            out.append((ids, len(cont)))
    return out


def _steps(candidates, batch_tokens: int):
    """Indices of candidates grouped into steps of at most batch_tokens (rows x longest)."""
    order = sorted(range(len(candidates)), key=lambda i: len(candidates[i][0]))
    step: list[int] = []
    for i in order:
        longest = max([len(candidates[j][0]) for j in step] + [len(candidates[i][0])])
        if step and (len(step) + 1) * longest > batch_tokens:
            yield step
            step = []
        step.append(i)
    if step:
        yield step


def score_candidates(model, candidates, tau, batch_tokens: int, device, pad_id: int) -> list[float]:
    """Sum of log-probabilities of each candidate's choice tokens."""
    scores = [0.0] * len(candidates)
    for step in _steps(candidates, batch_tokens):
        L = max(len(candidates[i][0]) for i in step)
        ids = torch.full((len(step), L), pad_id, dtype=torch.long)
        valid = torch.zeros(len(step), L, dtype=torch.bool)
        for r, i in enumerate(step):
            toks = candidates[i][0]
            ids[r, : len(toks)] = torch.tensor(toks)
            valid[r, : len(toks)] = True
        logits, _ = run_step(model, ids.to(device), tau, valid)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # [B, L, V]
        for r, i in enumerate(step):
            toks, n_cont = candidates[i]
            pos = torch.arange(len(toks) - n_cont, len(toks))  # positions of the choice tokens
            scores[i] = float(logp[r, pos - 1, torch.tensor(toks)[pos]].sum())
    return scores


def evaluate_choice(model, tokenizer, questions: Sequence[Question], taus: Sequence[float],
                    batch_tokens: int, device, max_len: int, progress=None) -> list[dict]:
    candidates = encode_candidates(tokenizer, questions, max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = []
    for tau in taus:
        scores = score_candidates(model, candidates, tau, batch_tokens, device, pad_id)
        correct = correct_norm = 0
        k = 0
        for q in questions:
            s = scores[k:k + len(q.choices)]
            k += len(q.choices)
            norm = [v / len(c) for v, c in zip(s, q.choices)]
            correct += int(max(range(len(s)), key=s.__getitem__) == q.label)
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == q.label)
        results.append({"tau": tau, "acc": correct / len(questions),
                        "acc_norm": correct_norm / len(questions), "questions": len(questions)})
        if progress is not None:
            progress.update(1)
    return results
