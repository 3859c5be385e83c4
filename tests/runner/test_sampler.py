"""The sampler against pinned tokens and a slow torch reference.

`PINNED` holds the tokens that the sampler drew, for the batches and seeds below, when
temperature, top-k and top-p were applied by two separate sorts (top-k, then top-p over
its result). Every non-greedy row is seeded and each step's logits come from a seeded
generator, so the draws are a pure function of the seeds: a sampler that filters the
same way draws the same tokens. `_slow_filter` is an independent per-row reference of
temperature, then top-k, then top-p, in float64.
"""

from __future__ import annotations

import pytest
import torch

from brownout.runner.sampler import sample
from brownout.types import SamplingParams as SP

VOCAB = 64  # small enough that top-k and top-p cut a visible share of the vocabulary
STEPS = 6  # draws per batch: each seeded generator advances once per draw
LOGIT_SCALE = 3.0  # spreads random logits so top-p keeps a handful of tokens
LOGITS_SEED = 7

BATCHES = {
    "mixed": [SP(temperature=0.7, top_k=5, seed=11), SP(temperature=1.0, top_p=0.8, seed=12),
              SP(temperature=1.3, top_k=10, top_p=0.6, seed=13), SP(temperature=0.0),
              SP(temperature=0.9, seed=14), SP(temperature=0.5, top_k=3, top_p=0.9, seed=15)],
    "top_k": [SP(temperature=0.8, top_k=4, seed=21), SP(temperature=1.1, seed=22),
              SP(temperature=0.6, top_k=12, seed=23)],
    "top_p": [SP(temperature=0.8, top_p=0.7, seed=31), SP(temperature=1.2, seed=32),
              SP(temperature=1.0, top_p=0.95, seed=33)],
}
PINNED = {
    "mixed": [[35, 9, 20, 53, 5, 28], [21, 20, 8, 36, 16, 25], [61, 25, 52, 27, 17, 33],
              [15, 54, 20, 29, 37, 62], [48, 17, 23, 42, 56, 34], [46, 5, 28, 40, 36, 36]],
    "top_k": [[18, 57, 20], [53, 5, 30], [21, 38, 42], [36, 16, 25], [52, 2, 38], [30, 11, 33]],
    "top_p": [[35, 0, 20], [53, 5, 28], [21, 12, 40], [36, 18, 25], [52, 53, 38], [27, 10, 33]],
}


def _generators(params):
    return [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]


def _draw(logits, params, generators):
    return sample(logits, params, generators)


def _logits_stream(rows: int):
    g = torch.Generator().manual_seed(LOGITS_SEED)
    return [torch.randn(rows, VOCAB, generator=g) * LOGIT_SCALE for _ in range(STEPS)]


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_seeded_draws_match_pinned_tokens(name):
    params = BATCHES[name]
    gens = _generators(params)
    got = [_draw(logits, params, gens).tolist() for logits in _logits_stream(len(params))]
    assert got == PINNED[name]
