"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

The scheduler owns every request from `add` to its finish: its status, its computed
tokens, its KV blocks, when it stops and why. Each step it first continues the running
requests (one decode token each, or the next prefill chunk), preempting the lowest-priority
running request when KV blocks run out, then admits waiting requests (FCFS, or by priority)
while the step's token budget, the batch size and the free blocks allow (`schedule`). The
SLO controller may set a smaller token budget for a step (it caps prompt chunks, never a
decode) and a running-batch cap (`QueueView.running_cap`, below `max_num_seqs`); under the
priority policy a full batch gives a slot to a more important waiting request by preempting
its least important running one. The
collected step comes back through `update_from_output`, which advances the computed tokens,
appends the sampled tokens and stops requests on EOS, a stop token id, `max_tokens` or the
context length. Queue timeouts (`expire_waiting`) and aborts and stop strings
(`finish_requests`) finish requests here too; every finishing call returns what it
finished, so the caller can release the runner's per-request state. `view` counts the
queue as requests move, for admission and the controller. Plain Python: testable without
a model.

Prefix caching (when the block manager has it on): a request admitted from the queue starts
from the cached blocks that hold the longest prefix of its tokens (never its last token,
whose logits it needs; a request that wants prompt logprobs computes its whole prompt), and
each collected step indexes the full blocks it completed with the step's tau
(brownout.engine.block_manager says when a block computed while dimmed may serve). A
waiting request whose next prompt block a running request is still prefilling waits for
it instead of computing it a second time: samples of one prompt (`n`) compute it once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from brownout.config import SchedulerConfig
from brownout.engine.block_manager import EXACT_TAU, BlockManager, prompt_hashes
from brownout.engine.request import Request, Status
from brownout.engine.request_queue import make_request_queue
from brownout.types import FinishReason, Logprob, RunnerOutput, ScheduledSeq, SchedulerOutput

# input token of a step planned ahead (`schedule_ahead`): any valid id, the runner replaces it
# on the device with the previous step's sampled token
AHEAD_PLACEHOLDER_TOKEN = 0


@dataclass(slots=True)
class QueueView:
    """The scheduler's queue, counted as requests move (never re-summed on a read)."""

    max_num_seqs: int
    num_waiting: int = 0
    num_running: int = 0
    waiting_tokens: int = 0  # tokens the waiting requests still have to compute
    running_prefill_tokens: int = 0  # prompt tokens of running requests not yet computed
    num_prefilling: int = 0  # running requests with prompt tokens not yet computed
    # the running-batch cap (admission's TPOT rung, `Admission.set_running_cap`); None: none
    running_cap: Optional[int] = None
    # priority -> [waiting requests, their tokens still to compute]: the work queued ahead of
    # a new request under the priority policy (`ahead_of`)
    waiting_by_priority: dict[int, list[int]] = field(default_factory=dict)

    @property
    def max_running(self) -> int:
        """Requests the batch may hold now: `max_num_seqs`, or the running cap when lower."""
        cap = self.running_cap
        return self.max_num_seqs if cap is None else max(1, min(cap, self.max_num_seqs))

    @property
    def free_slots(self) -> int:
        return self.max_running - self.num_running

    @property
    def num_decoding(self) -> int:
        return self.num_running - self.num_prefilling

    def ahead_of(self, priority: int) -> tuple[int, int]:
        """(requests, tokens) waiting that the priority policy serves before a new request of
        `priority`: those of the same or a more important class (lower value)."""
        n = t = 0
        for p, (count, tokens) in self.waiting_by_priority.items():
            if p <= priority:
                n += count
                t += tokens
        return n, t

    def count_waiting(self, priority: int, n: int, tokens: int) -> None:
        rec = self.waiting_by_priority.setdefault(priority, [0, 0])
        rec[0] += n
        rec[1] += tokens
        if rec[0] == 0:
            del self.waiting_by_priority[priority]


