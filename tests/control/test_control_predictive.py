"""The predictive policy and its online models, on synthetic traces and a simulated engine.

The simulated system has latency = 0.01 + 0.002 * experts touched, where experts touched
come from brownout routing at the chosen tau (see simulated_engine.py).
"""

import math

import numpy as np
import pytest

from brownout.config import SLOConfig
from brownout.control import AIMDController, PlannedStep, make_controller
from brownout.control.latency_model import BUCKET_RATIO_MIN_SAMPLES, ExpertsModel, StepLatencyModel
from brownout.control.predictive import PredictiveController
from brownout.control.windows import DECODE, PREFILL
from brownout.types import StepStats
from simulated_engine import FakeClock, simulate

SIM_SLO = dict(decode_step_s=0.1, tpot_s=0.3, prefill_step_s=0.25, ttft_s=2.0)
PHASE_SLO = {True: 0.25, False: 0.1}  # has_prefill -> step SLO


def poisson_phases(seed, phases):
    """Requests of 32-255 prompt and 24-95 output tokens; `phases` = [(seconds, rate)]."""
    rng = np.random.default_rng(seed)
    out, t0 = [], 0.0
    for duration, rate in phases:
        t = t0 + rng.exponential(1 / rate)
        while t < t0 + duration:
            out.append((t, int(rng.integers(32, 256)), int(rng.integers(24, 96))))
            t += rng.exponential(1 / rate)
        t0 += duration
    return out


def run(policy, arrivals, until, seed=0):
    clock = FakeClock()
    ctrl = make_controller(SLOConfig(policy=policy, **SIM_SLO), clock)
    return ctrl, simulate(ctrl, clock, arrivals, until=until, seed=seed)


# -- the models -----------------------------------------------------------------------
def test_latency_model_recovers_coefficients():
    rng = np.random.default_rng(0)
    m = StepLatencyModel()
    for _ in range(300):
        t, b, e = rng.integers(1, 512), rng.integers(1, 64), rng.integers(10, 60)
        r = float(rng.random() < 0.5)
        m.add(t, b, e, 0.005 + 1e-4 * t + 2e-4 * b + 0.002 * e + 0.004 * r + rng.normal(0, 1e-4), r)
    assert m.fit()
    assert m.theta == pytest.approx([0.005, 1e-4, 2e-4, 0.002, 0.004], rel=0.1, abs=3e-4)


def test_latency_model_learns_a_routing_cost_that_fewer_experts_do_not_repay():
    """Routed steps touch fewer experts yet are slower: dimming must not look faster."""
    rng = np.random.default_rng(1)
    m = StepLatencyModel()
    for _ in range(400):
        routed = rng.random() < 0.5
        e = rng.integers(20, 35) if routed else rng.integers(45, 60)
        lat = 0.05 + 0.0002 * e + (0.03 if routed else 0.0) + rng.normal(0, 1e-3)
        m.add(2048, 40, e, lat, float(routed))
    assert m.fit()
    plain, dimmed = m.predict(np.array([[1, 2048, 40, 50, 0.0], [1, 2048, 40, 25, 1.0]]))
    assert dimmed > plain


def test_latency_model_degenerate_data():
    m = StepLatencyModel()
    assert m.predict(np.ones((1, 5))) is None and not m.fit()
    for _ in range(100):  # the same step again and again: features are collinear
        m.add(8, 8, 30, 0.07)
    m.add(8, 8, 30, math.nan)
    m.add(math.inf, 8, 30, 0.07)
    assert m.fit() and np.all(np.isfinite(m.theta)) and np.all(m.theta[1:] >= 0)
    assert m.predict(np.array([[1, 8, 8, 30, 0]]))[0] == pytest.approx(0.07, rel=1e-3)
    # the prior gives expert reads a share of the latency: fewer experts, faster
    assert m.predict(np.array([[1, 8, 8, 10, 0]]))[0] < 0.07


