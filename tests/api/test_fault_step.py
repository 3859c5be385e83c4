"""Fault isolation in the engine: a step whose launch or collect raises ends its own requests
with finish reason "error" (a 500 for them over HTTP) and frees their KV blocks; the other
requests go on and the engine process lives. Faults are injected by `FaultyEngine`, an engine
factory (`--engine-factory test_fault_step:FaultyEngine`) whose runner raises for requests
carrying one of the seeds below."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import metric_value, start_server

from brownout.config import EngineConfig, ModelLoadConfig, SchedulerConfig
from brownout.engine.llm_engine import MAX_CONSECUTIVE_STEP_FAILURES, LLMEngine
from brownout.engine.worker import AddCommand, WorkerOptions, _Session
from brownout.types import EngineBrokenError, FinishReason, SamplingParams

# Launching a step that holds a request with this seed raises.
POISON_SEED = 9_000_001
# Collecting a step in which a request with this seed has 2 or more output tokens raises.
LATE_POISON_SEED = 9_000_002
PROMPT = [5, 6, 7, 8, 9]


class InjectedFault(RuntimeError):
    pass


class FaultyRunner:
    """The engine's runner, raising in `launch` or `collect` for the poisoned seeds."""

    def __init__(self, runner):
        self._runner = runner

    def launch(self, sched, tau: float = 1.0, prev=None):
        if any(s.sampling.seed == POISON_SEED for s in sched.seqs):
            raise InjectedFault("launch")
        return self._runner.launch(sched, tau, prev)

    def collect(self, pending):
        out = self._runner.collect(pending)
        if any(s.sampling.seed == LATE_POISON_SEED and s.output_len >= 2 for s in pending.sched.seqs):
            raise InjectedFault("collect")
        return out

    def __getattr__(self, name: str):
        return getattr(self._runner, name)


class FaultyEngine(LLMEngine):
    def __init__(self, config: EngineConfig, clock=time.monotonic):
        super().__init__(config, clock)
        self.runner = FaultyRunner(self.runner)


def make_engine(model, max_num_seqs: int) -> FaultyEngine:
    return FaultyEngine(EngineConfig(load=ModelLoadConfig(model=str(model), device="cpu"),
                                     scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)))


def params(seed=None, max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, seed=seed)


def run_all(engine: LLMEngine, max_steps: int = 200) -> dict:
    """Step until idle; the last output of each request."""
    last = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return last
        for out in engine.step():
            if out.finished:
                last[out.request_id] = out
    raise AssertionError("engine did not finish its requests")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import make_tiny_checkpoint

    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("fault") / "tiny-moe")


def test_failed_launch_ends_only_its_requests(tiny):
    engine = make_engine(tiny, max_num_seqs=1)  # one request per step
    engine.add_request("before", PROMPT, params())
    engine.add_request("poison", PROMPT, params(POISON_SEED))
    engine.add_request("after", PROMPT, params())
    last = run_all(engine)
    assert last["poison"].finish_reason == FinishReason.ERROR and not last["poison"].output_token_ids
    for rid in ("before", "after"):
        assert last[rid].finish_reason == FinishReason.LENGTH and len(last[rid].output_token_ids) == 6
    assert engine.blocks.usage == 0.0 and not engine.requests


def test_failed_collect_ends_the_step_requests_and_the_rest_go_on(tiny):
    engine = make_engine(tiny, max_num_seqs=2)
    engine.add_request("late", PROMPT, params(LATE_POISON_SEED))
    engine.add_request("same-step", PROMPT, params())
    engine.add_request("queued", PROMPT, params())  # waits for a slot: not in the failed step
    last = run_all(engine)
    for rid in ("late", "same-step"):
        assert last[rid].finish_reason == FinishReason.ERROR
        assert len(last[rid].output_token_ids) == 2  # the tokens sent before the failed step
    assert last["queued"].finish_reason == FinishReason.LENGTH
    assert engine.blocks.usage == 0.0 and not engine.requests


def test_steps_failing_in_a_row_mean_the_engine_is_broken(tiny):
    engine = make_engine(tiny, max_num_seqs=1)
    for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
        engine.add_request(f"p{i}", PROMPT, params(POISON_SEED))
    with pytest.raises(EngineBrokenError):
        run_all(engine)


class ListQueue(list):
    put = list.append


def test_worker_ends_every_request_when_a_step_fails_outside_launch_and_collect(tiny, monkeypatch):
    engine = make_engine(tiny, max_num_seqs=4)
    session = _Session(engine, WorkerOptions(), ListQueue())
    for rid in ("a", "b"):
        session.add(AddCommand(rid, PROMPT, None, params(), time.monotonic()))
    schedule = engine.scheduler.schedule
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: (_ for _ in ()).throw(InjectedFault()))
    session.step()
    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    packed = session.out_q[-1][2]
    assert {p.request_id: p.finish_reason for p in packed} == {"a": FinishReason.ERROR,
                                                               "b": FinishReason.ERROR}
    assert not engine.requests and engine.blocks.usage == 0.0
    session.add(AddCommand("c", PROMPT, None, params(max_tokens=2), time.monotonic()))
    assert run_all(engine)["c"].finish_reason == FinishReason.LENGTH


def test_failed_add_leaves_no_request_behind(tiny, monkeypatch):
    engine = make_engine(tiny, max_num_seqs=4)
    session = _Session(engine, WorkerOptions(), ListQueue())
    monkeypatch.setattr(session, "token_text", lambda t: (_ for _ in ()).throw(InjectedFault()))
    session.add(AddCommand("echo", PROMPT, None, params(), time.monotonic(), want_prompt_text=True))
    kind, rid, err = session.out_q[-1]
    assert (kind, rid, err.kind) == ("add_error", "echo", "internal")
    assert not engine.requests and not engine.has_unfinished_requests()


# ---------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--max-num-seqs", "1", "--engine-factory", "test_fault_step:FaultyEngine"],
                       tmp_path_factory)
    yield srv
    srv.stop()


def body(seed=None, stream=False, max_tokens=8) -> dict:
    b = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
         "temperature": 0, "stream": stream}
    return b if seed is None else {**b, "seed": seed}


def test_http_a_failed_step_is_a_500_for_its_request_only(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(http.post("/v1/completions", json=body()),
                                        http.post("/v1/completions", json=body(POISON_SEED)),
                                        http.post("/v1/completions", json=body()))

    ok1, bad, ok2 = asyncio.run(go())
    assert ok1.status_code == 200 and ok2.status_code == 200, (ok1.text, ok2.text)
    assert ok1.json()["usage"]["completion_tokens"] == 8
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error", bad.text
    metrics = httpx.get(server.url + "/metrics").text
    assert metric_value(metrics, "vllm:request_success_total", {"finished_reason": "error"}) >= 1
    assert metric_value(metrics, "brownout_engine_restarts_total") == 0
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "restarts": 0}


def test_http_streams_refused_or_ended_by_a_failed_step(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/v1/completions", json=body(POISON_SEED, stream=True))
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        with http.stream("POST", "/v1/completions", json=body(LATE_POISON_SEED, stream=True)) as r:
            assert r.status_code == 200
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "internal_error"
        assert sum(1 for e in events[:-2] if json.loads(e)["choices"][0]["text"] is not None) >= 1
        assert http.post("/v1/completions", json=body()).status_code == 200
