"""SLO-aware admission: requests whose first token cannot come within the TTFT SLO are
refused at arrival (429 + Retry-After through the API); the others are served in full."""

import argparse

import pytest

from brownout.api.launch import add_arguments, build_configs
from brownout.config import EngineConfig, ModelLoadConfig, SchedulerConfig, SLOConfig
from brownout.engine.admission import (PrefillRate, SlotRate, WaitFeedback, admission_wait,
                                      refuse_for, slot_wait)
from brownout.engine.llm_engine import LLMEngine
from brownout.types import AdmissionError, SamplingParams, ValidationError

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_prefill_rate_counts_only_budget_bound_steps():
    rate = PrefillRate(window=4, min_steps=2)
    rate.observe(900, 0.02, queue_left=True)
    assert rate.tokens_per_s is None  # too few steps to say
    rate.observe(100, 0.02, queue_left=False)  # no queue: a partial step, not the capacity
    rate.observe(0, 0.01, queue_left=True)  # a decode-only step says nothing about prefill
    assert rate.tokens_per_s is None
    rate.observe(700, 0.02, queue_left=True)
    assert rate.tokens_per_s == pytest.approx(1600 / 0.04)
    for _ in range(4):  # the window forgets old steps (e.g. before the controller dimmed)
        rate.observe(1000, 0.01, queue_left=True)
    assert rate.tokens_per_s == pytest.approx(1e5)


def test_wait_and_retry_after():
    assert admission_wait(900, 100, None) is None  # unknown rate: admit
    assert admission_wait(900, 100, 1e4) == pytest.approx(0.1)
    assert admission_wait(900, 100, 1e4, step_s=0.02) == pytest.approx(0.12)  # the step in flight
    # time already spent between the server's arrival stamp and the check counts too
    assert admission_wait(900, 100, 1e4, step_s=0.02, elapsed_s=0.03) == pytest.approx(0.15)
    assert refuse_for(None, 0.1) is None
    assert refuse_for(0.1, 0.1) is None
    assert refuse_for(0.11, 0.1) == 1.0  # at least a second
    assert refuse_for(3.4, 0.2) == 4.0  # the queue's drain time past the limit, rounded up


def test_wait_feedback_is_the_p90_of_recent_errors_and_bounded():
    fb = WaitFeedback(window=20, min_samples=10)
    for i in range(9):
        fb.observe(0.1, 0.1 + 0.001 * i)
    assert fb.margin(0.2) == 0.0  # too few first tokens to say
    fb.observe(0.1, 0.109)  # errors 0..9 ms
    assert fb.margin(0.2) == pytest.approx(0.0081)  # numpy's P90 of 0..9 ms
    for _ in range(20):  # the window forgets: now every prediction is 50 ms short
        fb.observe(0.05, 0.1)
    assert fb.margin(0.2) == pytest.approx(0.05)
    for _ in range(20):  # a stall: capped at half the limit, so a short queue still gets in
        fb.observe(0.05, 5.0)
    assert fb.margin(0.2) == pytest.approx(0.1)
    assert refuse_for(0.09 + fb.margin(0.2), 0.2) is None
    for _ in range(20):  # predictions far too pessimistic: opens by at most half the limit
        fb.observe(1.0, 0.01)
    assert fb.margin(0.2) == pytest.approx(-0.1)
    fb.observe(float("nan"), 0.1)  # ignored
    assert fb.margin(0.2) == pytest.approx(-0.1)


def _engine(tiny_models, factor):
    return LLMEngine(EngineConfig(
        load=ModelLoadConfig(model=str(tiny_models["qwen2_moe"]), device="cpu"),
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, admission_ttft_factor=factor),
        slo=SLOConfig(ttft_s=0.1)))


def test_engine_refuses_what_cannot_meet_ttft_and_serves_the_rest(tiny_models):
    eng = _engine(tiny_models, factor=1.0)
    eng.add_request("early", list(range(3, 60)), PARAMS)  # no measured rate yet: admitted
    for _ in range(4):  # as if the engine had run four full steps at 1000 prompt tokens/s
        eng.admission.prefill_rate.observe(100, 0.1, queue_left=True)
    eng.admission.step_time_s = 0.005  # plus a 5 ms step in flight
    # 57 tokens ahead + 30 = 87 ms at 1000 tokens/s + 5 ms: within the 100 ms limit
    eng.add_request("fits", list(range(3, 33)), PARAMS)
    with pytest.raises(AdmissionError) as refused:  # 87 + 10 tokens + 5 ms = 102 ms > 100 ms
        eng.add_request("late", list(range(3, 13)), PARAMS)
    assert refused.value.retry_after_s >= 1.0
    assert "TTFT SLO" in str(refused.value)
    assert "late" not in eng.requests and eng.admission.num_refused_slo == 1
    assert eng.snapshot()["num_refused_slo_total"] == 1
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
    assert sorted(done) == ["early", "fits"] and all(len(t) == 4 for t in done.values())


