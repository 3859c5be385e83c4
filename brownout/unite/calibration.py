"""Calibration data for building united experts: token windows and per-layer MoE states.

States are captured one MoE layer at a time (memory holds one layer's inputs, never all
layers'): each pass runs the model only up to that layer and stops, through the MoE
module's `capture` list, which records the layer's input and its router choices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from brownout.unite.sources import SourceSpec, source_record, source_text

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_MAX = 16  # a slice of 16 characters per wanted token holds enough BPE tokens


@dataclass
class LayerStates:
    """What one MoE layer saw on the calibration tokens (all on the CPU)."""

    x: torch.Tensor  # [N, D] MoE inputs
    topk_ids: torch.Tensor  # [N, k] routed experts
    topk_weights: torch.Tensor  # [N, k] float32 routing weights
    source: Optional[torch.Tensor] = None  # [N] calibration source of each token

    def counts(self, num_experts: int) -> torch.Tensor:
        """Assignments per expert -> [E] int64."""
        return torch.bincount(self.topk_ids.reshape(-1).long(), minlength=num_experts)


@dataclass
class CalibrationMix:
    """Token windows drawn from several sources, balanced by source, and what was drawn."""

    windows: torch.Tensor  # [B, seq_len] token ids
    source_of: torch.Tensor  # [B] index into `sources` of each window
    sources: list[dict]  # per source: path, sha256, kind, part, weight, tokens (manifest entries)

    def token_sources(self) -> torch.Tensor:
        """Source index of every calibration token, in window order -> [B * seq_len]."""
        return self.source_of.repeat_interleave(self.windows.shape[1])


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _evenly_spaced(count: int, length: int, seq_len: int) -> list[int]:
    """`count` window starts spread over a stream of `length` tokens (no overlap)."""
    if count == 1:
        return [0]
    return [round(i * (length - seq_len) / (count - 1)) for i in range(count)]


def source_windows(tokenizer, text: str, count: int, seq_len: int) -> torch.Tensor:
    """Up to `count` windows [n, seq_len] spread evenly over the whole text.

    A text too short for `count` windows gives all the windows it has. A long text is
    not tokenized whole: each window comes from a slice starting at a line boundary.
    """
    span = seq_len * CHARS_PER_TOKEN_MAX
    rows: list[list[int]] = []
    if len(text) <= count * span:
        ids = _tokenize(tokenizer, text)
        have = len(ids) // seq_len
        starts = range(0, have * seq_len, seq_len) if have <= count \
            else _evenly_spaced(count, len(ids), seq_len)
        rows = [ids[s:s + seq_len] for s in starts]
    else:
        for i in range(count):
            offset = i * (len(text) - span) // max(1, count - 1)
            offset = text.find("\n", offset) + 1 if offset > 0 else 0
            ids = _tokenize(tokenizer, text[offset:offset + span])[:seq_len]
            if len(ids) == seq_len:
                rows.append(ids)
    return torch.tensor(rows, dtype=torch.long).view(len(rows), seq_len)


def calibration_mix(tokenizer, specs: Sequence[SourceSpec], total_tokens: int, seq_len: int,
                    part: str = "fit") -> CalibrationMix:
    """Windows from every source, each source's share of `total_tokens` set by its weight
    (equal weights: equal tokens per source), taken from the source's `part`."""
    if not specs:
        raise ValueError("calibration: no sources")
    weight_sum = sum(s.weight for s in specs)
    rows, owner, records = [], [], []
    for index, spec in enumerate(specs):
        share = total_tokens * spec.weight / weight_sum
        count = max(1, int(share // seq_len))
        text = source_text(spec.path, part, tokenizer)
        windows = source_windows(tokenizer, text, count, seq_len)
        if windows.shape[0] == 0:
            raise ValueError(f"calibration: {spec.path} ({part}) has fewer than {seq_len} tokens")
        if windows.shape[0] < count:
            log.warning("calibration: %s gives %d of its %d windows", spec.path, windows.shape[0], count)
        rows.append(windows)
        owner.append(torch.full((windows.shape[0],), index, dtype=torch.long))
        records.append(source_record(spec.path, part, windows.numel(), weight=spec.weight / weight_sum))
    return CalibrationMix(torch.cat(rows), torch.cat(owner), records)


def calibration_windows(tokenizer, files: Sequence[Path], max_tokens: int, seq_len: int) -> torch.Tensor:
    """Windows [B, seq_len] of equal shares of every file, over the whole of each file."""
    return calibration_mix(tokenizer, [SourceSpec(Path(f)) for f in files], max_tokens, seq_len,
                           part="all").windows


class _StopAfterLayer(Exception):
    """Raised by a hook once the wanted layer has been captured: later layers are skipped."""


def capture_layer(model, layer: int, windows: torch.Tensor, batch_tokens: int,
                  device: torch.device, tau: Optional[float] = None) -> LayerStates:
    """Run the calibration windows through the model up to MoE layer `layer` (at brownout
    threshold `tau` in the layers before it that have united experts; None: exact)."""
    moe = model.moe_layers()[layer]
    records: list[dict] = []

    def stop(module, inputs, output):
        raise _StopAfterLayer

    moe.capture = records
    handle = moe.register_forward_hook(stop)
    rows = max(1, batch_tokens // windows.shape[1])
    try:
        for start in range(0, windows.shape[0], rows):
            try:
                model.forward_full(windows[start:start + rows].to(device), tau)
            except _StopAfterLayer:
                pass
    finally:
        handle.remove()
        moe.capture = None
    return LayerStates(x=torch.cat([r["x"] for r in records]).float(),
                       topk_ids=torch.cat([r["topk_ids"] for r in records]),
                       topk_weights=torch.cat([r["topk_weights"] for r in records]).float())


def group_targets(states: LayerStates, members: Sequence[int], num_experts: int, expert_fn,
                  max_tokens: Optional[int], device: torch.device, chunk: int = 4096):
    """Tokens routed to a group and the routing-weighted mixture of its members' outputs.

    Returns x [n, D], target [n, D] = sum over the token's assignments to members of
    weight * expert(x), w [n] = the summed weight (what a united expert gets under
    brownout routing once the members' assignments are merged) and the source of each
    token [n] (None when the states carry no sources).
    """
    member_mask = torch.zeros(num_experts, dtype=torch.bool)
    member_mask[list(members)] = True
    in_group = member_mask[states.topk_ids.long()]  # [N, k]
    rows = in_group.any(dim=1).nonzero().squeeze(1)  # [n]
    if max_tokens is not None and rows.numel() > max_tokens:
        rows = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))[:max_tokens]]
        rows = rows.sort().values
    x = states.x[rows].to(device)  # [n, D]
    ids = states.topk_ids[rows].long().to(device)  # [n, k]
    w = (states.topk_weights[rows].to(device) * in_group[rows].to(device))  # [n, k]
    target = torch.zeros_like(x)
    for e in members:
        sel = (ids == e) & (w > 0)  # [n, k]
        tok = sel.any(dim=1).nonzero().squeeze(1)
        for s in range(0, tok.numel(), chunk):
            t = tok[s:s + chunk]
            target[t] += (w[t] * sel[t]).sum(dim=1, keepdim=True) * expert_fn(e, x[t])
    source = None if states.source is None else states.source[rows].to(device)
    return x, target, w.sum(dim=1), source
