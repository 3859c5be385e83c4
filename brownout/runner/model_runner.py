"""Turns one `SchedulerOutput` into tensors, runs the model and samples.

Owns the paged KV cache tensors, the degradation rungs (the brownout threshold tau and the
routed experts kept per token k': device tensors the MoE layers read, so CUDA-graph replays
need no recapture) and the per-request sampling generators.
Each step is described once (`StepDescriptor`); the graphs' dispatcher says whether it
replays a CUDA graph or runs eager, and either way the model's forward returns the hidden
states with the expert slots each MoE layer touched. Sampling parameters become device
tensors once per step (`SamplingMetadata`).
Under tensor parallelism every rank runs `forward` on the same step (its KV cache holds only
its kv heads, and all ranks agree on the number of blocks); only rank 0 samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

import torch

from brownout.config import CacheConfig
from brownout.models.context import AttnMeta, ForwardContext, ForwardOutput
from brownout.runner.cuda_graphs import PAD_BLOCK, HostStep, StepDescriptor, StepGraphs, TokenPatch
from brownout.runner.loader import LoadedModel
from brownout.runner.sampler import SamplingMetadata, greedy, sample, to_device, token_logprobs
from brownout.types import Logprob, Rungs, RunnerOutput, SamplingParams, ScheduledSeq, SchedulerOutput

log = logging.getLogger(__name__)

# GPU memory kept free beside the KV cache for activations, logits and CUDA graphs
ACTIVATION_RESERVE_BYTES = 2 * 1024**3
# largest decode batch with a CUDA graph (larger ones run eager): every bucket costs
# capture time and graph memory
MAX_GRAPH_BATCH = 512
# prefill sizes run before serving: Triton picks tiles by token count, and each size
# compiles the kernels of its tiles (the largest step is added to these)
WARM_UP_TOKENS = (1, 8, 32, 64, 128, 256, 512, 1024)
# tau 1 takes the plain expert path, any tau < 1 the routed one: one of each compiles both
WARM_UP_TAUS = (1.0, 0.5)
# fewest routed experts a token keeps under expert shedding: one, or the token has no expert
MIN_TOP_K = 1


def kv_block_bytes(loaded: LoadedModel, block_size: int) -> int:
    s = loaded.spec  # kv heads of this rank only
    return 2 * s.num_layers * block_size * loaded.model.num_local_kv_heads * s.head_dim * loaded.dtype.itemsize


def plan_num_blocks(loaded: LoadedModel, cache: CacheConfig) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_block_bytes(loaded, cache.block_size)
    if loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        budget = int(total * cache.gpu_memory_utilization) - (total - free)
        budget -= ACTIVATION_RESERVE_BYTES
    else:
        budget = cache.cpu_kv_bytes
    n = budget // per_block
    if n < 1:
        raise ValueError(f"no room for the KV cache: budget {budget} bytes, one block {per_block} bytes; "
                         "raise gpu_memory_utilization / cpu_kv_bytes")
    return int(n)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache: CacheConfig, max_batch: int = 64,
                 max_model_len: Optional[int] = None, enforce_eager: bool = False,
                 max_step_tokens: int = 2048):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = cache.block_size
        # the scheduler on rank 0 hands out block ids that must exist on every rank
        self.num_blocks = loaded.parallel.min_over_ranks(plan_num_blocks(loaded, cache))
        s = loaded.spec
        shape = (self.num_blocks, cache.block_size, self.model.num_local_kv_heads, s.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=loaded.dtype, device=self.device),
                           torch.zeros(shape, dtype=loaded.dtype, device=self.device))
                          for _ in range(s.num_layers)]
        self.use_kernels = self.device.type == "cuda" and _kernels_available()
        self.tau = torch.ones((), dtype=torch.float32, device=self.device)
        self.model_top_k = loaded.spec.top_k
        self.top_k = torch.full((), self.model_top_k, dtype=torch.int32, device=self.device)
        self._generators: dict[str, Optional[torch.Generator]] = {}
        self.graphs: Optional[StepGraphs] = None
        if self.use_kernels and not enforce_eager:
            max_len = max_model_len or s.max_position_embeddings
            self.graphs = StepGraphs(self.model, self.kv_caches, self.tau, min(max_batch, MAX_GRAPH_BATCH),
                                     -(-max_len // cache.block_size), self.brownout_ready,
                                     max_step_tokens=max_step_tokens, block_size=cache.block_size,
                                     across_ranks=loaded.parallel.active, top_k=self.top_k)
            self.graphs.capture()
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 self.num_blocks * kv_block_bytes(loaded, self.block_size) / 2**20)

    def warm_up(self, max_tokens: int) -> None:
        """Run prefill-sized steps once before serving so the Triton kernels compile now
        (each token-count bucket has its own tiles) and not inside the first requests,
        where compilation would show up as seconds of time to first token. The KV blocks
        written here belong to no request yet."""
        if not self.use_kernels or self.loaded.parallel.active:
            return
        capacity = self.num_blocks * self.block_size
        sizes = sorted({n for n in WARM_UP_TOKENS + (max_tokens,) if n <= min(max_tokens, capacity)})
        taus = WARM_UP_TAUS if self.brownout_ready else (1.0,)  # without united experts, tau is 1
        params = SamplingParams(temperature=0.0, max_tokens=1)
        for n in sizes:
            table = list(range(-(-n // self.block_size)))
            seq = ScheduledSeq(request_id="warm-up", token_ids=[0] * n, start_pos=0, block_table=table,
                               sample=True, sampling=params, output_len=0)
            for tau in taus:
                self.execute(SchedulerOutput(seqs=[seq], num_prefill_tokens=n, num_decode_tokens=0), tau)
        torch.cuda.synchronize(self.device)
        log.info("warmed up prefill steps of %s tokens", sizes)

    @property
    def brownout_ready(self) -> bool:
        return self.model.brownout_ready

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        if request_id not in self._generators:
            self._generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return self._generators[request_id]

    def _host_step(self, sched: SchedulerOutput) -> HostStep:
        """The step's inputs as host lists: token ids, positions, cache slots, query and
        context lengths, block tables."""
        bs = self.block_size
        ids, pos, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
        for s in sched.seqs:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            positions = range(s.start_pos, s.start_pos + n)
            pos.extend(positions)
            table = s.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in positions)
            q_lens.append(n)
            seq_lens.append(s.start_pos + n)
            tables.append(table)
        return HostStep(ids, pos, slots, q_lens, seq_lens, tables)

    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
        """The step's inputs as device tensors and attention metadata (the eager path)."""
        return self._to_device(self._host_step(sched))

    def _to_device(self, step: HostStep) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
        tables = step.block_tables_list
        width = max(len(t) for t in tables)
        dev = self.device
        qsl = [0, *accumulate(step.query_lens_list)]
        meta = AttnMeta(
            slot_mapping=to_device(step.slots, dev, torch.long),
            block_tables=to_device([t + [PAD_BLOCK] * (width - len(t)) for t in tables], dev, torch.int32),
            seq_lens=to_device(step.seq_lens_list, dev, torch.int32),
            query_start_loc=to_device(qsl, dev, torch.int32),
            max_query_len=step.max_query_len, block_tables_list=tables,
            seq_lens_list=step.seq_lens_list, query_lens_list=step.query_lens_list)
        return to_device(step.token_ids, dev, torch.long), to_device(step.positions, dev, torch.long), meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, rungs: "Rungs | float" = 1.0) -> RunnerOutput:
        return self.collect(self.launch(sched, rungs))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, rungs: "Rungs | float" = 1.0,
               prev: Optional["PendingStep"] = None) -> "PendingStep":
        """Queue the step's forward, sampling and the copy of the sampled tokens to the host;
        on a GPU this returns before the GPU is done, so the engine can do its host work for
        the previous step meanwhile. `collect` waits for the results. `rungs`: the step's
        `Rungs`, or a bare tau (the model's k). `prev`: the launched step whose sampled
        tokens a step planned ahead takes as its input (`SchedulerOutput.prev_rows`)."""
        rungs = as_rungs(rungs)
        out, step = self.forward(sched, rungs, prev)
        sampled = [s for s in sched.seqs if s.sample]
        offsets = _offsets(step.query_lens_list)
        tokens = logits = sampling = None
        if sampled:
            rows = [offsets[i] + len(s.token_ids) - 1 for i, s in enumerate(sched.seqs) if s.sample]
            if len(rows) == out.hidden.shape[0]:  # every row samples (a decode step): no gather
                picked = out.hidden
            else:
                picked = out.hidden.index_select(0, to_device(rows, self.device, torch.long))
            gens = [self._generator(s.request_id, s.sampling.seed) for s in sampled]
            sampling = SamplingMetadata.build([s.sampling for s in sampled], gens,
                                              self.model.spec.vocab_size, self.device)
            if sampling.all_greedy and all(n is None for n in sampling.num_logprobs):
                # greedy rows without logprobs read lm_head's output as it is: no float32 copy
                tokens = greedy(self.model.raw_logits(picked))
            else:
                logits = self.model.compute_logits(picked)  # [B, V]
                tokens = sample(logits, sampling)
        pending = PendingStep(sched=sched, hidden=out.hidden, offsets=offsets, sampled=sampled, logits=logits,
                              tokens=tokens, sampling=sampling,
                              tau=rungs.tau if self.brownout_ready else 1.0,
                              top_k=self.shed_to(rungs))
        # non-blocking copies land in pinned memory; the event says when they are there
        pending.tokens_host = tokens.to("cpu", non_blocking=True) if tokens is not None else None
        touched = out.experts_touched
        pending.touched_host = touched.to("cpu", non_blocking=True) if touched is not None else None
        if self.device.type == "cuda":
            pending.ready = torch.cuda.Event()
            pending.ready.record()
        return pending

    @torch.inference_mode()
    def collect(self, pending: "PendingStep") -> RunnerOutput:
        """The launched step's sampled tokens (and logprobs, expert counts); waits for the GPU."""
        if pending.ready is not None:
            pending.ready.synchronize()
        out = RunnerOutput(sampled={}, tau=pending.tau, top_k=pending.top_k)
        if pending.tokens_host is not None:
            for s, tok in zip(pending.sampled, pending.tokens_host.tolist()):
                out.sampled[s.request_id] = tok
            self._logprobs(pending, out)
        out.experts_touched = pending.touched_host.tolist() if pending.touched_host is not None else []
        for i, s in enumerate(pending.sched.seqs):
            if s.prompt_logprob_targets is not None:
                out.prompt_logprobs[s.request_id] = self._prompt_logprobs(s, pending.hidden,
                                                                          pending.offsets[i])
        return out

    @torch.inference_mode()
    def shed_to(self, rungs: Rungs) -> Optional[int]:
        """The k' a step at `rungs` runs with, or None when it keeps the model's k."""
        if rungs.top_k is None or rungs.top_k >= self.model_top_k:
            return None
        return max(MIN_TOP_K, int(rungs.top_k))

    @torch.inference_mode()
    def forward(self, sched: SchedulerOutput, rungs: "Rungs | float" = 1.0,
                prev: Optional["PendingStep"] = None) -> tuple[ForwardOutput, HostStep]:
        """Run the model on one step: a CUDA-graph replay where the dispatcher has a graph for
        it, else eager -> (hidden [T, D] and expert slots touched [M] or None, the step's host
        inputs); no sampling. `prev`: as in `launch`."""
        rungs = as_rungs(rungs)
        step = self._host_step(sched)
        ahead_ids = self._ahead_ids(sched, step, prev)
        tau = rungs.tau
        if self.brownout_ready:
            self.tau.fill_(tau)
        top_k = self.shed_to(rungs)
        self.top_k.fill_(self.model_top_k if top_k is None else top_k)
        brownout = self.brownout_ready and tau < 1.0
        # tokens of an exempt class keep their experts; the graphs hold no per-token mask, so
        # a dimmed or shed step carrying them runs eager
        exempt = self._exempt_mask(sched) if brownout or top_k is not None else None
        key = None
        if self.graphs is not None and exempt is None:
            key = self.graphs.dispatch(StepDescriptor.of(sched, routed=tau < 1.0, shed=top_k is not None))
        if key is not None:
            return self.graphs.run(key, step, ahead_ids), step
        input_ids, positions, meta = self._to_device(step)
        if ahead_ids is not None:
            ahead_ids.apply(input_ids)
        # eager: at tau = 1 routing is skipped altogether (it would change nothing), and so
        # is shedding at the model's k
        ctx = ForwardContext(attn=meta, kv_caches=self.kv_caches, tau=self.tau if brownout else None,
                             top_k=self.top_k if top_k is not None else None,
                             use_kernels=self.use_kernels, exempt=exempt,
                             defer_moe_sum=not self.loaded.parallel.active)
        return self.model(input_ids, positions, ctx), step

    def _ahead_ids(self, sched: SchedulerOutput, step: HostStep,
                   prev: Optional["PendingStep"]) -> Optional[TokenPatch]:
        """Where a step planned ahead takes input tokens from the previous step's sampled
        tokens, on the device without a host round trip; None for other steps."""
        rows = sched.prev_rows
        if rows is None or all(r < 0 for r in rows):
            return None
        if prev is None or prev.tokens is None or len(rows) != len(sched.seqs):
            raise ValueError("a step planned ahead needs the sampled tokens of the step before it")
        if rows == list(range(len(rows))) and len(step.token_ids) == len(rows):
            return TokenPatch(None, prev.tokens[:len(rows)])  # the same batch, fewer at its end
        offsets = _offsets(step.query_lens_list)
        dest = [offsets[i] for i, r in enumerate(rows) if r >= 0]
        src = [r for r in rows if r >= 0]
        idx = to_device(dest + src, self.device, torch.long)
        return TokenPatch(idx[:len(dest)], prev.tokens.index_select(0, idx[len(dest):]))

    def _exempt_mask(self, sched: SchedulerOutput) -> Optional[torch.Tensor]:
        """[T] bool: the step's tokens of exempt sequences; None when it carries none."""
        if not any(s.exempt for s in sched.seqs):
            return None
        mask = [s.exempt for s in sched.seqs for _ in s.token_ids]
        return to_device(mask, self.device, torch.bool)

    def _logprobs(self, pending: "PendingStep", out: RunnerOutput) -> None:
        counts = pending.sampling.num_logprobs
        want = [i for i, n in enumerate(counts) if n is not None]
        if not want:
            return
        num_top = max(counts[i] for i in want)
        lps = token_logprobs(pending.logits[want], pending.tokens[want], num_top)
        for i, lp in zip(want, lps):
            lp.top = dict(list(lp.top.items())[:counts[i]])
            out.logprobs[pending.sampled[i].request_id] = lp

    def _prompt_logprobs(self, s, hidden: torch.Tensor, offset: int) -> list[Optional[Logprob]]:
        targets = s.prompt_logprob_targets
        if not targets:
            return []
        logits = self.model.compute_logits(hidden[offset:offset + len(targets)])
        tgt = torch.tensor(targets, device=logits.device)
        return list(token_logprobs(logits, tgt, s.sampling.prompt_logprobs or 0))


