"""Fairness against heavy requests: the engine process takes in long text prompts over
several steps (TEXT_CHARS_PER_STEP characters between two steps), so a running request keeps
getting tokens meanwhile; and a text far over the token limit is refused after tokenising a
prefix of it. Ordering is asserted, never wall-clock time."""

from __future__ import annotations

import queue
import time

import pytest

from brownout.config import EngineConfig, ModelLoadConfig
from brownout.engine.llm_engine import LLMEngine
from brownout.engine.worker import TEXT_CHARS_PER_STEP, AddCommand, WorkerOptions, _serve, _Session
from brownout.types import SamplingParams

HEAVY_PROMPTS = 4
MAX_MODEL_LEN = 256  # small, so the test's prefills are cheap


class ListQueue(list):
    put = list.append


class CountingTokenizer:
    """The engine's tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.chars = 0

    def encode(self, text, **kwargs):
        self.chars += len(text)
        return self._tokenizer.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def session(model_dir):
    engine = LLMEngine(EngineConfig(load=ModelLoadConfig(model=str(model_dir), device="cpu",
                                                         max_model_len=MAX_MODEL_LEN)))
    if engine.tokenizer is None:
        pytest.skip("the test model has no tokenizer")
    return _Session(engine, WorkerOptions(), ListQueue())


def add(rid: str, prompt, max_tokens: int = 8) -> tuple:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return ("add", AddCommand(rid, prompt, None, params, time.monotonic()))


def test_running_request_steps_while_long_texts_are_taken_in(session):
    heavy = "the king said " * (TEXT_CHARS_PER_STEP // 14 + 1)
    cmd_q: queue.Queue = queue.Queue()
    cmd_q.put(add("normal", [5, 6, 7], max_tokens=3 * HEAVY_PROMPTS))
    for i in range(HEAVY_PROMPTS):  # one request's prompts, each its own engine request
        cmd_q.put(add(f"heavy-{i}", heavy))
    cmd_q.put(("shutdown",))
    session.out_q.clear()
    _serve(session, cmd_q)
    events = []
    for msg in session.out_q:
        if msg[0] in ("added", "add_error"):
            events.append(msg[1])
        elif msg[0] == "step":
            token = any(p.request_id == "normal" and p.new_token_ids for p in msg[2])
            events.append("normal-token" if token else "step")
    last_heavy = events.index(f"heavy-{HEAVY_PROMPTS - 1}")
    assert events.index("normal-token") < last_heavy
    # a step between every two heavy prompts (the first one's token comes a step later:
    # each step is collected in the next call)
    heavy_at = [events.index(f"heavy-{i}") for i in range(HEAVY_PROMPTS)]
    for a, b in zip(heavy_at, heavy_at[1:]):
        assert {"step", "normal-token"} & set(events[a:b]), events
    for rid in list(session.engine.requests):
        session.engine.abort_request(rid)


def test_text_far_over_the_limit_is_refused_after_a_prefix(session):
    counting = CountingTokenizer(session.engine.tokenizer)
    session.engine.tokenizer = counting
    try:
        text = "\u4e00\u4e8c\u4e09" * (MAX_MODEL_LEN * 32 // 3)  # many tokens per character
        session.out_q.clear()
        session.add(add("huge", text)[1])
    finally:
        session.engine.tokenizer = counting._tokenizer
    kind, rid, err = session.out_q[-1]
    assert (kind, rid, err.kind, err.field) == ("add_error", "huge", "validation", "prompt")
    assert counting.chars < len(text) // 2
    assert not session.engine.requests
