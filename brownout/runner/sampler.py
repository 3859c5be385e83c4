"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; logprobs.

`SamplingMetadata` holds one step's sampling parameters as device tensors, built once per
step from the requests' `SamplingParams`. Top-k and top-p share one descending sort of
the scaled logits. Sampling draws with the exponential-race trick (argmax of p / q with
q ~ Exp(1)), which needs no host synchronisation and lets each seeded request draw from
its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from brownout.types import Logprob, SamplingParams

# divisor of greedy rows (temperature 0): finite, and their tokens come from argmax anyway
MIN_TEMPERATURE = 1e-5


def to_device(values, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A small host list as a device tensor without synchronising: on a GPU through pinned
    memory and a non-blocking copy (a plain copy from pageable memory would wait for the
    whole stream, i.e. for the forward pass just launched)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class SamplingMetadata:
    """One step's sampling parameters, one row per sampled sequence (B rows).

    Tensors a step does not need stay None (no transfer): all of them when every row is
    greedy, `top_k` / `top_p` when no row filters by them. Logprob counts stay on the host:
    they size a host-side top-k and trim the reply after the step is collected."""

    all_greedy: bool
    greedy: Optional[torch.Tensor]  # [B] bool: rows that take the argmax of the raw logits
    temperatures: Optional[torch.Tensor]  # [B] float32, at least MIN_TEMPERATURE
    top_k: Optional[torch.Tensor]  # [B] int64 in [1, V]; V where a row has no top-k
    top_p: Optional[torch.Tensor]  # [B] float32 in (0, 1); inf where a row has no top-p
    generators: tuple[Optional[torch.Generator], ...]  # per row; None: the device's default
    num_logprobs: tuple[Optional[int], ...]  # top alternatives per row; None: no logprobs

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]],
              vocab_size: int, device: torch.device) -> "SamplingMetadata":
        all_greedy = all(p.greedy for p in params)
        any_top_k = not all_greedy and any(p.top_k > 0 for p in params)
        any_top_p = not all_greedy and any(p.top_p < 1.0 for p in params)
        return cls(
            all_greedy=all_greedy,
            greedy=None if all_greedy else to_device([p.greedy for p in params], device, torch.bool),
            temperatures=None if all_greedy else to_device(
                [max(p.temperature, MIN_TEMPERATURE) for p in params], device, torch.float32),
            top_k=to_device([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params],
                            device, torch.long) if any_top_k else None,
            # inf, not 1: a float32 running sum can reach 1 before the last token
            top_p=to_device([p.top_p if p.top_p < 1.0 else float("inf") for p in params],
                            device, torch.float32) if any_top_p else None,
            generators=tuple(generators),
            num_logprobs=tuple(p.logprobs for p in params))


def filter_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logits [B, V] float32 -> temperature-scaled, top-k then top-p masked with -inf."""
    logits = logits / meta.temperatures.unsqueeze(1)
    if meta.top_k is None and meta.top_p is None:
        return logits
    sorted_logits, order = torch.sort(logits, dim=1, descending=True)  # [B, V] each
    if meta.top_k is not None:
        kth = sorted_logits.gather(1, (meta.top_k - 1).unsqueeze(1))  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))  # ties stay
    if meta.top_p is not None:
        probs = torch.softmax(sorted_logits, dim=1)
        before = probs.cumsum(dim=1) - probs  # mass strictly before each token
        drop = before >= meta.top_p.unsqueeze(1)  # keeps the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] in any float dtype -> each row's argmax [B] int64. On CUDA one Triton
    launch over the logits as they are (`brownout.kernels.greedy`), with no float32 copy."""
    if logits.is_cuda:
        from brownout.kernels import triton_module  # lazy: triton on CUDA only

        g = triton_module("greedy")
        if g is not None and g.ENABLED:
            return g.greedy_tokens(logits)  # torch's argmax where its kernel does not apply
    return logits.float().argmax(dim=1)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logits [B, V] float32 -> sampled tokens [B] int64."""
    greedy_tokens = logits.argmax(dim=1)
    if meta.all_greedy:
        return greedy_tokens
    probs = torch.softmax(filter_logits(logits, meta), dim=1)
    q = torch.empty_like(probs).exponential_()  # one launch for the rows without a seed
    for row, gen in enumerate(meta.generators):
        if gen is not None:  # seeded requests draw from their own stream
            q[row].exponential_(generator=gen)
    sampled = (probs / q).argmax(dim=1)
    return torch.where(meta.greedy, greedy_tokens, sampled)


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