def test_experts_model_monotone_and_learns_ratio():
    m = ExpertsModel()
    assert m.predict([1.0], 16) is None
    for tokens, experts in ((4, 12), (16, 30), (64, 50)):
        for _ in range(5):
            m.update(1.0, tokens, experts)
    assert m.full(16) == pytest.approx(30) and m.full(32) == pytest.approx(40)
    assert 50 < m.full(128) <= 100  # grows past the data, at most linearly
    assert m.full(2) == pytest.approx(6)
    for _ in range(5):
        m.update(0.5, 64, 25)
    grid = np.linspace(0, 1, 11)
    pred = m.predict(grid, 64)
    assert pred[5] == pytest.approx(25) and pred[-1] == pytest.approx(50)
    assert np.all(np.diff(pred) >= 0)
    m.update(0.3, 64, math.nan)  # ignored
    m.update(0.3, 0, 10)  # ignored
    assert np.all(np.isfinite(m.predict(grid, 64)))



def test_experts_ratio_is_learned_per_token_bucket():
    # a handful of tokens keep most of their experts at tau 0, a large step only the united
    # ones: one pooled ratio would price both at their mix
    m = ExpertsModel()
    for tokens, experts in ((4, 12), (1024, 60)):
        for _ in range(5):
            m.update(1.0, tokens, experts)
    for _ in range(5):
        m.update(0.0, 4, 9)  # 0.75 of tau 1
        m.update(0.0, 1024, 15)  # 0.25 of tau 1
    assert m.predict([0.0], 4)[0] == pytest.approx(9)
    assert m.predict([0.0], 1024)[0] == pytest.approx(15)
    assert m.ratio(np.array([0.0]))[0] == pytest.approx(0.5)  # pooled: the mean of both
    assert m.predict([0.0], 64)[0] == pytest.approx(0.5 * m.full(64))  # unseen bucket: pooled
    m.update(0.0, 64, 1.0)  # one step is not enough to replace the pooled ratio
    assert m.predict([0.0], 64)[0] == pytest.approx(m.ratio(np.array([0.0]))[0] * m.full(64))

# -- the controller -------------------------------------------------------------------
def test_behaves_like_aimd_until_it_has_data():
    clock = FakeClock()
    slo = SLOConfig(policy="predictive")
    pred, ref = PredictiveController(slo, clock), AIMDController(slo, clock)
    step = PlannedStep(0, 8, 8)
    for i in range(1, 200):  # no expert counts: the model can never be fitted
        clock.t = i * 0.1
        a, b = pred.choose_tau(step), ref.choose_tau(step)
        assert a == pytest.approx(b)
        for c, tau in ((pred, a), (ref, b)):
            c.observe_step(StepStats(0.0, 0.3, 0, 8, 8, False, tau))
    assert not pred.ready and pred.tau_decode < 1.0


@pytest.mark.parametrize("latency", [math.nan, math.inf, -1.0, 0.0, 0.07])
def test_degenerate_steps_never_crash(latency):
    clock = FakeClock()
    ctrl = make_controller(SLOConfig(policy="predictive", min_tau=0.2), clock)
    for i in range(100):
        clock.t = i * 0.05
        for planned in (PlannedStep(0, 8, 8), PlannedStep(0, 0, 0), PlannedStep(64, 0, 1, 5, 300)):
            tau = ctrl.choose_tau(planned)
            assert 0.2 <= tau <= 1.0 and math.isfinite(tau)
            ctrl.observe_step(StepStats(0.0, latency, planned.num_prefill_tokens,
                                        planned.num_decode_tokens, planned.batch_size,
                                        planned.has_prefill, tau, experts_touched=[30, 30]))
        ctrl.observe_request(math.nan, None, clock.t)
    assert set(ctrl.violations) >= {"prefill_step", "decode_step", "ttft", "tpot"}


