"""The FastAPI application: routes, lifespan (engine process start/stop), guards.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /version, GET /health,
GET /metrics (Prometheus text format), GET /dashboard (live charts; brownout.api.dashboard),
GET /openapi.json (behind the key when one is set; no /docs or /redoc). The engine runs in
its own process, started when the app starts and stopped when it stops; see
brownout/api/engine_client.py. Run it with brownout.api.serving, which adds connection
timeouts and the graceful shutdown (brownout.api.drain).
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from brownout.api.chat import create_chat_completion
from brownout.api.completions import create_completion
from brownout.api.dashboard import install_dashboard
from brownout.api.errors import install_handlers
from brownout.api.limits import RequestLimits
from brownout.api.metrics import ServerMetrics
from brownout.api.middleware import GuardMiddleware
from brownout.api.state import ServerState
from brownout.api import tokens
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
        state.metrics = ServerMetrics(state.served_model_name, max_model_len=info.max_model_len)
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

    install_dashboard(app, client, server.api_key, lambda: state.served_model_name)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, state)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return tokens.models(state)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        return tokens.model(state, model_id)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await tokens.tokenize(request, state)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await tokens.detokenize(request, state)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        return await tokens.tokenizer_info(state)

    @app.get("/version")
    async def version() -> JSONResponse:
        return tokens.version()

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
