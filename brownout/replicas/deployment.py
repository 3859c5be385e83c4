"""Brownout engines as Ray Serve replicas behind one OpenAI-compatible ingress.

Two Serve applications share Ray Serve's HTTP proxy:

* `brownout` (route "/"): the `BrownoutReplica` deployment. Each replica runs the server's own
  FastAPI app (brownout.api.server.create_app) over its own engine process, so every endpoint,
  streaming, disconnect handling (an abort frees the request's KV), 429 + Retry-After from
  admission and `/health` behave as in `brownout serve`; each replica has its own SLO
  controller. The proxy routes each request through the deployment's request router: the
  SLO-aware `SLORouter` (brownout.replicas.router) or Ray's power-of-two choices. Each replica
  publishes its routing stats (`record_routing_stats`) and its autoscaling metrics
  (`record_autoscaling_stats`, read by `BrownoutAutoscalingPolicy`), and reports itself
  unhealthy when its engine client gave up, so Ray replaces it.
* `brownout-metrics` (route "/metrics", the longer prefix, so it wins over the replicas'
  own /metrics): `MetricsHub`, to which every replica pushes its metrics page each
  `METRICS_PUSH_S`; GET /metrics answers the fleet's aggregate, GET /metrics/replicas every
  replica's series with a `replica` label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional

from fastapi import FastAPI
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
from starlette.responses import Response

from brownout.api.engine_client import EngineClient
from brownout.api.server import PROMETHEUS_CONTENT_TYPE, create_app
from brownout.config import EngineConfig, ServerConfig
from brownout.replicas.autoscale import (DEFAULT_HEADROOM, DEFAULT_TAU_THRESHOLD, METRIC_LOAD,
                                         METRIC_OVER_SLO, METRIC_REFUSING, METRIC_TAU)
from brownout.replicas.metrics_merge import merge_pages
from brownout.replicas.routing import DEFAULT_PER_REQUEST_S, ReplicaStats, replica_stats

logger = logging.getLogger(__name__)

APP_NAME = "brownout"
METRICS_APP_NAME = "brownout-metrics"
REPLICA_DEPLOYMENT = "BrownoutReplica"
HUB_DEPLOYMENT = "MetricsHub"
REPLICA_HEADER = "x-brownout-replica"
ROUTERS = {"slo": "brownout.replicas.router:SLORouter",
           "pow2": "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"}

# Each replica pushes its metrics page this often (seconds): a scrape sees the fleet at most
# this stale.
METRICS_PUSH_S = 1.0
# The hub forgets a replica's page after this long without a push (it died or was removed).
PAGE_TTL_S = 10.0
# A refusal (429) counts as recent for this long (seconds): routing sends new requests
# elsewhere and the autoscaler reads "refusing" for that long.
REFUSAL_WINDOW_S = 2.0
# Ray's in-flight limit per replica, in units of its engine's batch plus bounded queue: above
# one, so what the engine cannot hold reaches its admission (429) rather than Ray's queue.
ONGOING_PER_ENGINE_SLOT = 2
# The wait a replica whose engine is restarting publishes: it sorts after every serving one.
UNAVAILABLE_WAIT_S = 1e6
# Steps of recent history behind a replica's added wait per queued request.
_STEP_HISTORY = 32


@dataclass(frozen=True)
class ReplicaSettings:
    """How the replicas run: their number (a range when autoscaling), resources, router."""

    num_replicas: int = 2
    max_replicas: Optional[int] = None  # > num_replicas: autoscale between the two
    num_cpus: float = 1.0  # Ray CPUs per replica (its engine's torch threads follow)
    num_gpus: float = 0.0  # Ray GPUs per replica
    router: str = "slo"  # "slo" or "pow2" (Ray's default router)
    stats_period_s: float = 0.5  # how often each replica publishes its routing stats
    stale_s: float = 3.0  # router: stats older than this fall back to power-of-two
    tau_threshold: float = DEFAULT_TAU_THRESHOLD
    headroom: float = DEFAULT_HEADROOM
    upscale_delay_s: float = 5.0  # a scale-up decision must hold this long
    downscale_delay_s: float = 30.0  # a scale-down decision must hold this long
    look_back_period_s: float = 5.0  # window the autoscaling metrics are averaged over

    def __post_init__(self):
        if self.num_replicas < 1:
            raise ValueError(f"replicas: {self.num_replicas} must be >= 1")
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas: {self.max_replicas} must be >= replicas "
                             f"({self.num_replicas})")
        if self.router not in ROUTERS:
            raise ValueError(f"router: {self.router!r} is not one of {sorted(ROUTERS)}")
        if not self.num_cpus > 0:
            raise ValueError(f"replica_cpus: {self.num_cpus} must be > 0")
        if self.num_gpus < 0:
            raise ValueError(f"replica_gpus: {self.num_gpus} must be >= 0")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.num_replicas


class RefusalWatch:
    """Whether an engine refused requests (429) within the last `window_s` seconds, from its
    cumulative refusal counter."""

    def __init__(self, window_s: float = REFUSAL_WINDOW_S):
        self.window_s = window_s
        self._total: Optional[float] = None
        self._last_refusal = -float("inf")

    def observe(self, now: float, total: float) -> bool:
        if self._total is not None and total > self._total:
            self._last_refusal = now
        self._total = total
        return now - self._last_refusal <= self.window_s


class StepWatch:
    """A replica's added wait per queued request: the mean recent step latency (a queued
    request holds its prefill for at least one step)."""

    def __init__(self):
        self.latencies: deque[float] = deque(maxlen=_STEP_HISTORY)

    def on_step(self, t, outputs, stats, snapshot) -> None:
        if stats is not None and stats.latency_s > 0:
            self.latencies.append(stats.latency_s)

    def per_request_s(self) -> float:
        if not self.latencies:
            return DEFAULT_PER_REQUEST_S
        return sum(self.latencies) / len(self.latencies)

    def on_snapshot(self, snapshot) -> None: ...

    def on_request_start(self, request_id, arrival_time) -> None: ...

    def on_request_end(self, request_id) -> None: ...

    def on_engine_restart(self, num_restarts) -> None: ...


class ReplicaHeader:
    """ASGI wrapper naming the replica that answered in an `x-brownout-replica` header."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.ingress()