def test_step_load_increase_dims_before_violating_and_recovers():
    arrivals = poisson_phases(0, [(30, 1.5), (30, 8.0), (40, 1.5)])
    _, off = run("off", arrivals, 100)
    assert off.violation_windows(PHASE_SLO, 30, 60) >= 10  # the burst really needs dimming
    ctrl, res = run("predictive", arrivals, 100)
    assert res.violation_windows(PHASE_SLO, 0, 100) <= 1
    decode = [(end, lat, tau) for end, lat, pre, tau in res.steps if not pre]
    first_dim = next(end for end, _, tau in decode if tau < 1.0)
    first_late = next((end for end, lat, _ in decode if lat > PHASE_SLO[False]), math.inf)
    first_off_late = next(end for end, lat, pre, _ in off.steps if not pre and lat > 0.1)
    assert 30 < first_dim < first_off_late and first_dim < first_late
    assert min(tau for end, _, tau in decode if 35 < end < 60) <= 0.9  # it dimmed ...
    assert ctrl.tau_decode == 1.0 and ctrl.tau_prefill == 1.0  # ... and gave it all back
    assert res.mean_tau(80, 100) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beats_aimd_on_a_bursty_trace(seed):
    arrivals = poisson_phases(seed, [(20, 2.0), (15, 12.0), (20, 2.0), (15, 12.0), (30, 1.0)])
    _, aimd = run("aimd", arrivals, 100, seed)
    _, pred = run("predictive", arrivals, 100, seed)
    v_aimd, v_pred = aimd.violation_windows(PHASE_SLO), pred.violation_windows(PHASE_SLO)
    assert v_pred < v_aimd
    assert pred.mean_tau() >= aimd.mean_tau()


def test_queue_of_waiting_prompts_dims_prefill():
    """A backlog that cannot drain within the TTFT SLO at tau = 1 lowers the prefill tau."""
    clock = FakeClock()
    ctrl = PredictiveController(SLOConfig(policy="predictive", ttft_s=2.0), clock)
    rng = np.random.default_rng(0)
    for i in range(400):  # explore: random tau and sizes, experts fall with tau
        clock.t = i * 0.05
        tau, tokens = float(rng.choice(np.linspace(0, 1, 11))), int(rng.integers(1, 512))
        experts = min(60.0, 4 * tokens) * (0.25 + 0.75 * tau)
        ctrl.observe_step(StepStats(0.0, 0.01 + 0.002 * experts, tokens, 0, 4, True, tau,
                                    experts_touched=[experts]))
    assert ctrl.ready
    idle = ctrl.choose_tau(PlannedStep(256, 0, 4))
    assert idle == 1.0  # 0.13 s fits the 0.25 s prefill step SLO
    clock.t += 0.001
    backlog = ctrl.choose_tau(PlannedStep(256, 0, 4, num_waiting=20, waiting_tokens=5000))
    assert 0.0 < backlog < 1.0
    # drain estimate at the chosen tau, plus the last prompt's own step, fits the TTFT SLO
    lat = ctrl.predict_latency([backlog], 256, 4, phase=PREFILL)[0]
    assert (5000 / 256 + 1) * lat <= 2.0


def _trained_on_chunks(clock, ttft_s=0.5):
    """A controller fitted on 1024-token prefill steps of 10 ms + 1 ms per expert slot, 60
    slots at tau 1 falling to 15 at tau 0: 70 ms a step at tau 1, 25 ms at tau 0."""
    ctrl = PredictiveController(SLOConfig(policy="predictive", prefill_step_s=1.0, ttft_s=ttft_s), clock)
    rng = np.random.default_rng(0)
    for i in range(200):
        clock.t = i * 0.05
        tau = float(rng.choice(np.linspace(0, 1, 11)))
        experts = 60.0 * (0.25 + 0.75 * tau)
        ctrl.observe_step(StepStats(0.0, 0.01 + 0.001 * experts, 1024, 0, 4, True, tau,
                                    experts_touched=[experts]))
    assert ctrl.ready
    return ctrl


def _chunk_step(queue):
    return PlannedStep(1024, 0, 4, num_waiting=len(queue) - 1, waiting_tokens=1024 * (len(queue) - 1),
                       prefill_queue=tuple(queue))


def test_prompts_that_already_waited_dim_prefill():
    """Each queued prompt's first token is checked against the TTFT SLO from its arrival.
    Two 1024-token prompts (this step's and the next) drain in 2 x 70 ms at tau 1, within
    the 0.475 s budget (0.5 s TTFT less the margin) when they just arrived; when they have
    waited 0.4 s the second has 75 ms left for two steps, which only tau <= 0.25 gives
    (2 x (10 + 60 x (0.25 + 0.75 x 0.25)) = 72.5 ms). The count of waiting tokens alone (the
    check without arrival times) sees a queue that drains at tau 1."""
    clock = FakeClock()
    ctrl = _trained_on_chunks(clock)
    now = clock.t = clock.t + 1.0
    assert ctrl.choose_tau(_chunk_step([(1024, now), (1024, now)])) == 1.0
    clock.t += 0.001
    assert ctrl.choose_tau(PlannedStep(1024, 0, 4, num_waiting=1, waiting_tokens=1024)) == 1.0
    clock.t += 0.001
    tau = ctrl.choose_tau(_chunk_step([(1024, now - 0.4), (1024, now - 0.4)]))
    assert tau == pytest.approx(0.25)


