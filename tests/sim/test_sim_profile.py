"""Step-cost profiles: the fit recovers known coefficients, routing estimates, the shipped profile."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from brownout.sim.profile import (FEATURES, PhaseModel, RoutingShape, StepCostProfile, StepShape,
                                  fit_phase, load_profile, pad_to, step_features)

ROUTING = RoutingShape()
KNOWN = {"one": 3.5, "ktokens": 4.0, "batch": 0.02, "kctx": 0.07, "experts": 0.09, "routed": 0.4,
         "kexpert": 5.0}


def _synthetic(rng, n=80):
    rows, shapes = [], []
    for _ in range(n):
        T = int(rng.integers(1, 2048))
        B = int(rng.integers(1, min(T, 128) + 1))
        shape = StepShape(T, B, int(rng.integers(T, 200_000)), True)
        tau = float(rng.choice([0.0, 0.3, 0.7, 1.0]))
        top_k = [None, 1, 2, 3][int(rng.integers(4))]  # shed steps separate kexpert from ktokens
        rows.append(step_features(shape, tau, ROUTING, top_k=top_k))
        shapes.append((shape, tau))
    return rows, shapes


def test_fit_recovers_known_coefficients_without_noise():
    rows, _ = _synthetic(np.random.default_rng(0))
    y = [sum(KNOWN[f] * r[f] for f in FEATURES) for r in rows]
    model = fit_phase(rows, y, FEATURES, ridge=1e-12)
    for f in FEATURES:
        assert model.coef[f] == pytest.approx(KNOWN[f], rel=1e-4, abs=1e-6)
    assert max(abs(r) for r in model.residuals) < 1e-6


def test_fit_with_noise_predicts_within_the_noise_and_keeps_it():
    rng = np.random.default_rng(1)
    rows, _ = _synthetic(rng, 400)
    noise = 1 + rng.normal(0, 0.03, len(rows))
    y = [sum(KNOWN[f] * r[f] for f in FEATURES) * e for r, e in zip(rows, noise)]
    model = fit_phase(rows, y, FEATURES)
    for r in rows[:20]:
        truth = sum(KNOWN[f] * r[f] for f in FEATURES)
        assert model.mean_ms(r) == pytest.approx(truth, rel=0.03)
    assert np.std(model.residuals) == pytest.approx(0.03, rel=0.25)


def test_kexpert_is_the_kept_share_of_the_tokens():
    shape = StepShape(1000, 4, 4000, True)
    assert step_features(shape, 1.0, ROUTING)["kexpert"] == pytest.approx(1.0)
    assert step_features(shape, 1.0, ROUTING, top_k=2)["kexpert"] == pytest.approx(0.5)
    # exempt tokens keep the model's k: 200 at k, 800 at k' = 1 of 4
    assert step_features(shape, 0.0, ROUTING, top_k=1, exempt_tokens=200)["kexpert"] == \
        pytest.approx((200 + 800 * 0.25) / 1000)


@given(st.integers(1, 4096))
def test_experts_touched_is_between_the_united_groups_and_all_experts(T):
    full, none = ROUTING.experts_touched(T, 1.0), ROUTING.experts_touched(T, 0.0)
    assert full == pytest.approx(60 * (1 - (1 - 4 / 60) ** T))
    assert none <= 60 // 4 + 1e-9 and none <= full
    assert none <= ROUTING.experts_touched(T, 0.5) <= full


def test_experts_touched_matches_the_measured_decode_steps():
    # graphed decode steps on the H200 (engine results): batch 8 / 64 touch 24.7 / 59.3 at tau 1
    assert ROUTING.experts_touched(8, 1.0) == pytest.approx(24.7, abs=1.0)
    assert ROUTING.experts_touched(64, 1.0) == pytest.approx(59.3, abs=1.0)
    assert ROUTING.experts_touched(64, 0.0) == pytest.approx(15.0, abs=0.5)


@given(st.integers(1, 3000))
def test_padding_picks_the_smallest_bucket_that_holds_the_step(n):
    buckets = [1, 2, 4, 8, 16, 32, 64, 128]
    b = pad_to(n, buckets)
    assert b >= n
    assert b == n or b in buckets and all(x < n for x in buckets if x < b)


def _profile(residuals=()):
    coef = dict(one=4.0, batch=0.02, kctx=0.05, experts=0.1, routed=0.4)
    return StepCostProfile("test", "2026-01-01", {
        "decode": PhaseModel(coef, list(residuals)),
        "prefill": PhaseModel(dict(coef, ktokens=9.0), list(residuals))})


def test_dimming_makes_a_decode_step_faster_and_noise_draws_from_the_residuals():
    p = _profile([-0.1, 0.1])
    shape = StepShape(64, 64, 64 * 600, False)
    assert p.step_latency_s(shape, 0.0) < p.step_latency_s(shape, 1.0)
    mean = p.step_latency_s(shape, 1.0)
    rng = np.random.default_rng(0)
    draws = {round(p.step_latency_s(shape, 1.0, rng) / mean, 6) for _ in range(50)}
    assert draws == {0.9, 1.1}


def test_profile_json_round_trip(tmp_path):
    p = _profile([0.01])
    p.graph_buckets = {"decode_batch": [1, 8], "prefill_tokens": [64]}
    p.save(tmp_path / "p.json")
    q = load_profile(tmp_path / "p.json")
    assert q.to_json() == p.to_json()


def test_the_shipped_h200_profile_states_machine_date_and_sources():
    p = load_profile("h200")
    assert "H200" in p.machine and p.date and p.sources
    assert all(math.isfinite(v) for m in p.phases.values() for v in m.coef.values())
    full = StepShape(128, 128, 128 * 1000, False)
    assert 0.005 < p.step_latency_s(full, 1.0) < 0.05  # a batch-128 decode step: ~10-20 ms
    assert p.step_latency_s(full, 0.0) < p.step_latency_s(full, 1.0)


# ---- bound expert work, the kept curve, prompt routing, serving time ------------------------

BOUND_KNOWN = {"one": 4.0, "ktokens": 8.0, "batch": 0.01, "kctx": 0.03, "routed": 0.2,
               "experts": 0.1, "kexpert": 3.0}


def _bound_truth(r):
    summed = sum(BOUND_KNOWN[f] * r[f] for f in ("one", "ktokens", "batch", "kctx", "routed"))
    return summed + max(BOUND_KNOWN["experts"] * r["experts"], BOUND_KNOWN["kexpert"] * r["kexpert"])


def test_bound_fit_recovers_known_coefficients_of_the_max_form():
    rows, _ = _synthetic(np.random.default_rng(2), 300)
    y = [_bound_truth(r) for r in rows]
    # both terms bind somewhere: weight reads for small steps, arithmetic for large ones
    binds = {BOUND_KNOWN["experts"] * r["experts"] > BOUND_KNOWN["kexpert"] * r["kexpert"] for r in rows}
    assert binds == {True, False}
    model = fit_phase(rows, y, FEATURES, ridge=1e-12, bound=("experts", "kexpert"))
    assert model.bound == ("experts", "kexpert")
    for f in FEATURES:
        assert model.coef[f] == pytest.approx(BOUND_KNOWN[f], rel=1e-3, abs=1e-5)
    assert max(abs(r) for r in model.residuals) < 1e-6
    assert model.mean_ms(rows[0]) == pytest.approx(_bound_truth(rows[0]))


def test_a_summed_fit_of_max_form_steps_misses_where_the_bound_fit_does_not():
    rows, _ = _synthetic(np.random.default_rng(3), 300)
    y = [_bound_truth(r) for r in rows]
    summed = fit_phase(rows, y, FEATURES)
    bound = fit_phase(rows, y, FEATURES, bound=("experts", "kexpert"))
    assert np.sqrt(np.mean(np.square(bound.residuals))) < 0.1 * np.sqrt(np.mean(np.square(summed.residuals)))


CURVED = RoutingShape(curve_taus=(0.0, 0.5, 1.0), curve_prompt_shares=(0.0, 1.0),
                      kept_curve=((0.0, 0.5, 1.0), (0.0, 0.1, 1.0)))


def test_the_kept_curve_interpolates_in_tau_and_prompt_share():
    assert CURVED.kept(0.5, 0.0) == pytest.approx(0.5)
    assert CURVED.kept(0.5, 1.0) == pytest.approx(0.1)
    assert CURVED.kept(0.5, 0.5) == pytest.approx(0.3)
    assert CURVED.kept(0.75, 1.0) == pytest.approx(0.55)
    assert RoutingShape().kept(0.3, 1.0) == pytest.approx(0.3)  # no curve: tau itself


@given(st.integers(2, 2048), st.floats(0.0, 1.0))
def test_a_prompt_heavy_step_keeps_fewer_experts_at_the_same_tau(T, tau):
    full, none = CURVED.experts_touched(T, 1.0, prompt_share=1.0), CURVED.experts_touched(T, 0.0, prompt_share=1.0)
    prompt = CURVED.experts_touched(T, tau, prompt_share=1.0)
    assert none - 1e-9 <= prompt <= full + 1e-9
    assert prompt <= CURVED.experts_touched(T, tau, prompt_share=0.0) + 1e-9


def test_a_prompt_chunk_routes_like_fewer_tokens_of_different_sequences():
    r = RoutingShape(prompt_scale=1.5, prompt_exponent=0.3)
    chunk = StepShape(1024, 1, 1024, True)
    assert chunk.num_prompt_seqs == 1 and chunk.prompt_share == 1.0
    assert r.effective_tokens(1024, 1.0, 1) == pytest.approx(1.5 * 1024 ** 0.3)
    # the same tokens in 64 chunks spread wider, and decodes count one each
    assert r.effective_tokens(1024, 1.0, 64) > r.effective_tokens(1024, 1.0, 1)
    assert r.effective_tokens(100, 0.0, 0) == 100
    one = step_features(chunk, 1.0, r)["experts"]
    assert one == pytest.approx(60 * (1 - (1 - 4 / 60) ** (1.5 * 1024 ** 0.3)))
    assert one < step_features(StepShape(1024, 1024, 1024, False), 1.0, r)["experts"]


def test_serving_time_adds_to_the_factor_and_survives_json(tmp_path):
    p = _profile()
    p.phases["decode"].serving_ms = 2.0
    p.phases["decode"].serving_factor = 0.5
    p.phases["prefill"].bound = ("experts", "ktokens")
    p.routing = CURVED
    p.request_s_per_running = 1e-4
    shape = StepShape(64, 64, 64 * 600, False)
    raw = p.phases["decode"].raw_ms(step_features(shape, 1.0, p.routing))
    assert p.step_latency_s(shape, 1.0) == pytest.approx((0.5 * raw + 2.0) / 1000)
    assert p.request_out(100) == pytest.approx(p.request_out_s + 0.01)
    p.save(tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").to_json() == p.to_json()




def test_the_fit_script_recovers_a_known_prompt_routing_and_kept_curve(tmp_path, fit_script):
    fit = fit_script
    truth = RoutingShape(curve_taus=(0.0, 0.5, 1.0), curve_prompt_shares=fit.PROMPT_SHARE_KNOTS,
                         kept_curve=tuple((0.0, 0.5 - 0.4 * s, 1.0) for s in fit.PROMPT_SHARE_KNOTS),
                         prompt_scale=1.7, prompt_exponent=0.3)
    rows = []
    for chunk in (16, 64, 256, 1024):
        for decodes in (1, 15, 63):
            shape = StepShape(chunk + decodes, decodes + 1, chunk + decodes * 513, True)
            for tau in (0.0, 0.5, 1.0):
                e = truth.experts_touched(shape.num_tokens, tau, None, shape.prompt_share, 1)
                rows.append({"phase": "prefill", "tokens": shape.num_tokens, "batch": shape.batch_size,
                             "context_tokens": shape.context_tokens, "tau": tau, "top_k": None,
                             "step_ms": 1.0, "experts_touched_mean": e})
    path = tmp_path / "grid.json"
    path.write_text(__import__("json").dumps({"meta": {}, "rows": rows}))
    got = fit.kept_curve(path, RoutingShape())
    assert got.prompt_scale == pytest.approx(1.7, rel=0.05)
    assert got.prompt_exponent == pytest.approx(0.3, rel=0.05)
    for tau in (0.0, 0.5, 1.0):
        for share in (0.2, 0.6, 0.95):
            assert got.kept(tau, share) == pytest.approx(truth.kept(tau, share), abs=0.03)


def test_the_grid_profile_dims_a_prompt_chunk_less_than_a_decode_batch():
    p = load_profile("h200_grid")
    assert "H200" in p.machine and p.routing.kept_curve and p.routing.prompt_scale > 0
    assert all(c > 0 for m in p.phases.values() for c in m.coef.values())
    decode = StepShape(128, 128, 128 * 1000, False)
    chunk = StepShape(1024, 16, 1024 + 15 * 513, True)
    # a prompt-heavy step has shed most of its experts by tau 0.8; a decode batch has not
    # (the grid: 85% of a 1039-token chunk's saving by tau 0.8, none of a 128-decode batch's)
    def by_08(s):
        lat = [p.step_latency_s(s, tau) for tau in (1.0, 0.8, 0.0)]
        return (lat[0] - lat[1]) / (lat[0] - lat[2])
    assert p.step_latency_s(decode, 0.0) < p.step_latency_s(decode, 1.0)
    assert by_08(chunk) > 0.5 > 0.2 > by_08(decode)