class BrownoutReplica:
    """One engine and the server's FastAPI app over it (see module doc)."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                       options, max_num_seqs: int, ttft_slo_s: float):
        self.client = EngineClient(engine_config, options)
        # not `self.app`: Serve's ASGI wrapper owns that name
        self.asgi = create_app(self.client, server_config)
        self.max_num_seqs, self.ttft_slo_s = max_num_seqs, ttft_slo_s
        self.steps = StepWatch()
        self.client.listeners.append(self.steps)
        self.route_refusals, self.scale_refusals = RefusalWatch(), RefusalWatch()
        self.created = time.time()
        self.ready: Optional[float] = None
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self._push_task = asyncio.get_running_loop().create_task(self._push_metrics())

    def __serve_build_asgi_app__(self):
        return ReplicaHeader(self.asgi, self.name)

    def _refused_total(self) -> float:
        snap = self.client.last_snapshot
        return float(snap.get("num_refused_slo_total", 0)) + float(snap.get("num_refused_full_total", 0))

    def check_health(self) -> None:
        if self.client.gave_up is not None:
            raise RuntimeError(f"engine gave up: {self.client.gave_up}")

    async def record_routing_stats(self) -> dict:
        now = time.time()
        if self.ready is None and self.client.is_alive:
            self.ready = now
        refusing = self.route_refusals.observe(now, self._refused_total())
        if not self.client.is_alive:  # restarting: ranked last, as a refusing replica
            return ReplicaStats(time=now, predicted_ttft_s=UNAVAILABLE_WAIT_S, tau=1.0,
                                refusing=True).to_dict()
        stats = replica_stats(self.client.last_snapshot, now, refusing, self.steps.per_request_s())
        return {**stats.to_dict(), "replica": self.name, "started_s": self.created,
                "ready_s": self.ready}

    async def record_autoscaling_stats(self) -> dict:
        snap = self.client.last_snapshot
        tau = min(float(snap.get("tau_prefill", 1.0)), float(snap.get("tau_decode", 1.0)))
        refusing = self.scale_refusals.observe(time.time(), self._refused_total())
        load = (int(snap.get("num_running", 0)) + int(snap.get("num_waiting", 0))) / self.max_num_seqs
        wait = snap.get("admission_predicted_wait_s")
        over = float(wait is not None and wait > self.ttft_slo_s)
        return {METRIC_TAU: tau, METRIC_REFUSING: float(refusing), METRIC_LOAD: load,
                METRIC_OVER_SLO: over}

    async def _push_metrics(self) -> None:
        """Pushes this replica's metrics page to the hub every METRICS_PUSH_S."""
        hub = None
        while True:
            await asyncio.sleep(METRICS_PUSH_S)
            state = self.asgi.state.server_state
            if state.metrics is None:
                continue
            try:
                if hub is None:
                    hub = serve.get_deployment_handle(HUB_DEPLOYMENT, app_name=METRICS_APP_NAME)
                state.metrics.on_snapshot(self.client.last_snapshot)
                await hub.push.remote(self.name, state.metrics.render().decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no hub (yet): metrics stay per replica until there is
                logger.debug("metrics push failed: %s", exc)


class _RootSlash:
    """ASGI middleware serving the route prefix itself (/metrics) as its "/" route: Serve
    passes it as an empty path under the prefix, which FastAPI would redirect."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        root = scope.get("root_path", "")
        if scope["type"] == "http" and scope["path"] in ("", root):
            scope = {**scope, "path": root + "/"}
        await self.app(scope, receive, send)


hub_app = FastAPI(title="brownout-serve metrics", docs_url=None, redoc_url=None, openapi_url=None)
hub_app.add_middleware(_RootSlash)


@serve.ingress(hub_app)
class MetricsHub:
    """The fleet's /metrics: the pages its replicas push, aggregated or per replica."""

    def __init__(self):
        self.pages: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self.pages[replica] = (time.monotonic(), text)

    def _live(self) -> dict[str, str]:
        now = time.monotonic()
        self.pages = {r: p for r, p in self.pages.items() if now - p[0] <= PAGE_TTL_S}
        return {r: text for r, (_, text) in self.pages.items()}

    @hub_app.get("/")
    def aggregated(self) -> Response:
        return Response(merge_pages(self._live(), per_replica=False), media_type=PROMETHEUS_CONTENT_TYPE)

    @hub_app.get("/replicas")
    def per_replica(self) -> Response:
        return Response(merge_pages(self._live(), per_replica=True), media_type=PROMETHEUS_CONTENT_TYPE)


def replica_deployment(engine_config: EngineConfig, server_config: ServerConfig, options,
                       settings: ReplicaSettings):
    """The bound `BrownoutReplica` deployment for `settings` (see module doc)."""
    if engine_config.load.cpu_threads > settings.num_cpus:
        # an engine with more torch threads than the CPUs Ray reserved for it contends
        # with its neighbours on the same node
        threads = max(1, int(settings.num_cpus))
        engine_config = replace(engine_config, load=replace(engine_config.load, cpu_threads=threads))
    sched = engine_config.scheduler
    router = RequestRouterConfig(
        request_router_class=ROUTERS[settings.router],
        request_router_kwargs={"stale_s": settings.stale_s} if settings.router == "slo" else {},
        request_routing_stats_period_s=settings.stats_period_s,
        request_routing_stats_timeout_s=max(1.0, 2 * settings.stats_period_s))
    options_kw = dict(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        # twice the engine's batch and bounded queue: the engine's admission refuses (429
        # with Retry-After) before Ray would hold requests back at the proxy
        max_ongoing_requests=ONGOING_PER_ENGINE_SLOT * (sched.max_num_seqs + sched.max_waiting_requests),
        request_router_config=router,
        health_check_period_s=2.0,
        graceful_shutdown_timeout_s=server_config.shutdown_timeout_s)
    if settings.autoscaling:
        options_kw["autoscaling_config"] = AutoscalingConfig(
            min_replicas=settings.num_replicas, max_replicas=settings.max_replicas,
            initial_replicas=settings.num_replicas,
            upscale_delay_s=settings.upscale_delay_s, downscale_delay_s=settings.downscale_delay_s,
            look_back_period_s=settings.look_back_period_s,
            policy=AutoscalingPolicy(
                policy_function="brownout.replicas.autoscale:BrownoutAutoscalingPolicy",
                policy_kwargs={"tau_threshold": settings.tau_threshold,
                               "headroom": settings.headroom}))
    else:
        options_kw["num_replicas"] = settings.num_replicas
    deployment = serve.deployment(BrownoutReplica).options(**options_kw)
    return deployment.bind(engine_config, server_config, options, sched.max_num_seqs,
                           engine_config.slo.ttft_s)


def hub_deployment():
    return serve.deployment(MetricsHub).options(
        name=HUB_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()


def deploy(engine_config: EngineConfig, server_config: ServerConfig, options,
           settings: ReplicaSettings, *, blocking: bool = False) -> None:
    """Start Serve's HTTP proxy on the server's host and port and run both applications
    (Ray must be initialised)."""
    serve.start(http_options={"host": server_config.host, "port": server_config.port})
    serve.run(hub_deployment(), name=METRICS_APP_NAME, route_prefix="/metrics")
    serve.run(replica_deployment(engine_config, server_config, options, settings),
              name=APP_NAME, route_prefix="/", blocking=blocking)