def test_prompts_dimming_cannot_save_or_without_a_deadline_do_not_dim():
    """A prompt that misses its first-token deadline at every tau (it waited too long) is
    left out of the check, and so is one that already has its first token (arrival +inf):
    neither lowers tau, while the prompts behind them are still checked."""
    clock = FakeClock()
    ctrl = _trained_on_chunks(clock)
    now = clock.t = clock.t + 1.0
    assert ctrl.choose_tau(_chunk_step([(1024, now - 1.0), (1024, now)])) == 1.0
    clock.t += 0.001
    assert ctrl.choose_tau(_chunk_step([(1024, math.inf)] * 6 + [(1024, math.inf)])) == 1.0
    clock.t += 0.001
    # the same preempted work ahead of a fresh prompt: 7 steps before its first token, which
    # at 0.475 s needs <= 68 ms a step, so tau comes down a little
    tau = ctrl.choose_tau(_chunk_step([(1024, math.inf)] * 6 + [(1024, clock.t)]))
    assert 0.8 < tau < 1.0


def test_queue_meets_ttft_counts_steps_to_each_first_token():
    """ceil(tokens up to and including a prompt / chunk) steps until its first token, within
    the budget less the time it already waited; a prompt no latency saves is left out."""
    from brownout.control.predictive import queue_meets_ttft
    queue = [(1500, 0.0), (100, 0.0), (500, 0.0)]  # first tokens after 2, 2 and 3 steps
    p90 = np.array([0.3, 0.25, 0.2])
    assert queue_meets_ttft(queue, 1024, p90, now=0.0, budget_s=0.61).tolist() == [False, False, True]
    assert queue_meets_ttft(queue, 1024, p90, now=0.0, budget_s=0.76).tolist() == [False, True, True]
    assert queue_meets_ttft(queue, 1024, p90, now=0.0, budget_s=0.91).tolist() == [True, True, True]
    # the first two waited 0.35 s: two steps must fit in 0.56 s
    waited = [(1500, -0.35), (100, -0.35), (500, 0.0)]
    assert queue_meets_ttft(waited, 1024, p90, now=0.0, budget_s=0.91).tolist() == [False, True, True]
    # the first waited 1 s, past the budget at any latency: left out, the rest still count
    lost = [(1500, -1.0), (100, 0.0), (500, 0.0)]
    assert queue_meets_ttft(lost, 1024, p90, now=0.0, budget_s=0.91).tolist() == [True, True, True]
    assert queue_meets_ttft(lost, 1024, p90, now=0.0, budget_s=0.76).tolist() == [False, True, True]


def test_queue_meets_ttft_counts_later_steps_at_their_own_chunk():
    """A step carrying only a prompt's 32-token tail does not make every later step that
    small: the prompts behind it come at the later steps' chunk."""
    from brownout.control.predictive import queue_meets_ttft
    queue = [(32, 0.0), (96, 0.0)]
    p90 = np.array([0.3, 0.2])
    # at 32 tokens a step the second prompt is 4 steps away (only the faster rung makes
    # it); at 1024 tokens a later step, 2 (both do)
    assert queue_meets_ttft(queue, 32, p90, now=0.0, budget_s=0.91, later_chunk=1024).tolist() == [True, True]
    assert queue_meets_ttft(queue, 32, p90, now=0.0, budget_s=0.91).tolist() == [False, True]


@pytest.mark.parametrize("expert_cost", [0.0, 0.002])
def test_unreachable_slo_dims_only_when_dimming_pays(expert_cost):
    """No tau can meet the step SLO. When fewer experts make the step faster (here in
    proportion to tau) the controller goes down to keep 90% of the speed-up; when they do not
    (a host-bound step) it keeps tau = 1 rather than spend accuracy for nothing."""
    ctrl = _trained_on_unreachable_slo(expert_cost, noise=1e-4)
    tau = ctrl.choose_tau(PlannedStep(1024, 0, 4))
    if expert_cost == 0.0:
        assert tau == 1.0
    else:
        assert 0.05 <= tau <= 0.15


