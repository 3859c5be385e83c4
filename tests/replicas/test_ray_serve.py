"""Two replicas of the embedded model as Ray Serve replicas on a local Ray instance started
here (2 CPUs, half a CPU and one torch thread per replica): the `openai` client, streaming,
a client disconnect (the replica aborts the request), the fleet's /metrics, the SLO-aware
router's choice under a skewed load, a replica killed mid-load, and (slow) the autoscaler
going 1 -> 2 -> 1 replicas around a burst. Every wait polls with a generous bound.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from brownout.replicas.cli import _prepare, parse_flags  # noqa: E402
from brownout.replicas.deployment import (APP_NAME, REPLICA_DEPLOYMENT, REPLICA_HEADER,  # noqa: E402
                                          ReplicaSettings, deploy)

READY_TIMEOUT_S = 300.0  # a replica's start on a busy 2-core box, with room to spare
REQUEST_TIMEOUT_S = 120.0
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}  # outlives each test's checks
IDLE_PROBES = 3  # rounds in which the idle replica must take a probe while the other is busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Optional[object]], timeout_s: float = READY_TIMEOUT_S,
             every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.HTTPError, KeyError):
            value = None
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def replica_states() -> dict:
    app = serve.status().applications.get(APP_NAME)
    if app is None or REPLICA_DEPLOYMENT not in app.deployments:
        return {}
    return dict(app.deployments[REPLICA_DEPLOYMENT].replica_states)


def per_replica(url: str, name: str, **match: str) -> dict[str, float]:
    """A metric's value per replica (summed over its other labels, those in `match` fixed)."""
    from brownout.bench.client import parse_prometheus

    out: dict[str, float] = {}
    for sample, labels, value in parse_prometheus(httpx.get(url + "/metrics/replicas", timeout=10).text):
        if sample == name and all(labels.get(k) == v for k, v in match.items()):
            out[labels["replica"]] = out.get(labels["replica"], 0.0) + value
    return out


class Fleet:
    def __init__(self, url: str):
        self.url = url

    def deploy(self, flags: dict, settings: ReplicaSettings) -> None:
        args = parse_flags({**flags, "replicas": settings.num_replicas, "port": self.url.rsplit(":", 1)[1]})
        engine_config, server_config, options, _ = _prepare(args)
        deploy(engine_config, server_config, options, settings)
        n = settings.num_replicas
        wait_for(f"{n} running replicas", lambda: replica_states().get("RUNNING") == n)
        wait_for(f"{n} replicas in /metrics", lambda: len(per_replica(self.url, "brownout_tau")) == n)


BASE_FLAGS = {"device": "cpu", "served_model_name": "demo", "max_num_seqs": 4, "max_waiting_requests": 4}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from brownout.defaults import default_model_dir

    model = Path(default_model_dir())
    if not (model / "config.json").is_file():
        pytest.skip("the embedded demo model is not in this checkout")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        f = Fleet(f"http://127.0.0.1:{free_port()}")
        f.deploy(BASE_FLAGS, ReplicaSettings(num_replicas=2, num_cpus=0.5, stats_period_s=0.5))
        yield f
    finally:
        serve.shutdown()
        ray.shutdown()


def test_openai_client_and_streaming(fleet):
    import openai

    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S)
    chat = client.chat.completions.create(model="demo", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model="demo", prompt="Once upon a time", max_tokens=8,
                                            temperature=0, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert whole.choices[0].text == text  # greedy at tau 1: the same on either replica
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_fleet_metrics(fleet):
    agg = httpx.get(fleet.url + "/metrics", timeout=10)
    assert agg.status_code == 200 and "brownout_tau{" in agg.text and 'replica="' not in agg.text
    taus = per_replica(fleet.url, "brownout_tau")
    assert len(taus) == 2
    r = httpx.get(fleet.url + "/health", timeout=10)
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] in taus


