"""Calibration data for building united experts: token windows and per-layer MoE states.

States are captured one MoE layer at a time (memory holds one layer's inputs, never all
layers'), in one pass over the decoder stack: the hidden states of every calibration window
are carried from one decoder layer to the next, and each MoE layer records its input and
its router choices through the MoE module's `capture` list as it runs.
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


# share of the device memory free when the capture starts that the carried states of all
# windows may take on the device: the rest holds the layer's batch and the fits that follow
CARRY_DEVICE_SHARE = 0.25


class StackCapture:
    """The MoE layers' calibration states in one pass over the decoder stack.

    The windows run in batches of `batch_tokens` (whole windows, at least one), each batch
    as `forward_full` runs it (with a tau, brownout counts over the batch's tokens); every
    window's hidden states (the next decoder layer's input and residual stream) are carried
    from layer to layer, on `device` in the model's dtype where they take at most
    CARRY_DEVICE_SHARE of its free memory, else in host memory.
    `states(i)` runs the decoder layers up to MoE layer i at threshold `tau` (None: exact),
    then layer i with its `capture` list set. Without tau, that run's output is carried on;
    with a tau it is not: layer i runs again at tau when the next layer is asked for, so
    the united experts installed in layer i meanwhile shape what the later layers see.
    MoE layers are asked for in ascending order, each at most once; the cost is one pass
    over the stack (two runs of each MoE layer with a tau), not one pass per layer.
    """

    def __init__(self, model, windows: torch.Tensor, batch_tokens: int, device: torch.device,
                 tau: Optional[float] = None):
        self.model, self.device, self.tau = model, torch.device(device), tau
        self.decoder_index = list(model.spec.moe_layers)  # decoder layer of each MoE layer
        rows = max(1, batch_tokens // windows.shape[1])
        batches = [windows[s:s + rows] for s in range(0, windows.shape[0], rows)]
        dtype = model.embed_tokens.weight.dtype
        carried = 2 * windows.numel() * model.spec.hidden_size * dtype.itemsize  # x and residual
        self.carry_device = self.device
        if self.device.type == "cuda" and \
                carried > CARRY_DEVICE_SHARE * torch.cuda.mem_get_info(self.device)[0]:
            self.carry_device = torch.device("cpu")
        self.next_layer = 0  # the decoder layer the carried states enter
        # per batch: (x, residual), residual None before the first decoder layer
        self.carried: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = [
            (model.embed(b.to(self.device)).to(self.carry_device), None) for b in batches]

    def _run(self, layer: int, keep: bool) -> None:
        """Decoder layer `layer` over every batch at `tau`; keep: its output is carried on."""
        for j, (x, residual) in enumerate(self.carried):
            if residual is not None:
                residual = residual.to(self.device)
            out = self.model.run_layer(layer, x.to(self.device), residual, self.tau)
            if keep:
                self.carried[j] = (out[0].to(self.carry_device), out[1].to(self.carry_device))
            del out  # one batch's output in memory at a time
        if keep:
            self.next_layer = layer + 1

    def states(self, layer: int) -> LayerStates:
        """What MoE layer `layer` (its index among the MoE layers) sees on the windows."""
        index = self.decoder_index[layer]
        if index < self.next_layer:
            raise ValueError(f"StackCapture: MoE layer {layer} is behind the carried states "
                             f"(decoder layer {self.next_layer}); ask for layers in ascending order")
        while self.next_layer < index:
            self._run(self.next_layer, keep=True)
        moe = self.model.moe_layers()[layer]
        records: list[dict] = []
        moe.capture = records
        try:
            self._run(index, keep=self.tau is None)
        finally:
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