def _trained_on_unreachable_slo(expert_cost, noise=1e-5, seed=3, ratio=lambda tau: 0.25 + 0.75 * tau):
    """A controller fitted on prefill steps that no tau brings under a 10 ms step SLO;
    `ratio(tau)`: experts touched at tau over those at tau 1."""
    clock = FakeClock()
    ctrl = PredictiveController(SLOConfig(policy="predictive", prefill_step_s=0.01, ttft_s=2.0), clock)
    rng = np.random.default_rng(seed)
    for i in range(400):
        clock.t = i * 0.05
        tau, tokens = float(rng.choice(np.linspace(0, 1, 11))), int(rng.integers(256, 2048))
        experts = 60.0 * ratio(tau)
        lat = 0.04 + 1e-6 * tokens + expert_cost * experts + rng.normal(0, noise)
        ctrl.observe_step(StepStats(0.0, lat, tokens, 0, 4, True, tau, experts_touched=[experts]))
    assert ctrl.ready
    return ctrl


def test_small_gain_is_taken_only_with_a_queue():
    """Dimming all the way makes the step ~2% faster. Idle, that is not worth the accuracy
    (tau stays 1); with requests waiting it is 2% more drain rate, so tau goes down."""
    ctrl = _trained_on_unreachable_slo(2e-5)
    assert ctrl.choose_tau(PlannedStep(1024, 0, 4)) == 1.0
    ctrl._clock.t += 0.01
    assert ctrl.choose_tau(PlannedStep(1024, 0, 4, num_waiting=30, waiting_tokens=30000)) <= 0.25


def test_queue_best_effort_stops_at_the_knee():
    """Experts touched fall steeply from tau 1 to 0.5 and barely below (as on a compute-bound
    prefill chunk): with a queue and no tau meeting the SLO, the controller dims to the knee,
    keeping 90% of the available speed-up, instead of spending tau 0.5 -> 0 for ~1% more."""
    ctrl = _trained_on_unreachable_slo(0.002, ratio=_knee)
    lat = ctrl.predict_latency([1.0, 0.5, 0.0], 1024, 4, phase=PREFILL)
    assert lat[0] - lat[1] > 8 * (lat[1] - lat[2]) > 0  # the curve the test means
    tau = ctrl.choose_tau(PlannedStep(1024, 0, 4, num_waiting=30, waiting_tokens=30000))
    assert 0.45 <= tau <= 0.55


@pytest.mark.parametrize("waiting", [0, 12])
def test_ttft_pressure_only_while_requests_wait(waiting):
    """Late first tokens raise the prefill pressure only while a queue exists; with none
    (the window still remembering a drained backlog) it decays."""
    clock = FakeClock()
    ctrl = PredictiveController(SLOConfig(policy="predictive", ttft_s=0.1), clock)
    ctrl._pressure["prefill"] = 0.2
    for i in range(1, 60):
        clock.t = i * 0.1
        ctrl.observe_request(1.0, 0.01, clock.t)  # TTFT 10x its SLO
        tau = ctrl.choose_tau(PlannedStep(64, 0, 4, num_waiting=waiting, waiting_tokens=64 * waiting))
        ctrl.observe_step(StepStats(0.0, 0.01, 64, 0, 4, True, tau, experts_touched=[30]))
    if waiting:
        assert ctrl._pressure["prefill"] == pytest.approx(ctrl.max_pressure)
    else:
        assert ctrl._pressure["prefill"] == 0.0


