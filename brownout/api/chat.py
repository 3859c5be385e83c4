"""POST /v1/chat/completions: chat with the model's chat template, streaming or not.

The engine process applies the chat template and tokenises; without max_tokens (or
max_completion_tokens) the answer may run to the end of the context, capped by the
server's max_tokens limit. `n` answers run as n engine requests seeded apart
(brownout.api.schemas.sample_seeds) that share the prompt's KV; a stream interleaves their
chunks, each carrying its choice `index`, and starts with one role chunk per choice.
"""

from __future__ import annotations

from typing import AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from brownout.api.generation import (DONE, Item, check_finish, collect_all, created,
                                     finish_reason, first_output, new_id, sse, stream_error,
                                     streaming, submit_all, with_first)
from brownout.api.schemas import ChatCompletionRequest, fan_out
from brownout.api.state import ServerState, parse_body
from brownout.api.engine_client import RequestStream
from brownout.api.logprobs import TokenPieces, chat_content
from brownout.types import ValidationError


def _usage(stream: RequestStream, completion_tokens: int) -> dict:
    prompt = len(stream.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    state.check_model(body.model)
    try:
        params, defaulted = body.to_sampling_params(state.server.max_tokens_limit)
    except ValidationError as exc:  # our name for the top-N count is top_logprobs
        if exc.field == "logprobs":
            raise ValidationError("top_logprobs", exc.message) from None
        raise
    messages = [m.as_dict() for m in body.messages]
    state.limits.check_messages(messages)
    state.limits.check_stop_token_ids(params.stop_token_ids)
    jobs = [dict(prompt=None, messages=messages, params=sample, priority=body.priority,
                 clamp_max_tokens=defaulted) for sample in fan_out(params, body.n)]
    request_id = new_id("chatcmpl")
    streams = await submit_all(state.client, request_id, jobs)
    top_n: Optional[int] = params.logprobs
    model = state.served_model_name
    if body.stream:
        started = await first_output(request, state.client, state.drain, streams)
        if started is None:
            return Response(status_code=499)  # nobody is listening
        first, outputs = started
        content = _stream(request_id, model, body, top_n, streams, with_first(first, outputs))
        return streaming(content, state.client, streams, outputs)
    choices = await collect_all(request, state.client, state.drain, streams)
    if choices is None:
        return Response(status_code=499)  # nobody is listening
    out = []
    for i, c in enumerate(choices):
        logprobs = None if top_n is None else {"content": chat_content(TokenPieces(), c.logprobs, top_n)}
        out.append({"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs, "finish_reason": c.finish_reason})
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": created(), "model": model,
        "choices": out, "usage": _usage(streams[0], sum(len(c.token_ids) for c in choices))})


async def _stream(request_id: str, model: str, body: ChatCompletionRequest,
                  top_n: Optional[int], streams: list[RequestStream], items: AsyncIterator[Item]):
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created(),
            "model": model}
    extra = {"usage": None} if body.include_usage else {}
    completion_tokens = 0
    pieces = [TokenPieces() for _ in streams]  # each choice's decoder state

    def chunk(index: int, delta: dict, logprobs=None, reason=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return sse({**base, "choices": [choice], **extra})

    try:
        for index in range(len(streams)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, out in items:
            check_finish(out)
            completion_tokens += len(out.new_token_ids)
            logprobs = None
            if top_n is not None and out.new_logprobs:
                logprobs = {"content": chat_content(pieces[index], out.new_logprobs, top_n)}
            reason = finish_reason(out)
            if out.new_text or logprobs or reason:
                delta = {"content": out.new_text} if out.new_text else {}
                yield chunk(index, delta, logprobs, reason)
        if body.include_usage:
            yield sse({**base, "choices": [], "usage": _usage(streams[0], completion_tokens)})
    except Exception as exc:  # noqa: BLE001 - reported to the client inside the stream
        yield stream_error(exc)
    yield DONE
