"""Routes beside generation: the model card (/v1/models, /v1/models/{id}), /tokenize,
/detokenize and /tokenizer_info in vLLM's shapes (lm-eval's and guidellm's remote tokenizer
use them), and /version.

The tokenizer lives in the engine process (this process imports no torch or transformers);
these queries go to it and are answered between engine steps.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse

import brownout
from brownout.api.errors import APIError
from brownout.api.schemas import DetokenizeRequest, TokenizeRequest
from brownout.api.state import ServerState, parse_body


def model_card(state: ServerState) -> dict:
    info = state.client.info
    return {"id": state.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "brownout", "root": info.model_name if info else None,
            "parent": None, "max_model_len": info.max_model_len if info else None}


def models(state: ServerState) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [model_card(state)]})


def model(state: ServerState, model_id: str) -> JSONResponse:
    """One model's card; an id this server does not serve is a 404 in OpenAI's error shape."""
    if model_id != state.served_model_name and model_id not in state.model_aliases:
        raise APIError(404, f"The model '{model_id}' does not exist", param="model",
                       code="model_not_found")
    return JSONResponse(model_card(state))


async def tokenize(request: Request, state: ServerState) -> JSONResponse:
    body = await parse_body(request, TokenizeRequest)
    state.check_model(body.model)
    payload = body.payload()
    if "messages" in payload:
        state.limits.check_messages(payload["messages"])
    else:
        state.limits.check_prompts([payload["prompt"]])
    return JSONResponse(await state.client.query("tokenize", **payload))


async def detokenize(request: Request, state: ServerState) -> JSONResponse:
    body = await parse_body(request, DetokenizeRequest)
    state.check_model(body.model)
    state.limits.check_token_ids("tokens", body.tokens)
    return JSONResponse(await state.client.query("detokenize", tokens=list(body.tokens)))


async def tokenizer_info(state: ServerState) -> JSONResponse:
    state.check_model(None)
    return JSONResponse(await state.client.query("tokenizer_info"))


def version() -> JSONResponse:
    return JSONResponse({"version": brownout.__version__})
