"""The engine launches step N+1 before it detokenises step N; stop strings found then
finish their request one step late, drop the launched step's token and free the cache."""

from brownout.engine.llm import LLM
from brownout.types import FinishReason, SamplingParams


def test_next_step_is_launched_before_outputs_are_built(tiny_models):
    llm = LLM(str(tiny_models["qwen2_moe"]), device="cpu")
    engine = llm.engine
    events = []
    launch, emit = engine.runner.launch, engine._emit
    engine.runner.launch = lambda sched, tau=1.0, prev=None: (events.append("launch"), launch(sched, tau, prev))[1]
    engine._emit = lambda *a: (events.append("emit"), emit(*a))[1]
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    # prefill, then 3 decodes; every step's outputs come after the next launch (none after the last)
    assert events == ["launch", "launch", "emit", "launch", "emit", "launch", "emit", "emit"]


def test_stop_string_in_flight_step_is_dropped_and_blocks_freed(tiny_models):
    llm = LLM(str(tiny_models["qwen2_moe"]), device="cpu")
    engine = llm.engine
    base = llm.generate("The quick brown fox", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = base.text
    snippet = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip())
    launched = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, tau=1.0, prev=None: (
        launched.append([s.request_id for s in sched.seqs]), launch(sched, tau, prev))[1]
    long = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate(["The quick brown fox", "A different prompt here"],
                        [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[snippet]), long])
    stopped = outs[0]
    assert stopped.finish_reason == FinishReason.STOP
    assert snippet not in stopped.text and text.startswith(stopped.text)
    # the stopped request (admitted first, so first in each step it is in) took part in one
    # more launched step than it emitted tokens for
    steps_with_first = sum(1 for ids in launched if ids and ids[0] == launched[0][0])
    assert steps_with_first == len(stopped.token_ids) + 1
    assert outs[1].finish_reason == FinishReason.LENGTH and len(outs[1].token_ids) == 24
    assert engine.blocks.usage == 0.0 and not engine.has_unfinished_requests()