def _open_stream(url: str, body: dict, headers: Optional[dict] = None):
    """(client, response) of a streaming completion whose first chunk has arrived."""
    client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
    resp = client.send(client.build_request("POST", url + "/v1/completions", headers=headers,
                                            json={"model": "demo", "prompt": "The king", "stream": True,
                                                  **body}), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    next(line for line in lines if line.startswith("data: "))
    return client, resp, lines


def test_router_sends_work_to_the_idle_replica_and_a_disconnect_frees_it(fleet):
    client, resp, lines = _open_stream(fleet.url, LONG)  # held: a dropped iterator closes the stream
    busy = resp.headers[REPLICA_HEADER]
    aborted = per_replica(fleet.url, "vllm:request_success_total", finished_reason="abort")
    try:
        wait_for("the long request running", lambda: per_replica(fleet.url, "vllm:num_requests_running")
                 .get(busy) == 1)

        def probe() -> str:
            r = httpx.post(fleet.url + "/v1/completions", timeout=REQUEST_TIMEOUT_S,
                           json={"model": "demo", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
            return r.headers[REPLICA_HEADER]

        # the router's view includes the running request once the busy replica's stats reach
        # it: a few stats periods, more when the replica's CPU-bound engine delays its loop
        wait_for("the router sending work to the idle replica", lambda: probe() != busy, timeout_s=20.0)
        # skewed: one replica holds a long request, the other none. A probe just sent to the
        # idle replica counts against it until the router sees it complete or fresh stats
        # arrive (the burst guard), so the next probe may go to the busy one, whose model
        # predicts a short wait: each round waits until the router returns to the idle one
        for _ in range(IDLE_PROBES):
            wait_for("the router returning to the idle replica", lambda: probe() != busy,
                     timeout_s=20.0)
            running = per_replica(fleet.url, "vllm:num_requests_running")
            assert running.get(busy) == 1, running  # the long request still runs
    finally:
        resp.close()  # the client goes away mid-stream
        client.close()
    # the replica aborts the request: it stops running and counts as aborted
    wait_for("the disconnected request aborted",
             lambda: per_replica(fleet.url, "vllm:num_requests_running").get(busy) == 0)
    wait_for("the abort counted", lambda: per_replica(fleet.url, "vllm:request_success_total",
                                                      finished_reason="abort").get(busy, 0) > aborted.get(busy, 0))


def test_every_replica_refusing_answers_429_with_retry_after(fleet):
    """Each replica holds 4 running and 4 waiting requests; a burst beyond both is refused
    by the engines' own admission, with a Retry-After, and both replicas serve meanwhile."""
    answers: list[tuple[int, Optional[str], Optional[str]]] = []

    def one():
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
            r = c.post(fleet.url + "/v1/completions",
                       json={"model": "demo", "prompt": "The king", "max_tokens": 200, "ignore_eos": True})
            answers.append((r.status_code, r.headers.get("retry-after"), r.headers.get(REPLICA_HEADER)))

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    assert len(answers) == 32 and {code for code, _, _ in answers} <= {200, 429}
    refused = [a for a in answers if a[0] == 429]
    assert refused and all(retry is not None and float(retry) >= 1 for _, retry, _ in refused)
    assert len({replica for code, _, replica in answers if code == 200}) == 2


def test_replica_killed_mid_load(fleet):
    streams = [_open_stream(fleet.url, {**LONG, "max_tokens": 400}) for _ in range(4)]
    names = {s[1].headers[REPLICA_HEADER] for s in streams}
    victim = streams[0][1].headers[REPLICA_HEADER]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    assert len(actors) == 1
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    results = {}

    def drain(i, lines):
        try:
            done = any(line == "data: [DONE]" for line in lines)
            results[i] = "done" if done else "cut"
        except httpx.HTTPError:
            results[i] = "error"

    threads = [threading.Thread(target=drain, args=(i, s[2])) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    for client, resp, _ in streams:
        resp.close()
        client.close()
    for i, (_, resp, _) in enumerate(streams):  # the victim's requests end; the others finish
        expected = {"cut", "error"} if resp.headers[REPLICA_HEADER] == victim else {"done"}
        assert results.get(i) in expected, (i, results, victim, names)
    r = httpx.post(fleet.url + "/v1/completions", timeout=REQUEST_TIMEOUT_S,
                   json={"model": "demo", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] != victim
    # Ray starts a replacement
    wait_for("a replacement replica", lambda: replica_states().get("RUNNING") == 2 and
             victim not in per_replica(fleet.url, "brownout_tau") and
             len(per_replica(fleet.url, "brownout_tau")) == 2, timeout_s=READY_TIMEOUT_S + 60)


@pytest.mark.slow
def test_autoscaler_follows_a_burst(fleet, tmp_path):
    """1 replica refusing under a burst -> 2; idle at tau 1 -> back to 1. The start time of
    the second replica is recorded (brownout covers it)."""
    fleet.deploy({**BASE_FLAGS, "max_num_seqs": 1, "max_waiting_requests": 1, "slo_policy": "off"},
                 ReplicaSettings(num_replicas=1, max_replicas=2, num_cpus=0.5, upscale_delay_s=2.0,
                                 downscale_delay_s=5.0, look_back_period_s=2.0))
    stop = threading.Event()
    statuses: list[int] = []  # the replica refuses (429) once its one slot and queue are taken

    def burst():
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
            while not stop.is_set():
                try:
                    statuses.append(c.post(fleet.url + "/v1/completions",
                                           json={"model": "demo", "prompt": "Hi", "max_tokens": 16}).status_code)
                except httpx.HTTPError:
                    statuses.append(0)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        wait_for("scale-up to 2 replicas", lambda: replica_states().get("RUNNING") == 2)
        up_s = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)
    assert 429 in statuses  # the single replica refused: the signal that scaled it
    wait_for("scale-down to 1 replica", lambda: replica_states() == {"RUNNING": 1})
    (tmp_path / "autoscale.json").write_text(json.dumps({"burst_to_two_running_s": up_s}))
