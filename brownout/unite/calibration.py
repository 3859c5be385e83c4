"""Calibration data for building united experts: token windows and per-layer MoE states.

States are captured one MoE layer at a time (memory holds one layer's inputs, never all
layers'): each pass runs the model only up to that layer and stops, through the MoE
module's `capture` list, which records the layer's input and its router choices.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass
class LayerStates:
    """What one MoE layer saw on the calibration tokens (all on the CPU)."""

    x: torch.Tensor  # [N, D] MoE inputs
    topk_ids: torch.Tensor  # [N, k] routed experts
    topk_weights: torch.Tensor  # [N, k] float32 routing weights

    def counts(self, num_experts: int) -> torch.Tensor:
        """Assignments per expert -> [E] int64."""
        return torch.bincount(self.topk_ids.reshape(-1).long(), minlength=num_experts)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibration_windows(tokenizer, files: Sequence[Path], max_tokens: int, seq_len: int) -> torch.Tensor:
    """Token windows [B, seq_len] taken evenly from each file (first tokens of each)."""
    per_file = max(seq_len, max_tokens // max(1, len(files)))
    rows = []
    for path in files:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        # tokenize a prefix large enough for the budget (bytes >= tokens for BPE)
        ids = tokenizer(text[: per_file * 16], add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids[:per_file]
        n = len(ids) // seq_len
        if n == 0:
            raise ValueError(f"calibration: {path} has fewer than {seq_len} tokens")
        rows.append(torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len))
    return torch.cat(rows)


class _StopAfterLayer(Exception):
    """Raised by a hook once the wanted layer has been captured: later layers are skipped."""


def capture_layer(model, layer: int, windows: torch.Tensor, batch_tokens: int,
                  device: torch.device) -> LayerStates:
    """Run the calibration windows through the model up to MoE layer `layer`."""
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
                model.forward_full(windows[start:start + rows].to(device))
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
    weight * expert(x), and w [n] = the summed weight (what a united expert gets under
    brownout routing once the members' assignments are merged).
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
    return x, target, w.sum(dim=1)