def test_one_stalled_step_barely_moves_the_prediction():
    """A single step 10x its predicted latency (a host pause) must not inflate the P90 the
    next decisions use; a lasting slowdown must still be learned."""
    ctrl = _trained_on_unreachable_slo(0.002, noise=1e-3)
    planned = PlannedStep(1024, 0, 4)

    def p90_at_1():
        lat = ctrl.predict_latency([1.0], 1024, 4, phase=PREFILL)
        return float(ctrl._p90("prefill", lat)[0])

    ctrl.choose_tau(planned)
    before = p90_at_1()
    pred = ctrl._pending[1]
    ctrl.observe_step(StepStats(0.0, 10 * pred, 1024, 0, 4, True, ctrl.tau_prefill,
                                experts_touched=[60.0 * (0.25 + 0.75 * ctrl.tau_prefill)]))
    assert p90_at_1() < 1.3 * before
    for i in range(200):  # then every step 1.5x slower than the model: followed
        ctrl._clock.t += 0.05
        tau = ctrl.choose_tau(planned)
        experts = 60.0 * (0.25 + 0.75 * tau)
        ctrl.observe_step(StepStats(0.0, 1.5 * (0.04 + 1e-6 * 1024 + 0.002 * experts), 1024, 0, 4, True,
                                    tau, experts_touched=[experts]))
    tau = ctrl.tau_prefill  # the tau it runs at (no tau meets this SLO: best effort)
    lat = float(ctrl._p90("prefill", ctrl.predict_latency([tau], 1024, 4, phase=PREFILL))[0])
    expected = 1.5 * (0.04 + 1e-6 * 1024 + 0.002 * 60.0 * (0.25 + 0.75 * tau))
    assert lat == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("waiting", [0, 30])
def test_a_gain_inside_the_step_noise_is_not_worth_accuracy(waiting):
    """Dimming all the way is predicted ~2 ms faster on ~160 ms steps, but single steps scatter
    by ~10 ms: the controller cannot tell that gain from noise and keeps tau 1, queue or not."""
    ctrl = _trained_on_unreachable_slo(4.4e-5)  # tau 0 saves 60 * 0.75 * 44 us = ~2 ms
    planned = PlannedStep(1024, 0, 4, num_waiting=waiting, waiting_tokens=1000 * waiting)
    assert ctrl.choose_tau(planned) < 1.0  # with steady steps that gain is taken ...
    ctrl._var["prefill"] = 0.01 ** 2  # ... but not when single steps scatter by 10 ms
    lat = ctrl.predict_latency([1.0, 0.0], 1024, 4, phase=PREFILL)
    assert 0 < lat[0] - lat[1] < 0.01  # the case the test means
    ctrl._clock.t += 0.01
    assert ctrl.choose_tau(planned) == 1.0


def _knee(tau):
    """Experts touched at tau over tau 1: steep from tau 1 to 0.5, nearly flat below."""
    return 0.30 + 0.05 * min(tau, 0.5) / 0.5 + 0.65 * max(0.0, tau - 0.5) / 0.5


def _decode_step(tau, batch, rng):
    """A decode step of the simulated system: a fixed cost, per sequence and per expert."""
    experts = 60.0 * _knee(tau)
    lat = 0.015 + 2e-5 * batch + 0.0005 * experts + rng.normal(0, 1e-5)
    return StepStats(0.0, lat, 0, batch, batch, False, tau, experts_touched=[experts])


def _decode_on_a_knee(rng):
    """A controller fitted on decode steps that no tau brings under a 10 ms step SLO, on the
    knee-shaped experts curve of decode in the H200 headline run 14."""
    clock = FakeClock()
    ctrl = PredictiveController(SLOConfig(policy="predictive", decode_step_s=0.01, tpot_s=0.05), clock)
    for i in range(400):
        clock.t = i * 0.05
        tau, batch = float(rng.choice(np.linspace(0, 1, 11))), int(rng.integers(64, 128))
        ctrl.observe_step(_decode_step(tau, batch, rng))
    assert ctrl.ready
    return ctrl


@pytest.mark.parametrize("tpot_late", [False, True])
def test_decode_under_tpot_pressure_takes_the_fastest_tau(tpot_late):
    """Decode best effort stops at the knee while TPOT holds; once the TPOT P90 is over its SLO
    the pressure rises and the knee's last tenth of the speed-up is taken too (tau 0), because
    every decode step's time lands in every running request's TPOT."""
    rng = np.random.default_rng(5)
    ctrl = _decode_on_a_knee(rng)
    planned = PlannedStep(0, 96, 96, num_waiting=20, waiting_tokens=20000)
    clock = ctrl._clock
    for _ in range(30):  # 3 s of requests finishing, at a TPOT over or under its 50 ms SLO
        clock.t += 0.1
        ctrl.observe_request(0.05, 0.08 if tpot_late else 0.02, clock.t)
        ctrl.observe_step(_decode_step(ctrl.choose_tau(planned), 96, rng))
    assert (ctrl._pressure["decode"] > 0) == tpot_late
    clock.t += 0.01
    tau = ctrl.choose_tau(planned)
    if tpot_late:
        assert tau == 0.0
    else:
        assert 0.4 <= tau <= 0.6


