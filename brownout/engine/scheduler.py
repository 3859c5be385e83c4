"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

Every step it first continues the running requests (one decode token each, or the next
prefill chunk), preempting the lowest-priority running request when KV blocks run out, then
admits waiting requests (FCFS, or by priority) while the step's token budget, the batch size
and the free blocks allow. Plain Python: testable without a model.
"""

from __future__ import annotations

import itertools
from typing import Optional

from brownout.config import SchedulerConfig
from brownout.engine.block_manager import BlockManager
from brownout.engine.request import Request, Status
from brownout.types import FinishReason, ScheduledSeq, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._seq = itertools.count()
        self.num_preemptions = 0
        self.capacity_finished: list[Request] = []  # could never fit the cache alone

    # ---- queue -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.seq = next(self._seq)
        self.waiting.append(req)

    def _key(self, req: Request):
        if self.config.policy == "priority":
            return (req.priority, req.arrival_time, req.seq)
        return (req.arrival_time, req.seq)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and free its blocks (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.request_id)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed for r in self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        n_prefill = n_decode = 0
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._make_room(req, req.num_computed + n, preempted, i):
                continue  # req itself was preempted; the list shifted
            seqs.append(self._scheduled(req, n))
            budget -= n
            if self._is_decode(req, n):
                n_decode += 1
            else:
                n_prefill += n
            i += 1
        if not preempted:
            self.waiting.sort(key=self._key)
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                n = req.num_tokens - req.num_computed
                if n > budget and not self.config.enable_chunked_prefill:
                    break
                n = min(n, budget)
                if not self.blocks.can_allocate(req.request_id, req.num_computed + n):
                    break
                self.waiting.pop(0)
                req.status = Status.RUNNING
                self.running.append(req)
                seqs.append(self._scheduled(req, n))
                budget -= n
                n_prefill += n
        return SchedulerOutput(seqs=seqs, num_prefill_tokens=n_prefill,
                               num_decode_tokens=n_decode, preempted=preempted)

    @staticmethod
    def _is_decode(req: Request, n: int) -> bool:
        return n == 1 and req.num_computed == req.num_tokens - 1 and bool(req.output_token_ids)

    def _scheduled(self, req: Request, n: int) -> ScheduledSeq:
        table = self.blocks.allocate(req.request_id, req.num_computed + n)
        start = req.num_computed
        tokens = req.token_slice(start, n)
        targets: Optional[list[int]] = None
        if req.sampling.prompt_logprobs is not None and start < len(req.prompt_token_ids):
            targets = req.prompt_token_ids[start + 1:start + n + 1]
        return ScheduledSeq(request_id=req.request_id, token_ids=tokens, start_pos=start,
                            block_table=list(table), sample=start + n == req.num_tokens,
                            sampling=req.sampling, output_len=len(req.output_token_ids),
                            prompt_logprob_targets=targets)

    def _make_room(self, req: Request, num_tokens: int, preempted: list[str], done: int) -> bool:
        """Preempt until `req` can hold `num_tokens`; False if `req` itself was preempted.

        Victims are the lowest-priority requests not yet scheduled in this step (the
        running ones from index `done` on: the first `done` are scheduled and stay put).
        """
        while not self.blocks.can_allocate(req.request_id, num_tokens):
            victim = max(self.running[done:], key=self._key)
            if victim is req and len(self.running) == 1:
                # alone and still too large for the whole cache: it can never finish
                self.remove(req)
                req.status = Status.FINISHED
                req.finish_reason = FinishReason.LENGTH
                self.capacity_finished.append(req)
                return False
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.prompt_logprobs = []
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
