"""Which CUDA graph a step replays, decided without a GPU.

`GraphDispatcher` maps a step descriptor to a graph key or to None (eager). The rules are
checked case by case and, over random descriptors, against `_rules`: a plain restatement
of the decision (decode graph when every sequence decodes one sampled token and the batch
and block tables fit; else a mixed graph when the tokens fit the largest token bucket;
eager for prompt logprobs, and for prefill work across ranks).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.runner.cuda_graphs import (DECODE, MIXED, GraphDispatcher, GraphKey, StepDescriptor,
                                         bucket_sizes, token_bucket_sizes)
from brownout.types import SamplingParams, ScheduledSeq, SchedulerOutput

MAX_BATCH = 64
MAX_BLOCKS = 128
BLOCK_SIZE = 16
MAX_STEP_TOKENS = 2048


def _step(tokens=1, seqs=1, width=1, decode=True, prompt_logprobs=False, routed=False):
    return StepDescriptor(num_tokens=tokens, num_seqs=seqs, table_width=width, uniform_decode=decode,
                          prompt_logprobs=prompt_logprobs, routed=routed)


def _dispatcher(with_brownout=True, across_ranks=False, max_step_tokens=MAX_STEP_TOKENS):
    return GraphDispatcher(MAX_BATCH, MAX_BLOCKS, with_brownout, max_step_tokens, BLOCK_SIZE, across_ranks)


def test_bucket_sizes_are_the_served_ones():
    assert bucket_sizes(512) == [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 513, 32))
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64] and bucket_sizes(6) == [1, 2, 4, 6]
    assert token_bucket_sizes(2048) == [16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280,
                                        1536, 2048]
    assert token_bucket_sizes(100) == [16, 32, 64, 100]


def test_decode_steps_take_the_smallest_batch_bucket():
    d = _dispatcher()
    assert d.dispatch(_step(tokens=3, seqs=3)) == GraphKey(DECODE, 4, False)
    assert d.dispatch(_step(tokens=17, seqs=17, routed=True)) == GraphKey(DECODE, 32, True)
    assert d.dispatch(_step(tokens=64, seqs=64, width=MAX_BLOCKS)) == GraphKey(DECODE, 64, False)


def test_steps_with_prefill_work_take_the_smallest_token_bucket():
    d = _dispatcher()
    assert d.dispatch(_step(tokens=28, seqs=3, width=3, decode=False)) == GraphKey(MIXED, 32, False)
    assert d.dispatch(_step(tokens=2048, seqs=1, width=3, decode=False)) == GraphKey(MIXED, 2048, False)
    assert d.dispatch(_step(tokens=2049, seqs=1, width=3, decode=False)) is None


def test_eager_steps():
    d = _dispatcher()
    assert d.dispatch(_step(prompt_logprobs=True)) is None
    assert d.dispatch(_step(tokens=20, decode=False, prompt_logprobs=True)) is None
    assert d.dispatch(_step(tokens=65, seqs=65)) is None  # more sequences than any graph holds
    assert d.dispatch(_step(width=MAX_BLOCKS + 1)) is None  # block table wider than the buffers


def test_across_ranks_only_decode_steps_are_graphed():
    d = _dispatcher(across_ranks=True)
    assert d.token_sizes == []
    assert d.dispatch(_step(tokens=8, seqs=8)) == GraphKey(DECODE, 8, False)
    assert d.dispatch(_step(tokens=28, seqs=3, decode=False)) is None
    assert all(k.kind == DECODE for k in d.keys())


def test_routing_variant_only_with_united_experts():
    plain = _dispatcher(with_brownout=False)
    assert plain.dispatch(_step(routed=True)) == GraphKey(DECODE, 1, False)
    assert all(not k.routed for k in plain.keys())


def test_capture_plan_is_largest_first_with_both_variants():
    d = _dispatcher(max_step_tokens=100)
    keys = d.keys()
    assert keys[:4] == [GraphKey(MIXED, 100, False), GraphKey(MIXED, 100, True),
                        GraphKey(MIXED, 64, False), GraphKey(MIXED, 64, True)]
    assert keys[-1] == GraphKey(DECODE, 1, True)
    assert len(keys) == 2 * (len(d.token_sizes) + len(d.sizes)) == len(set(keys))


def test_token_buckets_fit_the_padding_sequence_block_table():
    """The padding sequence of a mixed step reads its n rows over one block table."""
    d = GraphDispatcher(8, 2, False, max_step_tokens=64, block_size=16)
    assert d.token_sizes == [16, 32]


def test_descriptor_of_a_scheduled_step():
    p = SamplingParams(max_tokens=4)

    def seq(rid, n, table, sample=True, targets=None):
        return ScheduledSeq(request_id=rid, token_ids=[1] * n, start_pos=0, block_table=table, sample=sample,
                            sampling=p, output_len=0, prompt_logprob_targets=targets)

    decode = SchedulerOutput(seqs=[seq("a", 1, [1, 2]), seq("b", 1, [3])], num_prefill_tokens=0,
                             num_decode_tokens=2)
    assert StepDescriptor.of(decode, routed=True) == _step(tokens=2, seqs=2, width=2, routed=True)
    mixed = SchedulerOutput(seqs=[seq("a", 20, [5, 9]), seq("b", 1, [1, 2, 3])], num_prefill_tokens=20,
                            num_decode_tokens=1)
    assert StepDescriptor.of(mixed, routed=False) == _step(tokens=21, seqs=2, width=3, decode=False)
    # a one-token prompt chunk that does not sample yet is not a decode
    chunk = SchedulerOutput(seqs=[seq("a", 1, [1], sample=False)], num_prefill_tokens=1, num_decode_tokens=0)
    assert not StepDescriptor.of(chunk, routed=False).uniform_decode
    echo = SchedulerOutput(seqs=[seq("a", 3, [1], targets=[4, 5])], num_prefill_tokens=3, num_decode_tokens=0)
    assert StepDescriptor.of(echo, routed=False).prompt_logprobs


def _rules(d: GraphDispatcher, s: StepDescriptor, with_brownout: bool):
    if s.prompt_logprobs:
        return None
    fits = s.num_seqs <= d.max_batch and s.table_width <= d.max_blocks
    routed = s.routed and with_brownout
    if s.uniform_decode and fits:
        return GraphKey(DECODE, min(b for b in d.sizes if b >= s.num_seqs), routed)
    if d.token_sizes and fits and s.num_tokens <= d.token_sizes[-1]:
        return GraphKey(MIXED, min(n for n in d.token_sizes if n >= s.num_tokens), routed)
    return None


@settings(max_examples=300, deadline=None)
@given(tokens=st.integers(1, 3000), seqs=st.integers(1, 80), width=st.integers(1, 140),
       decode=st.booleans(), prompt_logprobs=st.booleans(), routed=st.booleans(),
       with_brownout=st.booleans(), across_ranks=st.booleans())
def test_dispatch_follows_the_rules(tokens, seqs, width, decode, prompt_logprobs, routed, with_brownout,
                                    across_ranks):
    d = _dispatcher(with_brownout=with_brownout, across_ranks=across_ranks)
    step = _step(tokens=seqs if decode else tokens, seqs=seqs, width=width, decode=decode,
                 prompt_logprobs=prompt_logprobs, routed=routed)
    key = d.dispatch(step)
    assert key == _rules(d, step, with_brownout)
    assert key is None or key in d.keys()
