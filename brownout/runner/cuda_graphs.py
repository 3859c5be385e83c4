"""CUDA graphs for serving steps: decode-only steps by batch size, mixed steps by token count.

`GraphDispatcher` is the one place that knows which graphs exist and which one a step
replays: it maps a `StepDescriptor` (the step's token and sequence counts, block-table
width, whether it is a plain decode step, asks for prompt logprobs, routes by brownout)
to a `GraphKey`, or to None when the step runs eager. Capture walks the same keys.

Every input the captured forward reads lives in a persistent device buffer: token ids,
positions, cache slots, block tables, context lengths, query offsets, the padding mask
(computed inside the graph from the slots) and the degradation rungs (brownout threshold
`tau`, routed experts kept per token `top_k`). A replay writes the step's values into
pinned host mirrors of those buffers and copies them over in two copies (one routine,
`_fill`, for both kinds); nothing is recaptured when tau changes. The graph's
outputs (hidden states and the expert slots each MoE layer touched) are static tensors
too, read after the replay.

* Decode graphs, one per bucketed batch size b: b sequences of one query token each.
  Padding rows have slot -1 (no KV write), context length 1 over block 0 (a harmless read)
  and are masked out of routing and expert work.
* Mixed graphs, one per bucketed token count n (steps with prefill work, chunked or not,
  with or without decodes beside them): room for `max_batch` sequences plus one padding
  sequence. A step of T tokens over B sequences fills rows 0..T-1 and sequences 0..B-1;
  the padding rows T..n-1 form sequence B, attending causally to themselves over block 0
  with slot -1 (they write nothing and every expert skips them); sequences past B have an
  empty query range, so attention does no work for them. Without these graphs such a step
  runs eager, and its ~60 kernel launches per layer cost more host time than the GPU work.

With united experts installed each bucket has two graphs: a dimmed one, which reads `tau`
and `top_k` from their device tensors (expert shedding, then brownout routing), and a plain
one, replayed when the controller asks for tau = 1 and the model's k (routing and shedding
would change nothing then), so full quality costs no routing time. Shedding adds no graph:
the dimmed graph at tau = 1 routes nothing and sheds to the k' in `top_k`. Without united
experts there is no dimmed graph and a step that sheds runs eager.

`graphed=False` keeps the same padded buffers and runs the forward on them eagerly instead
of replaying: the padding logic can then be checked without a GPU (kernels interpreted).
"""

from __future__ import annotations

import bisect
from itertools import accumulate
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from brownout.models.context import AttnMeta, ForwardContext, ForwardOutput
from brownout.types import SchedulerOutput

log = logging.getLogger(__name__)

# batch sizes of the decode graphs: powers of two to 16, then every 16 to 128 and every 32
# to 1024, so a decode step pads at most 15 rows up to 128 sequences and 31 beyond
DECODE_BATCH_BUCKETS = (1, 2, 4, 8) + tuple(range(16, 129, 16)) + tuple(range(160, 1025, 32))
# token counts of the mixed-step graphs: at most ~33% padding above 128 tokens
MIXED_TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048,
                       3072, 4096, 6144, 8192)
# cache slot of a padding row: the KV write skips it
PAD_SLOT = -1
# block a padding sequence reads: any allocated block will do, its values are never used
PAD_BLOCK = 0
# context length of a padding decode sequence: one token, so attention has a key to read
PAD_DECODE_SEQ_LEN = 1
# host staging mirrors of the graphs' inputs: one being written while the last step's copy runs
STAGING_BUFFERS = 2

DECODE, MIXED = "decode", "mixed"


