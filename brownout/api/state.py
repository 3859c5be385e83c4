"""What the route handlers share: the engine client, server settings, metrics, request
limits, the shutdown drain, and the two checks every generation request starts with
(parse the body, resolve the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, TypeVar

import pydantic
from starlette.requests import Request

from brownout.api.body import load_json
from brownout.api.drain import Drain
from brownout.api.errors import APIError, from_pydantic
from brownout.api.limits import RequestLimits
from brownout.api.metrics import ServerMetrics
from brownout.config import ServerConfig
from brownout.api.engine_client import EngineClient

Body = TypeVar("Body", bound=pydantic.BaseModel)


@dataclass
class ServerState:
    client: EngineClient
    server: ServerConfig
    served_model_name: str = ""
    model_aliases: set[str] = field(default_factory=set)
    metrics: Optional[ServerMetrics] = None
    limits: Optional[RequestLimits] = None  # set once the engine reports ready
    drain: Drain = field(default_factory=Drain)

    def check_model(self, model: Optional[str]) -> None:
        if not self.client.is_alive:
            raise APIError(503, f"engine unavailable: {self.client.dead_reason or 'not running'}",
                           code="engine_dead")
        if model is not None and model != self.served_model_name and model not in self.model_aliases:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.served_model_name!r}", param="model", code="model_not_found")


async def parse_body(request: Request, model: type[Body]) -> Body:
    data = load_json(await request.body())
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise from_pydantic(exc.errors()) from None
