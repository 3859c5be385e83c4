"""The block manager returns to zero used blocks whatever the request schedule."""

from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.config import SchedulerConfig
from brownout.engine.block_manager import BlockManager
from brownout.engine.request import Request
from brownout.engine.scheduler import Scheduler
from brownout.types import FinishReason, RunnerOutput, SamplingParams

ops = st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 60),
                         st.integers(0, 30)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(4, 30), budget=st.integers(4, 64),
       policy=st.sampled_from(["fcfs", "priority"]))
def test_blocks_return_to_zero(ops, num_blocks, budget, policy):
    bm = BlockManager(num_blocks, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=5, policy=policy), bm)
    live: dict[str, Request] = {}
    counter = 0

    def step():
        out = sched.schedule()
        sampled = {s.request_id: 7 for s in out.seqs if s.sample}
        for new in sched.update_from_output(out, RunnerOutput(sampled=sampled), now=0.0):
            if new.request.finished:
                del live[new.request.request_id]
        assert bm.num_used == sum(len(bm.table(r)) for r in live)

    for op, a, b in ops:
        if op == "add":
            rid = f"r{counter}"
            counter += 1
            a = min(a, num_blocks * 4 - 1)  # the engine refuses prompts the cache cannot hold
            live[rid] = Request(rid, [1] * a, SamplingParams(max_tokens=1 + b % 8), arrival_time=counter,
                                priority=b % 3)
            sched.add(live[rid])
        elif op == "abort" and live:
            rid = sorted(live)[a % len(live)]
            sched.finish_requests([rid], FinishReason.ABORT)
            del live[rid]
        else:
            step()
    for _ in range(2000):
        if not live:
            break
        step()
    assert not live and bm.num_used == 0