@dataclass
class PendingStep:
    """A launched step: its inputs, device results and their host copies in flight."""

    sched: SchedulerOutput
    hidden: torch.Tensor
    offsets: list[int]  # row of each sequence's first token in hidden
    sampled: list  # the ScheduledSeqs that sample, in row order
    logits: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor]
    sampling: Optional[SamplingMetadata]  # None when no sequence samples
    tau: float
    top_k: Optional[int] = None  # k' the step shed to; None: the model's k
    tokens_host: Optional[torch.Tensor] = None
    touched_host: Optional[torch.Tensor] = None
    ready: Optional["torch.cuda.Event"] = None


def as_rungs(rungs: "Rungs | float") -> Rungs:
    """A step's rungs from `Rungs` or a bare tau (the model's k)."""
    return rungs if isinstance(rungs, Rungs) else Rungs(tau=float(rungs))


def _offsets(query_lens: list[int]) -> list[int]:
    """Row offset of each sequence's tokens in the step."""
    offsets, acc = [], 0
    for n in query_lens:
        offsets.append(acc)
        acc += n
    return offsets


def _kernels_available() -> bool:
    try:  # lazy: probes the optional triton kernels, which CPU-only processes never import
        from brownout.kernels.fused_moe import fused_moe_available

        import brownout.kernels.paged_attention  # noqa: F401
    except ImportError:
        return False
    return fused_moe_available()