@dataclass
class HostStep:
    """A step's inputs as host lists, before any device copy: what a graph replay stages in
    one pass and what the eager path turns into `AttnMeta`."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # cache slot of each token
    query_lens_list: list[int]
    seq_lens_list: list[int]  # context length of each sequence after this step
    block_tables_list: list[list[int]]

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)


@dataclass
class TokenPatch:
    """Input token ids already on the device: `values` go to rows `rows` of a step's token
    ids (None: rows 0..len(values)-1)."""

    rows: Optional[torch.Tensor]  # [n] int64
    values: torch.Tensor  # [n] int64

    def apply(self, input_ids: torch.Tensor) -> None:
        if self.rows is None:
            input_ids[:self.values.numel()].copy_(self.values)
        else:
            input_ids.index_copy_(0, self.rows, self.values)


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes of the decode graphs."""
    return [s for s in DECODE_BATCH_BUCKETS if s < max_batch] + [max_batch]


def token_bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts of the mixed-step graphs."""
    return [s for s in MIXED_TOKEN_BUCKETS if s < max_tokens] + [max_tokens]


@dataclass(frozen=True)
class StepDescriptor:
    """What decides whether and how a step replays a graph."""

    num_tokens: int  # T: query tokens of the step, all sequences together
    num_seqs: int  # B: sequences in the step
    table_width: int  # blocks in the longest block table
    uniform_decode: bool  # every sequence has one query token and samples it
    prompt_logprobs: bool  # some sequence asks for prompt logprobs
    routed: bool  # brownout routing asked for (tau < 1)
    shed: bool = False  # expert shedding asked for (k' < k)

    @classmethod
    def of(cls, sched: SchedulerOutput, routed: bool, shed: bool = False) -> "StepDescriptor":
        seqs = sched.seqs
        return cls(num_tokens=sum(len(s.token_ids) for s in seqs), num_seqs=len(seqs),
                   table_width=max(len(s.block_table) for s in seqs),
                   uniform_decode=all(len(s.token_ids) == 1 and s.sample for s in seqs),
                   prompt_logprobs=any(s.prompt_logprob_targets is not None for s in seqs),
                   routed=routed, shed=shed)


@dataclass(frozen=True)
class GraphKey:
    kind: str  # DECODE (`size` sequences of one token) or MIXED (`size` token rows)
    size: int  # the bucket
    routed: bool  # the dimmed variant: expert shedding and brownout routing


class GraphDispatcher:
    """The graphs a runner captures and the one each step replays.

    max_batch: largest decode batch and most sequences of a mixed step; max_blocks:
    block-table width; max_step_tokens: largest mixed step (0: decode graphs only);
    across_ranks: tensor parallel, where steps with prefill work run eager (their graphs
    are not checked on several GPUs), so no mixed graph is captured."""

    def __init__(self, max_batch: int, max_blocks: int, with_brownout: bool, max_step_tokens: int = 0,
                 block_size: int = 16, across_ranks: bool = False):
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.with_brownout = with_brownout
        self.sizes = bucket_sizes(max_batch)
        # the padding sequence of a mixed step reads positions < n over its block table
        mixed_tokens = 0 if across_ranks else min(max_step_tokens, max_blocks * block_size)
        self.token_sizes = token_bucket_sizes(mixed_tokens) if mixed_tokens > 0 else []

    def keys(self) -> list[GraphKey]:
        """Every graph to capture, largest first so smaller graphs reuse its memory."""
        variants = (False, True) if self.with_brownout else (False,)
        plan = [(MIXED, n) for n in reversed(self.token_sizes)] + [(DECODE, b) for b in reversed(self.sizes)]
        return [GraphKey(kind, n, routed) for kind, n in plan for routed in variants]

    def dispatch(self, step: StepDescriptor) -> Optional[GraphKey]:
        """The graph `step` replays, or None: run it eager."""
        # prompt logprobs read every row's hidden state when the step is collected: eager
        # rows belong to the step alone, a graph's output buffer to its next replay too
        if step.prompt_logprobs:
            return None
        if step.num_seqs > self.max_batch or step.table_width > self.max_blocks:
            return None
        if step.shed and not self.with_brownout:
            return None  # shedding lives in the dimmed graphs only
        routed = (step.routed or step.shed) and self.with_brownout
        if step.uniform_decode:
            return GraphKey(DECODE, _bucket(self.sizes, step.num_seqs), routed)
        if self.token_sizes and step.num_tokens <= self.token_sizes[-1]:
            return GraphKey(MIXED, _bucket(self.token_sizes, step.num_tokens), routed)
        return None


def _bucket(sizes: list[int], n: int) -> int:
    """The smallest of the ascending `sizes` that holds n."""
    return sizes[bisect.bisect_left(sizes, n)]


class StepGraphs:
    def __init__(self, model, kv_caches, tau: torch.Tensor, max_batch: int, max_blocks: int,
                 with_brownout: bool, max_step_tokens: int = 0, block_size: int = 16,
                 graphed: bool = True, across_ranks: bool = False,
                 top_k: Optional[torch.Tensor] = None):
        """Buffers for the graphs `GraphDispatcher` plans (same arguments); `capture` records them.
        `top_k`: 0-d int32 device tensor of the routed experts kept per token, read by the
        dimmed graphs (None: they never shed)."""
        self.model = model
        self.kv_caches = kv_caches
        self.tau = tau
        self.top_k = top_k
        self.graphed = graphed
        self.across_ranks = across_ranks
        self.dispatcher = GraphDispatcher(max_batch, max_blocks, with_brownout, max_step_tokens,
                                          block_size, across_ranks)
        dev = tau.device
        n_rows = max([max_batch] + self.dispatcher.token_sizes)
        n_seqs = max_batch + 1  # + the padding sequence of mixed steps
        self.n_rows, self.n_seqs, self.max_blocks = n_rows, n_seqs, max_blocks
        # The inputs live in two device tensors, so a step reaches them in two copies from
        # pinned host mirrors: token ids, positions and slots (int64), then context lengths,
        # mixed-step query offsets and block tables (int32), block tables last so that a step
        # copies only the prefix holding its own sequences' rows.
        self._longs = torch.zeros(3, n_rows, dtype=torch.long, device=dev)
        self.input_ids, self.positions, self.slots = self._longs[0], self._longs[1], self._longs[2]
        self.slots.fill_(PAD_SLOT)
        self._ints = torch.zeros(2 * n_seqs + 1 + n_seqs * max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = self._ints[:n_seqs]
        self.mixed_qsl = self._ints[n_seqs:2 * n_seqs + 1]
        self.block_tables = self._ints[2 * n_seqs + 1:].view(n_seqs, max_blocks)
        self.seq_lens.fill_(PAD_DECODE_SEQ_LEN)
        self.valid = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        self.decode_qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        # host mirrors, two of each: a step writes one while the copy from the other (the
        # previous step's) may still be in flight; an event says when a mirror is free again
        pin = dev.type == "cuda"
        self._host = [(torch.zeros(self._longs.shape, dtype=torch.long, pin_memory=pin),
                       torch.zeros(self._ints.shape, dtype=torch.int32, pin_memory=pin))
                      for _ in range(STAGING_BUFFERS)]
        self._host_free: list[Optional[torch.cuda.Event]] = [None] * STAGING_BUFFERS
        self._turn = 0
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphKey, ForwardOutput] = {}  # each graph's static outputs

    def dispatch(self, step: StepDescriptor) -> Optional[GraphKey]:
        return self.dispatcher.dispatch(step)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.graphed:
            return
        pool = torch.cuda.graph_pool_handle()
        idle = HostStep([], [], [], [], [], [])  # no token, no sequence: every row is padding
        for key in self.dispatcher.keys():
            self._fill(key, idle)
            self._forward(key)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._forward(key)
            self.graphs[key] = graph
        log.info("captured CUDA graphs: decode batch sizes %s, mixed-step token counts %s",
                 self.dispatcher.sizes, self.dispatcher.token_sizes)

    def run(self, key: GraphKey, step: HostStep, patch: Optional["TokenPatch"] = None) -> ForwardOutput:
        """Replay graph `key` (from `dispatch`) on a step of T tokens over B sequences.
        Returns hidden [T, D] (a view of the graph's output buffer) and the expert slots
        touched ([M] int64 or None). `patch`: token ids on the device that replace some of
        the step's host ones (a step planned ahead reads the previous step's samples)."""
        self._fill(key, step)
        if patch is not None:
            patch.apply(self.input_ids)
        if self.graphed:
            self.graphs[key].replay()
            out = self.outputs[key]
        else:
            out = self._forward(key)
        return ForwardOutput(out.hidden[:len(step.token_ids)], out.experts_touched)

    def _fill(self, key: GraphKey, step: HostStep) -> None:
        """Write a step of T tokens over B sequences into the inputs of graph `key` (n rows):
        rows T..n-1 are padding, and so are the sequences after B. The values are laid out in
        a pinned host mirror and reach the device in two copies, whatever the step's size:
        each device operation here would cost the host more than the copy does."""
        turn = self._turn = (self._turn + 1) % STAGING_BUFFERS
        if self._host_free[turn] is not None:
            self._host_free[turn].synchronize()  # that mirror's last copy has left it
        longs_h, ints_h = self._host[turn]
        longs, ints = longs_h.numpy(), ints_h.numpy()
        T, B, n, ns = len(step.token_ids), len(step.seq_lens_list), key.size, self.n_seqs
        longs[0, :T] = step.token_ids
        longs[1, :T] = step.positions
        longs[1, T:n] = 0  # padding rows: any position inside the rotary table
        longs[2, :T] = step.slots
        longs[2, T:n] = PAD_SLOT
        seq_lens, qsl = ints[:ns], ints[ns:2 * ns + 1]
        tables = ints[2 * ns + 1:].reshape(ns, self.max_blocks)
        # columns past a table's length keep older steps' block ids: valid ids, and attention
        # reads no position at or past the sequence's length
        for b, table in enumerate(step.block_tables_list):
            tables[b, :len(table)] = table
        seq_lens[:B] = step.seq_lens_list
        if key.kind == DECODE:  # n sequences: B real, the rest one padding token each
            tables[B:n] = PAD_BLOCK
            seq_lens[B:n] = PAD_DECODE_SEQ_LEN
            rows = n
        else:  # the padding rows form sequence B; later sequences have no query
            tables[B] = PAD_BLOCK
            seq_lens[B:] = n - T
            qsl[0] = 0
            qsl[1:B + 1] = list(accumulate(step.query_lens_list))
            qsl[B + 1:] = n
            rows = B + 1
        self._longs.copy_(longs_h, non_blocking=True)
        used = 2 * ns + 1 + rows * self.max_blocks
        self._ints[:used].copy_(ints_h[:used], non_blocking=True)
        if self._longs.is_cuda:
            event = self._host_free[turn] or torch.cuda.Event()
            event.record()
            self._host_free[turn] = event

    def _forward(self, key: GraphKey) -> ForwardOutput:
        n = key.size
        # padding rows are the ones without a cache slot; computed inside the graph, where
        # it costs no host launch
        torch.ne(self.slots[:n], PAD_SLOT, out=self.valid[:n])
        if key.kind == DECODE:
            meta = AttnMeta(slot_mapping=self.slots[:n], block_tables=self.block_tables[:n],
                            seq_lens=self.seq_lens[:n], query_start_loc=self.decode_qsl[:n + 1],
                            max_query_len=1)
        else:
            meta = AttnMeta(slot_mapping=self.slots[:n], block_tables=self.block_tables,
                            seq_lens=self.seq_lens, query_start_loc=self.mixed_qsl, max_query_len=n)
        ctx = ForwardContext(attn=meta, kv_caches=self.kv_caches, tau=self.tau if key.routed else None,
                             top_k=self.top_k if key.routed else None,
                             valid=self.valid[:n], use_kernels=True,
                             defer_moe_sum=not self.across_ranks)
        return self.model(self.input_ids[:n], self.positions[:n], ctx)
