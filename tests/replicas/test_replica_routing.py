"""The replicas' decisions as pure functions: the SLO-aware routing choice, the brownout-aware
autoscaling decision, the fleet's /metrics merge, and the flags of `brownout serve --replicas`.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from brownout.replicas.autoscale import BrownoutAutoscalingPolicy, decide
from brownout.replicas.cli import argv_of, parse_flags, settings_of
from brownout.replicas.metrics_merge import merge_pages
from brownout.replicas.routing import ReplicaStats, rank_replicas, replica_stats, score

NOW = 1000.0


def st(ttft, tau=1.0, *, refusing=False, age=0.0, per_request=0.1, running=0, waiting=0):
    return ReplicaStats(time=NOW - age, predicted_ttft_s=ttft, tau=tau, refusing=refusing,
                        per_request_s=per_request, num_running=running, num_waiting=waiting)


def test_lowest_predicted_ttft_first():
    stats = {"a": st(0.9), "b": st(0.2), "c": st(0.5)}
    assert rank_replicas(["a", "b", "c"], stats, NOW) == ["b", "c", "a"]


def test_tie_goes_to_the_highest_tau():
    stats = {"dim": st(0.20, tau=0.4, per_request=0.01), "bright": st(0.23, tau=1.0, per_request=0.01),
             "far": st(0.9, tau=1.0)}
    assert rank_replicas(["dim", "bright", "far"], stats, NOW, tie_s=0.05) == ["bright", "dim", "far"]
    # outside the tie the lower wait wins whatever the tau
    assert rank_replicas(["dim", "bright"], stats, NOW, tie_s=0.01)[0] == "dim"


def test_a_tie_spans_one_step_of_the_best():
    # 0.1 s steps: a dimmed replica whose shorter steps predict 60 ms less does not win
    stats = {"dim": st(0.14, tau=0.5, per_request=0.1), "bright": st(0.20, tau=1.0, per_request=0.12)}
    assert rank_replicas(["dim", "bright"], stats, NOW, tie_s=0.01)[0] == "bright"
    stats = {"dim": st(0.14, tau=0.5, per_request=0.1), "bright": st(0.30, tau=1.0, per_request=0.12)}
    assert rank_replicas(["dim", "bright"], stats, NOW, tie_s=0.01)[0] == "dim"


def test_tie_at_the_same_tau_goes_to_the_session_then_the_less_loaded():
    stats = {"a": st(0.2, running=3), "b": st(0.2, running=1)}
    assert rank_replicas(["a", "b"], stats, NOW)[0] == "b"
    assert rank_replicas(["a", "b"], stats, NOW, affinity="a")[0] == "a"
    # affinity never outweighs a real difference in wait
    stats = {"a": st(0.9), "b": st(0.2)}
    assert rank_replicas(["a", "b"], stats, NOW, affinity="a")[0] == "b"


def test_refusing_replicas_go_last():
    stats = {"r": st(0.0, refusing=True), "ok": st(2.0)}
    assert rank_replicas(["r", "ok"], stats, NOW) == ["ok", "r"]


def test_requests_routed_since_the_stats_count():
    stats = {"a": st(0.2, per_request=0.1), "b": st(0.4, per_request=0.1)}
    assert rank_replicas(["a", "b"], stats, NOW, {"a": 5}) == ["b", "a"]
    assert score(stats["a"], 5) == pytest.approx(0.7)


def test_a_routed_request_not_yet_seen_complete_does_not_outweigh_a_running_one():
    # the idle replica served a request the router has not yet seen complete; the busy one
    # runs a long request: within the tie the idle one still goes first
    stats = {"busy": st(0.012, per_request=0.05, running=1), "idle": st(0.0, per_request=0.05)}
    assert rank_replicas(["busy", "idle"], stats, NOW, {"idle": 1})[0] == "idle"
    # and a burst between two stats updates still spreads over tied replicas by the score
    stats = {"a": st(0.0, per_request=0.05), "b": st(0.0, per_request=0.05)}
    assert rank_replicas(["a", "b"], stats, NOW, {"a": 1})[0] == "b"
    assert rank_replicas(["a", "b"], stats, NOW, {"a": 1, "b": 1})[0] == "a"


def test_stale_or_missing_stats_fall_back():
    assert rank_replicas(["a", "b"], {"a": st(0.1), "b": st(0.1, age=10)}, NOW, stale_s=3) is None
    assert rank_replicas(["a", "b"], {"a": st(0.1), "b": None}, NOW) is None
    assert rank_replicas([], {}, NOW) == []


def test_stats_round_trip_and_bad_input():
    s = st(0.3, 0.6, refusing=True, running=2, waiting=1)
    assert ReplicaStats.from_dict(s.to_dict()) == s
    assert ReplicaStats.from_dict({}) is None
    assert ReplicaStats.from_dict({"time": 1.0}) is None
    assert ReplicaStats.from_dict({"time": 1.0, "predicted_ttft_s": float("nan"), "tau": 1}) is None


def test_replica_stats_from_a_snapshot():
    snap = {"tau_prefill": 0.8, "tau_decode": 0.6, "num_waiting": 3, "num_running": 4,
            "admission_predicted_wait_s": 0.42}
    s = replica_stats(snap, NOW, refusing=False, per_request_s=0.05)
    assert (s.tau, s.predicted_ttft_s, s.num_waiting, s.num_running) == (0.6, 0.42, 3, 4)
    # without the latency model: a step per request ahead and one for itself
    s = replica_stats({"num_waiting": 3}, NOW, refusing=False, per_request_s=0.05)
    assert s.predicted_ttft_s == pytest.approx(0.2)


def test_autoscaling_decision():
    one = {"r1": 1.0}
    assert decide({"r1": 0.5}, {"r1": 0.0}, {"r1": 0.9}, 1) == 2  # dimmed
    assert decide(one, {"r1": 1.0}, {"r1": 0.9}, 1) == 2  # refusing
    assert decide(one, {"r1": 0.0}, {"r1": 0.9}, 1) == 1  # busy but bright: hold
    assert decide(one, {}, {"r1": 0.9}, 1, over_slo={"r1": 0.6}) == 2  # predicted over the SLO
    assert decide(one, {}, {"r1": 0.9}, 1, over_slo={"r1": 0.2}) == 1  # only briefly
    both = {"r1": 1.0, "r2": 1.0}
    assert decide(both, {}, {"r1": 0.1, "r2": 0.2}, 2) == 1  # all at tau 1 with headroom
    assert decide(both, {}, {"r1": 0.4, "r2": 0.4}, 2) == 2  # would not fit on one
    assert decide({"r1": 1.0, "r2": 0.95}, {}, {"r1": 0.0, "r2": 0.0}, 2) == 2  # not all at 1
    assert decide({}, {}, {}, 3) == 3  # no metrics yet
    with pytest.raises(ValueError, match="tau_threshold"):
        BrownoutAutoscalingPolicy(tau_threshold=0)


def test_autoscaling_policy_reads_the_context():
    class Ctx:
        aggregated_metrics = {"brownout_tau": {"r1": 0.3}, "brownout_refusing": {"r1": 0.0},
                              "brownout_load": {"r1": 1.0}}
        current_num_replicas = 1
        policy_state = {}

    assert BrownoutAutoscalingPolicy()(Ctx())[0] == 2


PAGE = """# HELP brownout_tau Brownout threshold
# TYPE brownout_tau gauge
brownout_tau{{phase="prefill"}} {tau}
# HELP vllm:num_requests_running Requests in the batch
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="m"}} {running}
# HELP vllm:generation_tokens Generated tokens
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{model_name="m"}} {tokens}
"""


def _samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_metrics_merge():
    pages = {"r1": PAGE.format(tau=1.0, running=2, tokens=10),
             "r2": PAGE.format(tau=0.5, running=3, tokens=5)}
    agg = _samples(merge_pages(pages, per_replica=False))
    assert agg[("brownout_tau", (("phase", "prefill"),))] == pytest.approx(0.75)  # mean
    assert agg[("vllm:num_requests_running", (("model_name", "m"),))] == 5  # summed
    assert agg[("vllm:generation_tokens_total", (("model_name", "m"),))] == 15
    per = _samples(merge_pages(pages, per_replica=True))
    assert per[("brownout_tau", (("phase", "prefill"), ("replica", "r2")))] == 0.5
    assert per[("vllm:generation_tokens_total", (("model_name", "m"), ("replica", "r1")))] == 10
    assert merge_pages({}, per_replica=False) == b""


def test_flags():
    assert argv_of({"replicas": 2, "enforce_eager": True, "model": None, "x": False}) == \
        ["--replicas", "2", "--enforce-eager"]
    args = parse_flags({"replicas": 3, "max_replicas": 5, "router": "pow2"})
    s = settings_of(args)
    assert (s.num_replicas, s.max_replicas, s.router, s.autoscaling) == (3, 5, "pow2", True)
    with pytest.raises(ValueError, match="replicas"):
        settings_of(parse_flags({"replicas": 0}))
    with pytest.raises(ValueError, match="max_replicas"):
        settings_of(parse_flags({"replicas": 3, "max_replicas": 2}))


def test_cli_rejects_bad_replicas(capsys):
    from brownout.cli import main

    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas" in capsys.readouterr().err


def test_the_documented_serve_config_builds():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from brownout.replicas.cli import app_builder, metrics_app_builder

    path = __import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "replicas-serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    apps = {a.name: a for a in config.applications}
    assert apps["brownout-metrics"].route_prefix == "/metrics"
    from brownout.defaults import default_model_dir, default_united_dir

    # the config's paths name a cluster's checkpoint; here the embedded model stands in
    args = {**apps["brownout"].args, "model": str(default_model_dir()),
            "united_experts": str(default_united_dir(4))}
    app = app_builder(args)
    deployment = app._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 4, "num_gpus": 1}
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (4, 8)
    assert metrics_app_builder({}) is not None
