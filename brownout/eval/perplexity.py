"""Perplexity at fixed brownout thresholds (SPEC 4: accuracy at fixed tau levels).

The text is cut into non-overlapping windows of `window` tokens; each window's tokens
2..L are scored from the tokens before them in the window. Windows are packed into
batches of `batch_tokens // window` windows, each run as one step, so the brownout keep
set is computed over a serving-size step (the engine's default step budget is 2048
tokens). Only full batches are scored, so every step has the same size.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from brownout.eval.scoring import run_step

log = logging.getLogger(__name__)


def tokenize_text(tokenizer, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Token ids [N] of a text; only a prefix is tokenized when `max_tokens` is set."""
    if max_tokens is not None:
        text = text[: max_tokens * 16]  # BPE: well over one byte per token
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def make_batches(ids: torch.Tensor, window: int, batch_tokens: int) -> list[torch.Tensor]:
    """Full batches [B, window] of non-overlapping windows; B = batch_tokens // window."""
    rows = max(1, batch_tokens // window)
    n_windows = ids.numel() // window
    n_batches = n_windows // rows
    if n_batches == 0:
        raise ValueError(f"text: {ids.numel()} tokens do not fill one batch of {rows} windows "
                         f"of {window} tokens; lower --window or --batch-tokens")
    usable = ids[: n_batches * rows * window]
    return list(usable.view(n_batches, rows, window))


def evaluate_perplexity(model, batches: Sequence[torch.Tensor], taus: Sequence[float],
                        device: torch.device, progress=None,
                        top_ks: Sequence[Optional[int]] = (None,)) -> list[dict]:
    """Per (k', tau): mean negative log-likelihood, perplexity, and slots touched per MoE
    layer. `top_ks`: routed experts kept per token (None: the model's k)."""
    return [_perplexity_at(model, batches, tau, top_k, device, progress)
            for top_k in top_ks for tau in taus]


def _perplexity_at(model, batches, tau: float, top_k: Optional[int], device, progress) -> dict:
    nll_sum, count, touched_sum = 0.0, 0, None
    for batch in batches:
        batch = batch.to(device)
        logits, touched = run_step(model, batch, tau, top_k=top_k)  # [B, L, V]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                              reduction="sum")
        nll_sum += float(nll)
        count += batch[:, 1:].numel()
        touched_sum = touched if touched_sum is None else [a + b for a, b in zip(touched_sum, touched)]
        if progress is not None:
            progress.update(1)
    mean_nll = nll_sum / count
    log.info("top-k %s, tau %.2f: perplexity %.3f", top_k, tau, math.exp(mean_nll))
    return {"tau": tau, "top_k": top_k, "nll": mean_nll, "perplexity": math.exp(mean_nll),
            "tokens_scored": count, "steps": len(batches),
            "mean_slots_touched": [t / len(batches) for t in (touched_sum or [])]}
