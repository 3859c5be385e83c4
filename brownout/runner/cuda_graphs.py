"""CUDA graphs for serving steps: decode-only steps by batch size, mixed steps by token count.

Every input the captured forward reads lives in a persistent device buffer: token ids,
positions, cache slots, block tables, context lengths, query offsets, the padding mask and
the brownout threshold `tau`. A replay copies the step's values into those buffers; nothing
is recaptured when tau changes.

* Decode graphs, one per bucketed batch size b: b sequences of one query token each.
  Padding rows have slot -1 (no KV write), context length 1 over block 0 (a harmless read)
  and are masked out of routing and expert work.
* Mixed graphs, one per bucketed token count n (steps with prefill work, chunked or not,
  with or without decodes beside them): room for `max_seqs` sequences plus one padding
  sequence. A step of T tokens over B sequences fills rows 0..T-1 and sequences 0..B-1;
  the padding rows T..n-1 form sequence B, attending causally to themselves over block 0
  with slot -1 (they write nothing and every expert skips them); sequences past B have an
  empty query range, so attention does no work for them. Without these graphs such a step
  runs eager, and its ~60 kernel launches per layer cost more host time than the GPU work.

With united experts installed each bucket has two graphs: one with brownout routing, which
reads `tau` from its device tensor, and one without, replayed when the controller asks for
tau = 1 (routing would change nothing then), so full quality costs no routing time.

`graphed=False` keeps the same padded buffers and runs the forward on them eagerly instead
of replaying: the padding logic can then be checked without a GPU (kernels interpreted).
"""

from __future__ import annotations

import bisect
import logging
from typing import Optional

import torch

from brownout.models.context import AttnMeta, ForwardContext

log = logging.getLogger(__name__)

MIXED_TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048,
                       3072, 4096, 6144, 8192)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 1025, 32))
    return [s for s in sizes if s < max_batch] + [max_batch]


