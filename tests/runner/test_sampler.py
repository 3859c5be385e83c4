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

from brownout.runner.sampler import SamplingMetadata, filter_logits, sample
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


def _meta(params, generators=None):
    gens = generators if generators is not None else [None] * len(params)
    return SamplingMetadata.build(params, gens, VOCAB, torch.device("cpu"))


def _draw(logits, params, generators):
    return sample(logits, _meta(params, generators))


def _logits_stream(rows: int):
    g = torch.Generator().manual_seed(LOGITS_SEED)
    return [torch.randn(rows, VOCAB, generator=g) * LOGIT_SCALE for _ in range(STEPS)]


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_seeded_draws_match_pinned_tokens(name):
    params = BATCHES[name]
    gens = _generators(params)
    got = [_draw(logits, params, gens).tolist() for logits in _logits_stream(len(params))]
    assert got == PINNED[name]


def _slow_filter(logits: torch.Tensor, p: SP) -> torch.Tensor:
    """One row [V]: temperature, then keep the top_k largest (ties at the k-th kept), then
    the smallest prefix of the rest, by falling probability, whose mass reaches top_p."""
    x = logits.double() / p.temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if p.top_k > 0:
        kth = sorted(x.tolist(), reverse=True)[min(p.top_k, len(x)) - 1]
        keep &= x >= kth
    if p.top_p < 1.0:
        probs = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=0)
        mass = 0.0
        for i in sorted(range(len(x)), key=lambda i: -x[i].item()):
            if not keep[i]:
                continue
            if mass >= p.top_p:
                keep[i] = False
            mass += probs[i].item()
    return x.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_filter_matches_slow_reference(name):
    params = [p for p in BATCHES[name] if not p.greedy]
    meta = _meta(params)
    for logits in _logits_stream(len(params)):
        got = filter_logits(logits, meta)
        for row, p in enumerate(params):
            want = _slow_filter(logits[row], p)
            assert torch.equal(torch.isinf(got[row]), torch.isinf(want)), (name, row)
            kept = ~torch.isinf(want)
            assert torch.allclose(got[row][kept].double(), want[kept], rtol=1e-6)


def test_greedy_rows_take_the_argmax():
    params = [SP(temperature=0.0), SP(temperature=0.8, top_k=1, seed=1), SP(temperature=0.0, top_p=0.5)]
    for logits in _logits_stream(len(params)):
        assert torch.equal(_draw(logits, params, _generators(params)), logits.argmax(dim=1))
    mixed = BATCHES["mixed"]
    greedy_row = next(i for i, p in enumerate(mixed) if p.greedy)
    for logits in _logits_stream(len(mixed)):
        assert _draw(logits, mixed, _generators(mixed))[greedy_row] == logits[greedy_row].argmax()


def test_all_greedy_step_moves_no_sampling_tensor():
    meta = _meta([SP(temperature=0.0), SP(temperature=0.0, logprobs=3)])
    assert meta.all_greedy and meta.num_logprobs == (None, 3)
    assert meta.greedy is meta.temperatures is meta.top_k is meta.top_p is None


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    params = [SP(temperature=1.0, top_k=VOCAB * 4, seed=5), SP(temperature=1.0, top_k=2, seed=6)]
    meta = _meta(params)
    assert meta.top_k.tolist() == [VOCAB, 2] and meta.top_p is None
    logits = _logits_stream(2)[0]
    assert torch.isfinite(filter_logits(logits, meta)[0]).all()


def test_seeded_row_draws_the_same_alone_and_in_a_batch():
    batch = BATCHES["mixed"]
    row = 2  # top-k and top-p both set
    alone = [batch[row]]
    gens_batch, gens_alone = _generators(batch), _generators(alone)
    for logits in _logits_stream(len(batch)):
        in_batch = _draw(logits, batch, gens_batch)[row]
        assert _draw(logits[row:row + 1], alone, gens_alone)[0] == in_batch