# -- one latency fit per phase ----------------------------------------------------------
def _experts(tau, tokens):
    """Distinct experts of a step: grow with its tokens up to 60, fall with tau."""
    return 60.0 * min(1.0, tokens / 100.0) * (0.25 + 0.75 * tau)


def _phase_step(phase, tau, rng):
    """Prefill chunks of ~1000 tokens cost the same at any tau (compute-bound); decode steps
    of 16-128 requests cost in proportion to the experts they read (memory-bound)."""
    if phase == PREFILL:
        tokens, batch = int(rng.integers(900, 1025)), int(rng.integers(2, 17))
        e = _experts(tau, tokens)
        lat = 0.05 + 2e-5 * tokens + rng.normal(0, 1e-4)
        return StepStats(0.0, lat, tokens, 0, batch, True, tau, experts_touched=[e])
    batch = int(rng.integers(16, 129))
    e = _experts(tau, batch)
    return StepStats(0.0, 4e-4 * e + rng.normal(0, 1e-5), 0, batch, batch, False, tau,
                     experts_touched=[e])


def _fed(phases, seed=0):
    clock = FakeClock()
    ctrl = PredictiveController(SLOConfig(policy="predictive", prefill_step_s=1.0,
                                          decode_step_s=1.0, tpot_s=1.0, ttft_s=10.0), clock)
    rng = np.random.default_rng(seed)
    for i, phase in enumerate(phases):
        clock.t = i * 0.01
        ctrl.observe_step(_phase_step(phase, float(rng.choice(np.linspace(0, 1, 11))), rng))
    return ctrl


def _speedup(lat):
    return float(lat[0] / lat[1])  # tau 1 over tau 0


def test_each_phase_is_predicted_by_its_own_latency_law():
    """Three decode steps to one prefill step: the pooled fit takes its expert slope mostly
    from decode and promises prefill a speed-up from dimming; the prefill fit, fed only by
    prefill steps, finds none (prefill_speedup near 1), the decode fit keeps decode's."""
    ctrl = _fed([PREFILL if i % 4 == 0 else DECODE for i in range(800)])
    assert ctrl.latency_model(PREFILL) is ctrl.phase_latency[PREFILL]
    assert ctrl.latency_model(DECODE) is ctrl.phase_latency[DECODE]
    prefill = ctrl.predict_latency([1.0, 0.0], 1000, 8, phase=PREFILL)
    decode = ctrl.predict_latency([1.0, 0.0], 100, 100, phase=DECODE)
    assert prefill == pytest.approx([0.07, 0.07], rel=0.02)
    assert _speedup(decode) == pytest.approx(1.0 / 0.25, rel=0.1)  # latency in proportion to experts
    # the expert slope of prefill is near 0, that of decode near the law's
    assert ctrl.phase_latency[PREFILL].theta[3] < 0.02 * 4e-4
    assert ctrl.phase_latency[DECODE].theta[3] == pytest.approx(4e-4, rel=0.05)
    # the pooled fit would promise prefill a speed-up it does not get
    e = ctrl.experts.predict(np.array([1.0, 0.0]), 1000)
    pooled = ctrl.latency.predict(np.column_stack([np.ones(2), [1000, 1000], [8, 8], e, [0, 1]]))
    assert _speedup(pooled) > 1.1
    ctrl.choose_tau(PlannedStep(1000, 0, 8))
    assert ctrl.tau_prefill == 1.0
    assert ctrl.prefill_speedup() == pytest.approx(1.0, abs=0.01)


