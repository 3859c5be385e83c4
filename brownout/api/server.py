"""The FastAPI application: routes, lifespan (engine process start/stop), guards.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text format), GET /openapi.json (behind the key when one is set;
no /docs or /redoc). The engine runs in its own process, started when the app starts and
stopped when it stops; see brownout/api/engine_client.py. Run it with brownout.api.serving,
which adds connection timeouts and the graceful shutdown (brownout.api.drain).
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from brownout.api.chat import create_chat_completion
from brownout.api.completions import create_completion
from brownout.api.errors import install_handlers
from brownout.api.limits import RequestLimits
from brownout.api.metrics import ServerMetrics
from brownout.api.middleware import GuardMiddleware
from brownout.api.state import ServerState
from brownout.config import ServerConfig
from brownout.api.engine_client import EngineClient

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(client: EngineClient, server: ServerConfig) -> FastAPI:
    """An app serving the engine behind `client` (started by the app's lifespan)."""
    state = ServerState(client=client, server=server)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        info = await client.start()
        state.served_model_name = server.served_model_name or info.model_name
        state.limits = RequestLimits.of(info, server)
        state.model_aliases = {info.model_name}
        state.metrics = ServerMetrics(state.served_model_name)
        client.listeners.append(state.metrics)
        state.metrics.on_snapshot(client.last_snapshot)
        logger.info("serving %r on http://%s:%d", state.served_model_name, server.host, server.port)
        try:
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="brownout-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server_state = state
    install_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=server.api_key, max_body_bytes=server.max_body_bytes,
                       body_timeout_s=server.body_timeout_s, drain=state.drain)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, state)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        info = client.info
        card = {"id": state.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "brownout", "root": info.model_name if info else None,
                "max_model_len": info.max_model_len if info else None}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> JSONResponse:
        restarts = client.num_restarts
        if client.restarting:
            return JSONResponse({"status": "restarting", "reason": client.dead_reason,
                                 "restarts": restarts}, status_code=503)
        if not client.is_alive:
            return JSONResponse({"status": "dead", "reason": client.gave_up or client.dead_reason,
                                 "restarts": restarts}, status_code=503)
        return JSONResponse({"status": "ok", "restarts": restarts})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return Response(b"", media_type=PROMETHEUS_CONTENT_TYPE)
        state.metrics.on_snapshot(client.last_snapshot)  # gauges as of now, even when idle
        body = state.metrics.render()
        return Response(body, media_type=PROMETHEUS_CONTENT_TYPE)

    return app