def test_without_the_factor_everything_queues(tiny_models):
    eng = _engine(tiny_models, factor=None)
    for _ in range(4):
        eng.admission.prefill_rate.observe(100, 0.1, queue_left=True)
    for i in range(5):
        eng.add_request(f"r{i}", list(range(3, 60)), PARAMS)
    assert len(eng.requests) == 5 and eng.admission.num_refused_slo == 0


def test_flag_is_validated():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg, _ = build_configs(parser.parse_args(["--admission-ttft-factor", "2", "--slo-ttft", "0.5"]))
    assert cfg.scheduler.admission_ttft_factor == 2.0 and cfg.slo.ttft_s == 0.5
    with pytest.raises(ValidationError) as err:
        build_configs(parser.parse_args(["--admission-ttft-factor", "0"]))
    assert err.value.field == "admission_ttft_factor"


def test_limit_counts_the_speed_up_dimming_would_give(tiny_models):
    """With a controller that predicts a 2x faster prefill at its lowest tau, the queue may hold
    twice the work before requests are refused: brownout is spent before load is shed."""
    eng = _engine(tiny_models, factor=1.0)
    for _ in range(4):
        eng.admission.prefill_rate.observe(100, 0.1, queue_left=True)
    eng.controller.prefill_speedup = lambda: 2.0
    eng.admission.step_time_s = 0.0
    eng.add_request("a", list(range(3, 60)), PARAMS)
    eng.add_request("b", list(range(3, 60)), PARAMS)
    eng.add_request("c", list(range(3, 60)), PARAMS)  # 171 tokens at 2000 tokens/s: 86 ms
    with pytest.raises(AdmissionError):
        eng.add_request("d", list(range(3, 60)), PARAMS)  # 228 tokens: 114 ms


def test_predictive_speed_up_comes_from_its_model():
    import numpy as np

    from brownout.control import PlannedStep
    from brownout.control.predictive import PredictiveController
    from brownout.types import StepStats

    clock = type("C", (), {"t": 0.0, "__call__": lambda self: self.t})()
    ctrl = PredictiveController(SLOConfig(policy="predictive", prefill_step_s=1.0, ttft_s=10.0), clock)
    assert ctrl.prefill_speedup() == 1.0  # not fitted yet: no claim
    rng = np.random.default_rng(0)
    for i in range(200):  # latency = 10 ms + 1 ms per expert slot; slots fall with tau
        clock.t = i * 0.05
        tau = float(rng.choice(np.linspace(0, 1, 11)))
        experts = 60.0 * (0.25 + 0.75 * tau)
        ctrl.observe_step(StepStats(0.0, 0.01 + 0.001 * experts, 1024, 0, 4, True, tau,
                                    experts_touched=[experts]))
    ctrl.choose_tau(PlannedStep(1024, 0, 4))  # tau 1: the SLO holds
    assert ctrl.tau_prefill == 1.0
    assert ctrl.prefill_speedup() == pytest.approx(70 / 25, rel=0.1)  # (10 + 60) / (10 + 15) ms


def test_first_tokens_correct_later_predictions(tiny_models):
    """The closed loop: admitted requests whose first tokens come later than predicted raise
    the margin, and a request that fitted before is then refused."""
    eng = _engine(tiny_models, factor=1.0)
    t = [100.0]
    eng.clock = lambda: t[0]
    for _ in range(4):  # 1000 prompt tokens/s
        eng.admission.prefill_rate.observe(100, 0.1, queue_left=True)
    eng.admission.step_time_s = 0.0
    eng.add_request("probe", list(range(3, 63)), PARAMS)  # 60 tokens: predicted 60 ms
    assert eng.requests["probe"].predicted_wait_s == pytest.approx(0.06)
    fb = eng.admission.wait_feedback
    for _ in range(fb.min_samples - 1):  # earlier requests came 30 ms later than predicted
        fb.observe(0.05, 0.08)
    t[0] += 0.09  # "probe" gets its first token 90 ms after arrival: 30 ms late too
    while eng.requests["probe"].metrics.first_token_time is None:
        eng.step()
    assert fb.margin(0.1) == pytest.approx(0.03)
    assert eng.snapshot()["admission_margin_s"] == pytest.approx(0.03)
    eng.abort_request("probe")
    eng.add_request("a", list(range(3, 63)), PARAMS)  # 60 ms + 30 ms: fits under 100 ms
    with pytest.raises(AdmissionError):  # 60 + 20 ms + 30 ms = 110 ms: refused
        eng.add_request("b", list(range(3, 23)), PARAMS)  # (admitted without the margin)