def test_a_phase_is_predicted_by_the_pooled_fit_until_it_has_min_samples_and_dimmed_ones():
    ctrl = _fed([DECODE] * 100)
    assert ctrl.ready
    assert ctrl.phase_latency[PREFILL].num_samples == 0
    assert ctrl.latency_model(PREFILL) is ctrl.latency  # no prefill step yet: pooled
    e = ctrl.experts.predict(np.array([1.0]), 1000)[0]
    pooled = ctrl.latency.predict(np.array([[1.0, 1000, 8, e, 0.0]]))
    assert ctrl.predict_latency([1.0], 1000, 8, phase=PREFILL) == pytest.approx(pooled)
    rng = np.random.default_rng(1)
    for _ in range(2 * ctrl.tuning.min_samples):
        ctrl.observe_step(_phase_step(PREFILL, 1.0, rng))
    # fitted on enough steps, but none dimmed: it cannot tell what dimming saves
    assert ctrl.phase_latency[PREFILL].theta is not None
    assert ctrl.latency_model(PREFILL) is ctrl.latency
    assert ctrl.dimmed_share(PREFILL) == 0.0
    i = 0
    while ctrl.dimmed_share(PREFILL) < ctrl.tuning.phase_fit_dimmed_share:
        assert ctrl.latency_model(PREFILL) is ctrl.latency  # too few dimmed steps yet
        ctrl.observe_step(_phase_step(PREFILL, 0.9 - 0.05 * (i % 10), rng))
        i += 1
    # the share counts decayed weights: more dimmed steps than share x steps fed are needed
    assert i > ctrl.tuning.phase_fit_dimmed_share * 2 * ctrl.tuning.min_samples
    assert ctrl.latency_model(PREFILL) is ctrl.phase_latency[PREFILL]
    for _ in range(3 * int(ctrl.tuning.half_life_steps)):  # undimmed again for long: forgotten
        ctrl.observe_step(_phase_step(PREFILL, 1.0, rng))
    assert ctrl.latency_model(PREFILL) is ctrl.latency
    assert ctrl.latency_model(DECODE) is ctrl.phase_latency[DECODE]


def _chunk_never_seen_dimmed():
    """A fitted controller whose 10 ms prefill target no tau meets for a 1024-token chunk (a
    routing cost and a small expert slope), that size seen only at tau 1."""
    clock = FakeClock(10.0)
    ctrl = make_controller(SLOConfig(policy="predictive", prefill_step_s=0.01, tpot_s=1.0,
                                     ttft_s=10.0), clock)
    for tokens, experts in ((4, 100.0), (1024, 1400.0)):
        for _ in range(5):
            ctrl.experts.update(1.0, tokens, experts)
    ctrl.latency.theta = np.array([5e-3, 1.5e-5, 0.0, 1e-6, 2e-3])
    ctrl.latency.num_samples = ctrl.tuning.min_samples
    return ctrl, clock


def test_a_step_size_never_seen_dimmed_is_explored_at_the_fastest_tau():
    # the pooled ratio (decode steps of a few tokens keep 0.9 of their experts at tau 0) and
    # a routing cost make dimming look useless for a 1024-token chunk; no tau meets the
    # target, so the chunk runs at tau 0 until its own bucket's ratio is known
    ctrl, clock = _chunk_never_seen_dimmed()
    for _ in range(5):
        ctrl.experts.update(0.0, 4, 90.0)
    step = PlannedStep(1024, 0, 1)
    explored = 0
    for _ in range(10):
        tau = ctrl.choose_tau(step)
        if tau == 0.0:
            explored += 1
            ctrl.experts.update(0.0, 1024, 420.0)  # what the step touched: 0.3 of tau 1
        clock.t += 0.01
    assert explored == BUCKET_RATIO_MIN_SAMPLES  # then the bucket's own ratio is known
    assert ctrl.experts.predict([0.0], 1024)[0] == pytest.approx(420.0)
    small = PlannedStep(4, 0, 1)  # a size whose ratio is known: best effort, no exploring
    ctrl.choose_tau(small)
    assert ctrl._mode != "explore"


def test_exempt_steps_neither_explore_nor_teach_the_experts_ratio():
    ctrl, clock = _chunk_never_seen_dimmed()
    ctrl.choose_tau(PlannedStep(1024, 0, 1, exempt=True))
    assert ctrl._mode != "explore"
    ctrl.observe_step(StepStats(start_time=clock(), latency_s=0.02, num_prefill_tokens=1024,
                                num_decode_tokens=0, batch_size=1, has_prefill=True, tau=0.0,
                                experts_touched=[1400], exempt_tokens=1024))
    assert not ctrl.experts.bucket_known(1024, 0.0)
    assert ctrl.choose_tau(PlannedStep(1024, 0, 1)) == 0.0 and ctrl._mode == "explore"
