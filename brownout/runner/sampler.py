"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; logprobs.

Sampling draws with the exponential-race trick (argmax of p / q with q ~ Exp(1)), which
needs no host synchronisation and lets each seeded request draw from its own generator.
"""

from __future__ import annotations

from typing import Optional

import torch

from brownout.types import Logprob, SamplingParams


def to_device(values, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A small host list as a device tensor without synchronising: on a GPU through pinned
    memory and a non-blocking copy (a plain copy from pageable memory would wait for the
    whole stream, i.e. for the forward pass just launched)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # logits [B, V] float32 -> temperature-scaled, top-k / top-p masked
    temps = to_device([max(p.temperature, 1e-5) for p in params], logits.device, torch.float32)
    logits = logits / temps.unsqueeze(1)
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        V = logits.shape[1]
        ks = to_device([min(k, V) if k > 0 else V for k in top_ks], logits.device, torch.long)
        kth = torch.sort(logits, dim=1, descending=True).values.gather(1, (ks - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, order = torch.sort(logits, dim=1, descending=True)
        probs = torch.softmax(sorted_logits, dim=1)
        before = probs.cumsum(dim=1) - probs  # mass strictly before each token
        ps = to_device(top_ps, logits.device, torch.float32).unsqueeze(1)
        drop = before >= ps  # keeps the smallest prefix reaching top_p (never the first token)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    generators: list[Optional[torch.Generator]],
) -> torch.Tensor:  # [B] int64
    greedy_tokens = logits.argmax(dim=1)
    if all(p.greedy for p in params):
        return greedy_tokens
    probs = torch.softmax(_filter(logits, params), dim=1)
    q = torch.empty_like(probs).exponential_()  # one launch for the rows without a seed
    for row, gen in enumerate(generators):
        if gen is not None:  # seeded requests draw from their own stream
            q[row].exponential_(generator=gen)
    sampled = (probs / q).argmax(dim=1)
    is_greedy = to_device([p.greedy for p in params], logits.device, torch.bool)
    return torch.where(is_greedy, greedy_tokens, sampled)


def token_logprobs(
    logits: torch.Tensor,  # [N, V] float32, raw
    tokens: torch.Tensor,  # [N] the chosen / target tokens
    num_top: int,
) -> list[Logprob]:
    logp = torch.log_softmax(logits, dim=1)
    chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    tops: list[dict[int, float]] = [{} for _ in chosen]
    if num_top > 0:
        vals, ids = logp.topk(num_top, dim=1)
        tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [Logprob(int(t), lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]
