"""CUDA graphs for decode-only steps, one per bucketed batch size.

Every input the captured forward reads lives in a persistent device buffer: token ids,
positions, cache slots, block tables, context lengths, the padding mask and the brownout
threshold `tau`. A replay copies the step's values into those buffers; nothing is
recaptured when tau changes. Padding rows have slot -1 (no KV write), context length 1 over
block 0 (a harmless read) and are masked out of brownout counts.

With united experts installed each bucket has two graphs: one with brownout routing, which
reads `tau` from its device tensor, and one without, replayed when the controller asks for
tau = 1 (routing would change nothing then), so full quality costs no routing time.
"""

from __future__ import annotations

import bisect
import logging
from typing import Optional

import torch

from brownout.models.context import AttnMeta, ForwardContext

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 1025, 32))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches, tau: torch.Tensor, max_batch: int, max_blocks: int,
                 with_brownout: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.tau = tau
        self.with_brownout = with_brownout
        dev = tau.device
        self.max_batch = max_batch
        self.sizes = bucket_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.valid = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        # (batch bucket, routed) -> graph and its output buffers
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.hidden: dict[tuple[int, bool], torch.Tensor] = {}
        self.touched: dict[tuple[int, bool], Optional[torch.Tensor]] = {}

    def _ctx(self, b: int, routed: bool) -> ForwardContext:
        meta = AttnMeta(slot_mapping=self.slots[:b], block_tables=self.block_tables[:b],
                        seq_lens=self.seq_lens[:b], query_start_loc=self.query_start_loc[:b + 1],
                        max_query_len=1)
        return ForwardContext(attn=meta, kv_caches=self.kv_caches, tau=self.tau if routed else None,
                              valid=self.valid[:b], touched=[], use_kernels=True)

    def _forward(self, b: int, routed: bool):
        ctx = self._ctx(b, routed)
        hidden = self.model(self.input_ids[:b], self.positions[:b], ctx)
        touched = torch.stack(ctx.touched) if ctx.touched else None
        return hidden, touched

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        variants = (False, True) if self.with_brownout else (False,)
        for b in reversed(self.sizes):  # largest first so smaller graphs reuse its memory
            for routed in variants:
                key = (b, routed)
                self._forward(b, routed)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden, touched = self._forward(b, routed)
                self.graphs[key], self.hidden[key], self.touched[key] = graph, hidden, touched
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def fits(self, batch: int, width: int) -> bool:
        return batch <= self.max_batch and width <= self.block_tables.shape[1]

    def run(self, input_ids, positions, slots, block_tables, seq_lens, routed: bool):
        """Replay for a decode batch; returns (hidden [B, D], touched [L] or None)."""
        B = input_ids.shape[0]
        b = self.sizes[bisect.bisect_left(self.sizes, B)]
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slots[:B].copy_(slots)
        self.slots[B:b].fill_(-1)
        self.block_tables[:B, :block_tables.shape[1]].copy_(block_tables)
        self.seq_lens[:B].copy_(seq_lens)
        self.seq_lens[B:b].fill_(1)
        self.block_tables[B:b].zero_()
        self.valid[:b] = torch.arange(b, device=self.valid.device) < B
        key = (b, routed and self.with_brownout)
        self.graphs[key].replay()
        return self.hidden[key][:B], self.touched[key]