@dataclass(slots=True)
class NewToken:
    """A token the collected step sampled for a request; the request may have finished on it."""

    request: Request
    token_id: int
    logprob: Optional[Logprob]
    first: bool  # the request's first output token


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 max_model_len: Optional[int] = None, eos_ids: Iterable[int] = ()):
        self.config = config
        self.blocks = blocks
        capacity = blocks.num_blocks * blocks.block_size
        # a request never outgrows the cache, so one alone always fits and preemption ends
        self.max_model_len = min(max_model_len or capacity, capacity)
        self.eos_ids = frozenset(eos_ids)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting = make_request_queue(config.policy)
        self.running: list[Request] = []  # in the order they were admitted
        self.view = QueueView(config.max_num_seqs)
        self._seq = itertools.count()
        self.num_preemptions = 0
        self.num_prompt_tokens_total = 0  # prompt tokens computed (again after preemption)
        self.num_generation_tokens_total = 0
        self.num_prefix_cache_queries = 0  # tokens of admitted requests looked up in the cache
        self.num_prefix_cache_hits = 0  # of those, tokens found cached (not computed)
        self.tau = EXACT_TAU  # the tau of the last collected step (prefix-cache serving rule)

    # ---- requests in and out -------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if not 0 < len(req.prompt_token_ids) < self.max_model_len:
            raise ValueError(f"a prompt must have 1 to {self.max_model_len - 1} tokens")
        req.seq = next(self._seq)
        if self.blocks.enable_caching:
            req.block_hashes = prompt_hashes(req.prompt_token_ids, self.blocks.block_size)
        self.requests[req.request_id] = req
        self._to_waiting(req)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """Finish the given unfinished requests (abort, stop string); unknown ids are skipped.
        The blocks of one in the launched step are free at once: only the next `schedule`
        hands them out again, and that comes after the step is collected."""
        finished = [self.requests[rid] for rid in dict.fromkeys(request_ids) if rid in self.requests]
        for req in finished:
            self._finish(req, reason)
        return finished

    def expire_waiting(self, now: float) -> list[Request]:
        """Finish the requests that waited longer than the queue timeout without ever
        producing a token (a preempted request that produced some is not timed out)."""
        timeout = self.config.queue_timeout_s
        if timeout is None:
            return []
        expired = [r for r in self.waiting
                   if not r.output_token_ids and now - r.arrival_time > timeout]
        for req in expired:
            self._finish(req, FinishReason.TIMEOUT)
        return expired

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, token_budget: Optional[int] = None) -> SchedulerOutput:
        """The next step. `token_budget`: the step's token budget chosen for it (the SLO
        controller's rung 3), at most `max_num_batched_tokens`; it caps the prompt tokens the
        step takes, while every decoding request still gets its token (decodes count
        against it, prompt chunks get what is left). None: the configured budget."""
        budget = self.config.max_num_batched_tokens
        prefill_budget = budget
        if token_budget is not None:
            prefill_budget = max(0, min(budget, int(token_budget)) - self.view.num_decoding)
        out = SchedulerOutput(seqs=[], num_prefill_tokens=0, num_decode_tokens=0)
        # slots freed for a more important class: the step still admits into them (only a
        # preemption for KV blocks stops admission)
        yielded: list[str] = []
        if self.config.policy == "priority":
            self._preempt_for_priority(yielded)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            left = req.num_tokens - req.num_computed
            decode = self._is_decode(req, left)
            n = min(left, budget) if decode else min(left, budget, prefill_budget)
            if n <= 0:  # a prompt chunk the step's token budget has no room for
                i += 1
                continue
            if not self._make_room(req, req.num_computed + n, out.preempted, i):
                continue  # req itself was preempted; the list shifted
            self._add_seq(out, req, n, decode=decode)
            budget -= n
            if not decode:
                prefill_budget -= n
            i += 1
        if not out.preempted:
            self._admit_waiting(out, min(budget, prefill_budget))
        out.preempted[:0] = yielded
        return out

    def schedule_ahead(self, prev: SchedulerOutput, token_budget: Optional[int] = None) -> Optional[SchedulerOutput]:
        """The step after `prev`, planned while `prev` still runs. A request `prev` samples
        for decodes that token, read on the device (`SchedulerOutput.prev_rows`), unless it
        is its last by length; a request `prev` took a prompt chunk of gets its next chunk;
        waiting requests are admitted as `schedule` admits them (`token_budget` likewise).
        None when the plan needs `prev`'s results or a choice made only after it: a running
        request was not in `prev`, `prev` asked for logprobs or prompt logprobs, or the plan
        would need a preemption (for KV blocks, or by the priority policy). A request that
        `prev`'s token ends otherwise (EOS, a stop id or string) is finished when `prev` is
        collected, and the scheduler drops what this step computed for it."""
        if not self.running or self._priority_victim() is not None:
            return None
        # logprobs are computed when a step is collected, on the device: behind a step launched
        # ahead, that collect would wait for it
        if any(s.prompt_logprob_targets is not None or (s.sample and s.sampling.logprobs is not None)
               for s in prev.seqs):
            return None
        sampled_rows = itertools.count()  # the runner's sampled tokens: one row per sampling seq
        in_prev = {s.request_id: (next(sampled_rows) if s.sample else -1, s) for s in prev.seqs}
        budget = self.config.max_num_batched_tokens
        plan = []  # (request, row in prev's samples or -1, start, tokens)
        for req in self.running:
            hit = in_prev.get(req.request_id)
            if hit is None or hit[1].req_seq not in (None, req.seq) or hit[1].start_pos != req.num_computed:
                return None  # not in prev, or another request under the same id
            row, s = hit
            start = s.start_pos + len(s.token_ids)
            if s.sample:
                if len(req.output_token_ids) + 1 >= req.sampling.max_tokens or start + 1 >= self.max_model_len:
                    continue  # prev's token is its last
                plan.append((req, row, start, 1))
            else:
                plan.append((req, -1, start, req.num_tokens - start))
        decodes = sum(1 for _, row, _, _ in plan if row >= 0)
        prefill_budget = budget
        if token_budget is not None:
            prefill_budget = max(0, min(budget, int(token_budget)) - decodes)
        out = SchedulerOutput(seqs=[], num_prefill_tokens=0, num_decode_tokens=0, prev_rows=[])
        sized = []
        for req, row, start, left in plan:  # budget in batch order, as `schedule` does
            n = min(left, budget) if row >= 0 else min(left, budget, prefill_budget)
            if n <= 0:
                continue
            sized.append((req, row, start, n))
            budget -= n
            if row < 0:
                prefill_budget -= n
        need = sum(self.blocks.blocks_needed(req.request_id, start + n) for req, _, start, n in sized)
        if not sized or need > self.blocks.num_free:
            return None
        for req, row, start, n in sized:
            table = self.blocks.allocate(req.request_id, start + n)
            decode = row >= 0
            out.seqs.append(ScheduledSeq(
                request_id=req.request_id,
                token_ids=[AHEAD_PLACEHOLDER_TOKEN] if decode else req.token_slice(start, n),
                start_pos=start, block_table=list(table), sample=decode or start + n == req.num_tokens,
                sampling=req.sampling, output_len=len(req.output_token_ids) + decode, req_seq=req.seq))
            out.prev_rows.append(row)
            if decode:
                out.num_decode_tokens += 1
            else:
                out.num_prefill_tokens += n
        admitted = len(out.seqs)
        self._admit_waiting(out, min(budget, prefill_budget))
        out.prev_rows += [-1] * (len(out.seqs) - admitted)
        return out

    def prefill_queue(self) -> tuple[tuple[int, float], ...]:
        """(prompt tokens still to compute, arrival time) of every request not yet through
        its prefill, in the order the scheduler serves them: the running ones (batch order,
        the chunks of a step just scheduled still counted), then the waiting ones (queue
        order). A request that already has its first token (one preempted and recomputing)
        has arrival time +inf: its tokens are ahead of the others, but no first-token
        deadline is its own. The SLO controller reads it to check each queued prompt's first
        token against the TTFT SLO from the time it arrived (`PlannedStep.prefill_queue`).
        A waiting request counts all its tokens not yet computed, as the queue view does: a
        prefix the cache will supply is not known before it is scheduled, so a queue of
        shared prefixes reads longer than it computes (the check errs toward dimming)."""
        out = [(_prefill_left(r), _ttft_clock(r)) for r in self.running if _prefill_left(r) > 0]
        out += [(r.num_tokens - r.num_computed, _ttft_clock(r)) for r in self.waiting.in_order()]
        return tuple(out)

    def _preempt_for_priority(self, preempted: list[str]) -> None:
        """With the batch exactly full, preempt the least important running request when the
        first waiting one is of a strictly more important class (lower priority value): under
        overload the least important class gives way first. One a step, and only into a slot
        the waiting request then takes: a batch over a lowered running cap drains by finishes
        instead (preempting it down to the cap would recompute many requests for one)."""
        victim = self._priority_victim()
        if victim is not None:
            self._preempt(victim)
            preempted.append(victim.request_id)

    def _priority_victim(self) -> Optional[Request]:
        """The running request the priority policy preempts for the first waiting one, or None."""
        if not (self.config.policy == "priority" and self.waiting and self.running
                and len(self.running) == self.view.max_running):
            return None
        victim = max(self.running, key=self.waiting.key)
        return victim if victim.priority > self.waiting.peek().priority else None

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.view.max_running:
            req = self.waiting.peek()
            cached = self._cached_prefix(req)
            if self._prefix_in_progress(req, len(cached)):
                break
            start = len(cached) * self.blocks.block_size
            n = req.num_tokens - start
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.blocks.can_allocate(req.request_id, start + n, cached):
                break
            self._from_waiting(self.waiting.pop())
            req.num_computed = start
            self._to_running(req)
            if self.blocks.enable_caching and req.sampling.prompt_logprobs is None:
                self.num_prefix_cache_queries += req.num_tokens
                self.num_prefix_cache_hits += start
            self._add_seq(out, req, n, decode=False, cached=cached)
            budget -= n
        return budget

    def _cached_prefix(self, req: Request) -> list[int]:
        if not self.blocks.enable_caching or req.sampling.prompt_logprobs is not None:
            return []
        return self.blocks.cached_prefix(req.all_token_ids, self.tau)

    def _prefix_in_progress(self, req: Request, num_cached: int) -> bool:
        """Whether a running request is prefilling the next block `req` could reuse."""
        hashes = req.block_hashes
        if (num_cached >= len(hashes) or req.sampling.prompt_logprobs is not None
                or not self.view.running_prefill_tokens):
            return False
        bs, want = self.blocks.block_size, hashes[num_cached]
        return any(want in r.block_hashes[r.num_computed // bs:] for r in self.running
                   if r.num_computed < len(r.prompt_token_ids))

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput,
                           now: float) -> list[NewToken]:
        """Take a collected step: progress, prompt logprobs and sampled tokens of the requests
        still running (one finished or aborted while the step ran gets nothing), and stop the
        requests whose token ends them."""
        new_tokens = []
        self.tau = result.tau
        for s in sched.seqs:
            req = self.requests.get(s.request_id)
            # a request finished (or finished and its id reused) while the step ran gets nothing
            if (req is None or req.status is not Status.RUNNING or req.num_computed != s.start_pos
                    or s.req_seq not in (None, req.seq)):
                continue
            self._advance(req, len(s.token_ids))
            self._commit_blocks(req, len(s.token_ids), result.tau)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            if s.request_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[s.request_id])
            if s.start_pos < len(req.prompt_token_ids):
                self.num_prompt_tokens_total += min(len(s.token_ids),
                                                    len(req.prompt_token_ids) - s.start_pos)
            token = result.sampled.get(s.request_id)
            if token is not None:
                new_tokens.append(self._append_token(req, token, result.logprobs.get(s.request_id), now))
        return new_tokens

    def _append_token(self, req: Request, token: int, logprob: Optional[Logprob],
                      now: float) -> NewToken:
        req.output_token_ids.append(token)
        self.num_generation_tokens_total += 1
        m = req.metrics
        first = m.first_token_time is None
        if first:
            m.first_token_time = now
        m.last_token_time = now
        p = req.sampling
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            self._finish(req, FinishReason.STOP)
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)
        return NewToken(req, token, logprob, first)

    def _commit_blocks(self, req: Request, n: int, tau: float) -> None:
        """Index the full blocks the step completed (only when it crossed a block edge)."""
        bs = self.blocks.block_size
        if self.blocks.enable_caching and req.num_computed // bs > (req.num_computed - n) // bs:
            self.blocks.commit(req.request_id, req.all_token_ids, req.num_computed, tau)

    def holds_priority(self, sched: SchedulerOutput, priority: Optional[int]) -> bool:
        """Whether a step holds a request of `priority` or a more important class (lower
        value): a class exempt from dimming runs such a step undimmed. False for None."""
        if priority is None:
            return False
        reqs = (self.requests.get(s.request_id) for s in sched.seqs)
        return any(r is not None and r.priority <= priority for r in reqs)

    # ---- building a step -----------------------------------------------------------------
    @staticmethod
    def _is_decode(req: Request, n: int) -> bool:
        return n == 1 and req.num_computed == req.num_tokens - 1 and bool(req.output_token_ids)

    def _add_seq(self, out: SchedulerOutput, req: Request, n: int, decode: bool,
                 cached: Sequence[int] = ()) -> None:
        table = self.blocks.allocate(req.request_id, req.num_computed + n, cached)
        start = req.num_computed
        targets: Optional[list[int]] = None
        if (req.sampling.prompt_logprobs is not None and start < len(req.prompt_token_ids)
                and not _prompt_logprobs_done(req)):
            targets = req.prompt_token_ids[start + 1:start + n + 1]
        out.seqs.append(ScheduledSeq(
            request_id=req.request_id, token_ids=req.token_slice(start, n), start_pos=start,
            block_table=list(table), sample=start + n == req.num_tokens, sampling=req.sampling,
            output_len=len(req.output_token_ids), prompt_logprob_targets=targets, req_seq=req.seq))
        if decode:
            out.num_decode_tokens += 1
        else:
            out.num_prefill_tokens += n

    def _make_room(self, req: Request, num_tokens: int, preempted: list[str], done: int) -> bool:
        """Preempt until `req` can hold `num_tokens`; False if `req` itself was preempted.

        Victims are the lowest-priority requests not yet scheduled in this step (the
        running ones from index `done` on: the first `done` are scheduled and stay put).
        A request alone always fits (`max_model_len` is at most the cache), so this ends.
        """
        while not self.blocks.can_allocate(req.request_id, num_tokens):
            victim = max(self.running[done:], key=self.waiting.key)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self._from_running(req)
        self.blocks.free(req.request_id)
        req.num_computed = 0
        if not _prompt_logprobs_done(req):  # its recompute computes them all again
            req.prompt_logprobs = []
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._to_waiting(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is Status.RUNNING:
            self._from_running(req)
        else:
            self.waiting.remove(req)
            self._from_waiting(req)
        self.blocks.free(req.request_id)
        del self.requests[req.request_id]
        req.status = Status.FINISHED
        req.finish_reason = reason

    # ---- moves between the queues, with the view's counts --------------------------------
    def _to_waiting(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.push(req)
        self.view.num_waiting += 1
        self.view.waiting_tokens += req.num_tokens - req.num_computed
        self.view.count_waiting(req.priority, 1, req.num_tokens - req.num_computed)

    def _from_waiting(self, req: Request) -> None:
        """Count out a request the caller took out of `waiting` (pop or remove)."""
        self.view.num_waiting -= 1
        self.view.waiting_tokens -= req.num_tokens - req.num_computed
        self.view.count_waiting(req.priority, -1, -(req.num_tokens - req.num_computed))

    def _to_running(self, req: Request) -> None:
        req.status = Status.RUNNING
        self.running.append(req)
        self.view.num_running += 1
        self.view.running_prefill_tokens += _prefill_left(req)
        self.view.num_prefilling += _prefill_left(req) > 0

    def _from_running(self, req: Request) -> None:
        self.running.remove(req)
        self.view.num_running -= 1
        self.view.running_prefill_tokens -= _prefill_left(req)
        self.view.num_prefilling -= _prefill_left(req) > 0

    def _advance(self, req: Request, n: int) -> None:
        before = _prefill_left(req)
        req.num_computed += n
        after = _prefill_left(req)
        self.view.running_prefill_tokens += after - before
        self.view.num_prefilling += (after > 0) - (before > 0)


def _prompt_logprobs_done(req: Request) -> bool:
    """Whether the request holds the logprob of each prompt token after the first: a request
    preempted after that keeps them (its output may not have sent them yet)."""
    return len(req.prompt_logprobs) >= len(req.prompt_token_ids) - 1


def _prefill_left(req: Request) -> int:
    return max(0, len(req.prompt_token_ids) - req.num_computed)


def _ttft_clock(req: Request) -> float:
    """When the request's TTFT clock started; +inf once it has its first token."""
    return math.inf if req.output_token_ids else req.arrival_time
