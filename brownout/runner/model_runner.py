"""Turns one `SchedulerOutput` into tensors, runs the model and samples.

Owns the paged KV cache tensors, the brownout threshold (a device tensor the MoE layers
read, so CUDA-graph replays need no recapture) and the per-request sampling generators.
Under tensor parallelism every rank runs `forward` on the same step (its KV cache holds only
its kv heads, and all ranks agree on the number of blocks); only rank 0 samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from brownout.config import CacheConfig
from brownout.models.context import AttnMeta, ForwardContext
from brownout.runner.cuda_graphs import StepGraphs
from brownout.runner.loader import LoadedModel
from brownout.runner.sampler import sample, to_device, token_logprobs
from brownout.types import Logprob, RunnerOutput, SamplingParams, ScheduledSeq, SchedulerOutput

log = logging.getLogger(__name__)


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
        budget -= 2 * 1024**3  # activations, logits, CUDA graphs
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
        self._generators: dict[str, Optional[torch.Generator]] = {}
        self.graphs: Optional[StepGraphs] = None
        if self.use_kernels and not enforce_eager:
            max_len = max_model_len or s.max_position_embeddings
            # steps with prefill work are graphed on one GPU; under tensor parallelism they
            # run eager (not yet checked on several GPUs)
            mixed = 0 if loaded.parallel.active else max_step_tokens
            self.graphs = StepGraphs(self.model, self.kv_caches, self.tau, min(max_batch, 512),
                                     -(-max_len // cache.block_size), self.brownout_ready,
                                     max_step_tokens=mixed, block_size=cache.block_size)
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
        sizes = sorted({n for n in (1, 8, 32, 64, 128, 256, 512, 1024, max_tokens)
                        if n <= min(max_tokens, capacity)})
        taus = (1.0, 0.5) if self.brownout_ready else (1.0,)
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

    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
        bs = self.block_size
        ids, pos, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
        for s in sched.seqs:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            positions = range(s.start_pos, s.start_pos + n)
            pos.extend(positions)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in positions)
            q_lens.append(n)
            seq_lens.append(s.start_pos + n)
            tables.append(s.block_table)
        width = max(len(t) for t in tables)
        dev = self.device
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        meta = AttnMeta(
            slot_mapping=to_device(slots, dev, torch.long),
            block_tables=to_device([t + [0] * (width - len(t)) for t in tables], dev, torch.int32),
            seq_lens=to_device(seq_lens, dev, torch.int32),
            query_start_loc=to_device(qsl, dev, torch.int32),
            max_query_len=max(q_lens), block_tables_list=tables, seq_lens_list=seq_lens,
            query_lens_list=q_lens)
        return to_device(ids, dev, torch.long), to_device(pos, dev, torch.long), meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, tau: float = 1.0) -> RunnerOutput:
        return self.collect(self.launch(sched, tau))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, tau: float = 1.0) -> "PendingStep":
        """Queue the step's forward, sampling and the copy of the sampled tokens to the host;
        on a GPU this returns before the GPU is done, so the engine can do its host work for
        the previous step meanwhile. `collect` waits for the results."""
        hidden, touched, meta = self.forward(sched, tau)
        sampled = [s for s in sched.seqs if s.sample]
        offsets = _offsets(meta.query_lens_list)
        tokens = logits = None
        if sampled:
            rows = [offsets[i] + len(s.token_ids) - 1 for i, s in enumerate(sched.seqs) if s.sample]
            rows_t = to_device(rows, self.device, torch.long)
            logits = self.model.compute_logits(hidden.index_select(0, rows_t))  # [B, V]
            gens = [self._generator(s.request_id, s.sampling.seed) for s in sampled]
            tokens = sample(logits, [s.sampling for s in sampled], gens)
        pending = PendingStep(sched=sched, hidden=hidden, offsets=offsets, sampled=sampled, logits=logits,
                              tokens=tokens, tau=tau if self.brownout_ready else 1.0)
        # non-blocking copies land in pinned memory; the event says when they are there
        pending.tokens_host = tokens.to("cpu", non_blocking=True) if tokens is not None else None
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
        out = RunnerOutput(sampled={}, tau=pending.tau)
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
    def forward(self, sched: SchedulerOutput, tau: float = 1.0):
        """Run the model on one step -> (hidden [T, D], touched [L] or None, meta); no sampling."""
        input_ids, positions, meta = self._prepare(sched)
        if self.brownout_ready:
            self.tau.fill_(tau)
        graph = self._graph_kind(sched, meta)
        if graph == "decode":
            hidden, touched = self.graphs.run(input_ids, positions, meta.slot_mapping,
                                              meta.block_tables, meta.seq_lens, routed=tau < 1.0)
        elif graph == "mixed":
            hidden, touched = self.graphs.run_mixed(input_ids, positions, meta.slot_mapping,
                                                    meta.block_tables, meta.seq_lens,
                                                    meta.query_start_loc, routed=tau < 1.0)
        else:
            # eager: at tau = 1 routing is skipped altogether (it would change nothing)
            brownout = self.brownout_ready and tau < 1.0
            ctx = ForwardContext(attn=meta, kv_caches=self.kv_caches,
                                 tau=self.tau if brownout else None, use_kernels=self.use_kernels)
            hidden = self.model(input_ids, positions, ctx)  # [T, D]
            touched = torch.stack(ctx.touched) if ctx.touched else None
        return hidden, touched, meta

    def _graph_kind(self, sched: SchedulerOutput, meta: AttnMeta) -> Optional[str]:
        """"decode", "mixed" or None (eager) for this step."""
        if self.graphs is None or any(s.prompt_logprob_targets is not None for s in sched.seqs):
            return None
        B, width = len(sched.seqs), meta.block_tables.shape[1]
        if meta.max_query_len == 1 and all(s.sample for s in sched.seqs) and self.graphs.fits(B, width):
            return "decode"
        if self.graphs.fits_mixed(int(meta.slot_mapping.shape[0]), B, width):
            return "mixed"
        return None

    def _logprobs(self, pending: "PendingStep", out: RunnerOutput) -> None:
        to_sample = pending.sampled
        want = [i for i, s in enumerate(to_sample) if s.sampling.logprobs is not None]
        if not want:
            return
        num_top = max(to_sample[i].sampling.logprobs for i in want)
        lps = token_logprobs(pending.logits[want], pending.tokens[want], num_top)
        for i, lp in zip(want, lps):
            n = to_sample[i].sampling.logprobs
            lp.top = dict(list(lp.top.items())[:n])
            out.logprobs[to_sample[i].request_id] = lp

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
    tau: float
    tokens_host: Optional[torch.Tensor] = None
    touched_host: Optional[torch.Tensor] = None
    ready: Optional["torch.cuda.Event"] = None


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