def test_time_since_arrival_counts(tiny_models):
    eng = _engine(tiny_models, factor=1.0)
    t = [50.0]
    eng.clock = lambda: t[0]
    for _ in range(4):
        eng.admission.prefill_rate.observe(100, 0.1, queue_left=True)
    eng.admission.step_time_s = 0.0
    eng.add_request("fresh", list(range(3, 53)), PARAMS, arrival_time=50.0)  # 50 ms: admitted
    eng.abort_request("fresh")
    with pytest.raises(AdmissionError):  # the same prompt, stamped 60 ms ago by the server
        eng.add_request("stale", list(range(3, 53)), PARAMS, arrival_time=49.94)


def test_slot_rate_and_wait():
    rate = SlotRate(window_s=2.0, min_events=3)
    rate.observe(10.0)
    rate.observe(10.5)
    assert rate.per_s(11.0) is None  # too few to say
    rate.observe(11.0)
    rate.observe(11.5)
    assert rate.per_s(11.5) == pytest.approx(4 / 2.0)
    assert rate.per_s(12.6) is None  # 10.0 and 10.5 left the window: two remain
    assert slot_wait(0, 1, 2.0) == 0.0  # a slot is free for it
    assert slot_wait(3, 4, 2.0) == 0.0  # free slots for the queue and for it
    assert slot_wait(3, 0, 2.0) == pytest.approx(2.0)  # 3 ahead + itself at 2 slots/s
    assert slot_wait(3, 0, None) == 0.0  # no rate: nothing to go on
    # the slot comes before its prefill; prompt work ahead still bounds it below
    assert admission_wait(0, 100, 1e4, slot_wait_s=0.05) == pytest.approx(0.06)
    assert admission_wait(900, 100, 1e4, slot_wait_s=0.05) == pytest.approx(0.1)


def test_full_slots_refuse_what_would_wait_too_long(tiny_models):
    """Both sequence slots are taken by long decodes and slots free at 20 per second: a new
    request waits 50 ms per slot that must free before it gets one, however short its prompt.
    The second one in line is refused, which counting prompt tokens alone would admit."""
    eng = _engine(tiny_models, factor=1.0)
    t = [10.0]
    eng.clock = lambda: t[0]
    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    eng.add_request("d1", list(range(3, 8)), long)
    eng.add_request("d2", list(range(3, 8)), long)
    eng.step()
    eng.step()  # both prefilled and decoding: no free slot
    assert len(eng.scheduler.running) == 2
    for _ in range(4):  # 10000 prompt tokens/s: a 5-token prompt alone waits 0.5 ms
        eng.admission.prefill_rate.observe(1000, 0.1, queue_left=True)
    eng.admission.step_time_s = 0.0
    eng.admission.slot_rate = SlotRate(window_s=0.8, min_events=4)
    for i in range(16):  # 16 requests finished in the last 0.8 s: 20 slots/s
        eng.admission.slot_rate.observe(t[0] - 0.05 * i)
    eng.add_request("w1", list(range(3, 8)), PARAMS)  # one slot to free: 50 ms
    assert eng.requests["w1"].predicted_wait_s == pytest.approx(0.0505)
    assert eng.snapshot()["admission_slot_wait_s"] == pytest.approx(0.1)  # behind w1 now
    with pytest.raises(AdmissionError) as refused:  # two slots: 100.5 ms > 100 ms
        eng.add_request("w2", list(range(3, 8)), PARAMS)
    assert refused.value.retry_after_s >= 1.0
    assert admission_wait(10, 5, 1e4) < 0.1  # prompt tokens alone: ~1.5 ms
    eng.abort_request("d1")  # a slot frees: w1 takes it, and one more fits behind
    eng.add_request("w2", list(range(3, 8)), PARAMS)
    assert "w2" in eng.requests


def test_the_planned_step_carries_the_prompts_left_to_prefill(tiny_models):
    """The engine hands the controller each prompt still to prefill with its arrival time
    (the first-token check that keeps admission's credit of dimming), in the order they
    are served, this step's chunk counted."""
    eng = _engine(tiny_models, factor=None)
    eng.add_request("a", list(range(3, 103)), PARAMS, arrival_time=5.0)  # 100 tokens
    eng.add_request("b", list(range(3, 23)), PARAMS, arrival_time=6.0)  # 20 tokens
    sched = eng.scheduler.schedule()  # a 64-token chunk of "a"; "b" waits (2 slots, budget spent)
    assert eng._planned(sched).prefill_queue == ((100, 5.0), (20, 6.0))
