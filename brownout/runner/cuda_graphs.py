"""CUDA graphs for serving steps: decode-only steps by batch size, mixed steps by token count.

`GraphDispatcher` is the one place that knows which graphs exist and which one a step
replays: it maps a `StepDescriptor` (the step's token and sequence counts, block-table
width, whether it is a plain decode step, asks for prompt logprobs, routes by brownout)
to a `GraphKey`, or to None when the step runs eager. Capture walks the same keys.

Every input the captured forward reads lives in a persistent device buffer: token ids,
positions, cache slots, block tables, context lengths, query offsets, the padding mask and
the degradation rungs (brownout threshold `tau`, routed experts kept per token `top_k`).
A replay copies the step's values into those buffers (one
routine, `_fill`, for both kinds); nothing is recaptured when tau changes. The graph's
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

DECODE, MIXED = "decode", "mixed"


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
        self.dispatcher = GraphDispatcher(max_batch, max_blocks, with_brownout, max_step_tokens,
                                          block_size, across_ranks)
        dev = tau.device
        n_rows = max([max_batch] + self.dispatcher.token_sizes)
        n_seqs = max_batch + 1  # + the padding sequence of mixed steps
        self.input_ids = torch.zeros(n_rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n_rows, dtype=torch.long, device=dev)
        self.slots = torch.full((n_rows,), PAD_SLOT, dtype=torch.long, device=dev)
        self.valid = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        self.rows = torch.arange(n_rows, device=dev)
        self.block_tables = torch.full((n_seqs, max_blocks), PAD_BLOCK, dtype=torch.int32, device=dev)
        self.seq_lens = torch.full((n_seqs,), PAD_DECODE_SEQ_LEN, dtype=torch.int32, device=dev)
        self.decode_qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.mixed_qsl = torch.zeros(n_seqs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphKey, ForwardOutput] = {}  # each graph's static outputs

    def dispatch(self, step: StepDescriptor) -> Optional[GraphKey]:
        return self.dispatcher.dispatch(step)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.graphed:
            return
        pool = torch.cuda.graph_pool_handle()
        idle = _idle_step(self.tau.device)
        for key in self.dispatcher.keys():
            self._fill(key, *idle)
            self._forward(key)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._forward(key)
            self.graphs[key] = graph
        log.info("captured CUDA graphs: decode batch sizes %s, mixed-step token counts %s",
                 self.dispatcher.sizes, self.dispatcher.token_sizes)

    def run(self, key: GraphKey, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttnMeta) -> ForwardOutput:
        """Replay graph `key` (from `dispatch`) on a step of T tokens over B sequences:
        input_ids, positions [T]; meta as for an eager forward. Returns hidden [T, D] (a view
        of the graph's output buffer) and the expert slots touched ([M] int64 or None)."""
        self._fill(key, input_ids, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                   meta.query_start_loc)
        if self.graphed:
            self.graphs[key].replay()
            out = self.outputs[key]
        else:
            out = self._forward(key)
        return ForwardOutput(out.hidden[:input_ids.shape[0]], out.experts_touched)

    def _fill(self, key: GraphKey, input_ids, positions, slots, block_tables, seq_lens,
              query_start_loc) -> None:
        """Copy a step of T tokens over B sequences into the buffers of graph `key` (n rows):
        rows T..n-1 are padding, and so are the sequences after B."""
        T, B, n = input_ids.shape[0], seq_lens.shape[0], key.size
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        self.positions[T:n].zero_()  # padding rows: any position inside the rotary table
        self.slots[:T].copy_(slots)
        self.slots[T:n].fill_(PAD_SLOT)
        torch.lt(self.rows[:n], T, out=self.valid[:n])
        self.block_tables[:B, :block_tables.shape[1]].copy_(block_tables)
        self.seq_lens[:B].copy_(seq_lens)
        if key.kind == DECODE:  # n sequences: B real, the rest one padding token each
            self.block_tables[B:n].fill_(PAD_BLOCK)
            self.seq_lens[B:n].fill_(PAD_DECODE_SEQ_LEN)
        else:  # the padding rows form sequence B; later sequences have no query
            self.block_tables[B].fill_(PAD_BLOCK)
            self.seq_lens[B:].fill_(n - T)
            self.mixed_qsl[:B + 1].copy_(query_start_loc)
            self.mixed_qsl[B + 1:].fill_(n)

    def _forward(self, key: GraphKey) -> ForwardOutput:
        n = key.size
        if key.kind == DECODE:
            meta = AttnMeta(slot_mapping=self.slots[:n], block_tables=self.block_tables[:n],
                            seq_lens=self.seq_lens[:n], query_start_loc=self.decode_qsl[:n + 1],
                            max_query_len=1)
        else:
            meta = AttnMeta(slot_mapping=self.slots[:n], block_tables=self.block_tables,
                            seq_lens=self.seq_lens, query_start_loc=self.mixed_qsl, max_query_len=n)
        ctx = ForwardContext(attn=meta, kv_caches=self.kv_caches, tau=self.tau if key.routed else None,
                             top_k=self.top_k if key.routed else None,
                             valid=self.valid[:n], use_kernels=True)
        return self.model(self.input_ids[:n], self.positions[:n], ctx)


def _idle_step(device: torch.device) -> tuple[torch.Tensor, ...]:
    """A step with no token and no sequence: `_fill` makes every row of a graph padding."""
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    return (empty_long, empty_long, empty_long, torch.zeros(0, 0, dtype=torch.int32, device=device),
            torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device))