def token_bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts of the mixed-step graphs: at most ~33% padding above 128 tokens."""
    return [s for s in MIXED_TOKEN_BUCKETS if s < max_tokens] + [max_tokens]


class StepGraphs:
    def __init__(self, model, kv_caches, tau: torch.Tensor, max_batch: int, max_blocks: int,
                 with_brownout: bool, max_step_tokens: int = 0, block_size: int = 16,
                 graphed: bool = True):
        """max_batch: largest decode batch and most sequences of a mixed step; max_blocks:
        block-table width; max_step_tokens: largest mixed step (0: decode graphs only)."""
        self.model = model
        self.kv_caches = kv_caches
        self.tau = tau
        self.with_brownout = with_brownout
        self.graphed = graphed
        dev = tau.device
        self.max_batch = max_batch
        self.sizes = bucket_sizes(max_batch)
        # the padding sequence of a mixed step reads positions < n over its block table
        max_step_tokens = min(max_step_tokens, max_blocks * block_size)
        self.token_sizes = token_bucket_sizes(max_step_tokens) if max_step_tokens > 0 else []
        n_rows = max([max_batch] + self.token_sizes)
        n_seqs = max_batch + 1  # + the padding sequence of mixed steps
        self.input_ids = torch.zeros(n_rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n_rows, dtype=torch.long, device=dev)
        self.slots = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        self.rows = torch.arange(n_rows, device=dev)
        self.block_tables = torch.zeros(n_seqs, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n_seqs, dtype=torch.int32, device=dev)
        self.decode_qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.mixed_qsl = torch.zeros(n_seqs + 1, dtype=torch.int32, device=dev)
        # (kind, bucket, routed) -> graph and its output buffers; kind "decode" or "mixed"
        self.graphs: dict[tuple[str, int, bool], torch.cuda.CUDAGraph] = {}
        self.hidden: dict[tuple[str, int, bool], torch.Tensor] = {}
        self.touched: dict[tuple[str, int, bool], Optional[torch.Tensor]] = {}

    # ------------------------------------------------------------------ contexts

    def _ctx(self, kind: str, n: int, routed: bool) -> ForwardContext:
        if kind == "decode":
            meta = AttnMeta(slot_mapping=self.slots[:n], block_tables=self.block_tables[:n],
                            seq_lens=self.seq_lens[:n], query_start_loc=self.decode_qsl[:n + 1],
                            max_query_len=1)
        else:
            meta = AttnMeta(slot_mapping=self.slots[:n], block_tables=self.block_tables,
                            seq_lens=self.seq_lens, query_start_loc=self.mixed_qsl,
                            max_query_len=n)
        return ForwardContext(attn=meta, kv_caches=self.kv_caches, tau=self.tau if routed else None,
                              valid=self.valid[:n], touched=[], use_kernels=True)

    def _forward(self, kind: str, n: int, routed: bool):
        ctx = self._ctx(kind, n, routed)
        hidden = self.model(self.input_ids[:n], self.positions[:n], ctx)
        touched = torch.stack(ctx.touched) if ctx.touched else None
        return hidden, touched

    def _fill_idle(self, kind: str, n: int) -> None:
        """Buffers of a step with no real token (capture): all rows padding."""
        self.slots[:n].fill_(-1)
        self.positions[:n].zero_()
        self.valid[:n].fill_(False)
        self.block_tables.zero_()
        if kind == "decode":
            self.seq_lens[:n].fill_(1)
        else:
            self.seq_lens.fill_(0)
            self.seq_lens[0] = n  # sequence 0 is the padding sequence of n rows
            self.mixed_qsl.fill_(n)
            self.mixed_qsl[0] = 0

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.graphed:
            return
        pool = torch.cuda.graph_pool_handle()
        variants = (False, True) if self.with_brownout else (False,)
        # largest first so smaller graphs reuse its memory
        plan = [("mixed", n) for n in reversed(self.token_sizes)] + \
               [("decode", b) for b in reversed(self.sizes)]
        for kind, n in plan:
            for routed in variants:
                key = (kind, n, routed)
                self._fill_idle(kind, n)
                self._forward(kind, n, routed)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden, touched = self._forward(kind, n, routed)
                self.graphs[key], self.hidden[key], self.touched[key] = graph, hidden, touched
        log.info("captured CUDA graphs: decode batch sizes %s, mixed-step token counts %s",
                 self.sizes, self.token_sizes)

    # ------------------------------------------------------------------ replay

    def fits(self, batch: int, width: int) -> bool:
        """A decode batch of `batch` sequences with block tables `width` wide has a graph."""
        return batch <= self.max_batch and width <= self.block_tables.shape[1]

    def fits_mixed(self, tokens: int, batch: int, width: int) -> bool:
        return bool(self.token_sizes) and tokens <= self.token_sizes[-1] and \
            batch <= self.max_batch and width <= self.block_tables.shape[1]

    def _replay(self, key, T: int):
        if self.graphed:
            self.graphs[key].replay()
            return self.hidden[key][:T], self.touched[key]
        hidden, touched = self._forward(*key)
        return hidden[:T], touched

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
        torch.lt(self.rows[:b], B, out=self.valid[:b])
        return self._replay(("decode", b, routed and self.with_brownout), B)

    def run_mixed(self, input_ids, positions, slots, block_tables, seq_lens, query_start_loc,
                  routed: bool):
        """Replay for any step of T tokens over B sequences (query_start_loc [B+1]);
        returns (hidden [T, D], touched [L] or None)."""
        T, B = input_ids.shape[0], seq_lens.shape[0]
        n = self.token_sizes[bisect.bisect_left(self.token_sizes, T)]
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        self.positions[T:n].zero_()  # padding rows: any position inside the rotary table
        self.slots[:T].copy_(slots)
        self.slots[T:n].fill_(-1)
        self.block_tables[:B, :block_tables.shape[1]].copy_(block_tables)
        self.block_tables[B].zero_()
        self.seq_lens[:B].copy_(seq_lens)
        self.seq_lens[B:].fill_(n - T)  # the padding sequence B; later ones have no query
        self.mixed_qsl[:B + 1].copy_(query_start_loc)
        self.mixed_qsl[B + 1:].fill_(n)
        torch.lt(self.rows[:n], T, out=self.valid[:n])
        return self._replay(("mixed", n, routed and self.with_brownout), T)
