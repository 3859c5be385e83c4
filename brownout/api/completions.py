"""POST /v1/completions: legacy text completions, streaming or not.

Supports `echo` with prompt logprobs in the legacy format (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`; the first prompt token's logprob is null), which is how
lm-eval's local-completions model scores log-likelihoods: echo=true, logprobs=N and
max_tokens=0 or 1. The engine needs max_tokens >= 1, so max_tokens=0 runs one token and
drops it from the text, the logprobs and the usage.

`n` and `best_of`: each prompt runs as `best_of` (else `n`) engine requests, seeded apart
(brownout.api.schemas.sample_seeds); the engine computes their shared prompt once. Choice
`index` is prompt index x n + sample index. With best_of > n (not streamed) the n samples of
highest cumulative logprob (the sum over their generated tokens) are returned, in that
order. Usage counts each prompt once and the completion tokens of every sample generated.
"""

from __future__ import annotations

from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from brownout.api.generation import (DONE, Choice, Item, check_finish, collect_all, created,
                                     finish_reason, first_output, new_id, sse, stream_error,
                                     streaming, submit_all, with_first)
from brownout.api.logprobs import Entry, TokenPieces, legacy, output_entries, prompt_entries
from brownout.api.schemas import MAX_PROMPTS_PER_REQUEST, CompletionRequest, fan_out
from brownout.api.state import ServerState, parse_body
from brownout.api.engine_client import RequestStream
from brownout.types import ValidationError


class _Plan:
    """What one request asked for, beyond sampling."""

    def __init__(self, body: CompletionRequest):
        self.echo = body.echo
        self.want_logprobs = body.logprobs is not None
        self.drop_generated = body.echo and body.max_tokens == 0  # scoring only

    def text(self, stream: RequestStream, generated: str, first: bool) -> str:
        text = "" if self.drop_generated else generated
        return (stream.prompt_text or "") + text if self.echo and first else text

    def entries(self, pieces: TokenPieces, stream: RequestStream, logprobs: list, prompt_logprobs,
                first: bool) -> list[Entry]:
        """Token entries of one output: the prompt's first (echo), then the generated ones."""
        entries = []
        if self.echo and first:
            texts = stream.prompt_token_texts or [""] * len(stream.prompt_token_ids)
            entries = prompt_entries(pieces, texts, stream.prompt_token_bytes, prompt_logprobs)
        return entries + ([] if self.drop_generated else output_entries(pieces, logprobs))

    def completion_tokens(self, n: int) -> int:
        return 0 if self.drop_generated else n


def _usage(streams: list[RequestStream], completion_tokens: int) -> dict:
    prompt = sum(len(s.prompt_token_ids) for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


async def create_completion(request: Request, state: ServerState) -> Response:
    body = await parse_body(request, CompletionRequest)
    state.check_model(body.model)
    params = body.to_sampling_params(state.server.max_tokens_limit)
    prompts = body.prompts()
    k = body.num_samples
    if len(prompts) * k > MAX_PROMPTS_PER_REQUEST:
        raise ValidationError("best_of" if body.best_of else "n",
                              f"prompts x samples may be at most {MAX_PROMPTS_PER_REQUEST}, "
                              f"got {len(prompts)} x {k}")
    state.limits.check_prompts([p for p in prompts for _ in range(k)])  # every sample's work
    state.limits.check_stop_token_ids(params.stop_token_ids)
    jobs = [dict(prompt=p, params=sample, priority=body.priority, want_prompt_text=body.echo)
            for p in prompts for sample in fan_out(params, k)]
    request_id = new_id("cmpl")
    streams = await submit_all(state.client, request_id, jobs)
    plan = _Plan(body)
    model = state.served_model_name
    if body.stream:
        started = await first_output(request, state.client, state.drain, streams)
        if started is None:
            return Response(status_code=499)  # nobody is listening
        first, outputs = started
        content = _stream(request_id, model, body, plan, streams, k, with_first(first, outputs))
        return streaming(content, state.client, streams, outputs)
    choices = await collect_all(request, state.client, state.drain, streams)
    if choices is None:
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(_response(request_id, model, plan, streams, choices, k, body.n))


def _best(choices: list[Choice], k: int, n: int) -> list[int]:
    """Of each prompt's `k` samples, the positions of the `n` of highest cumulative logprob."""
    picked = []
    for start in range(0, len(choices), k):
        group = range(start, start + k)
        picked += sorted(group, key=lambda i: -sum(lp.logprob for lp in choices[i].logprobs))[:n]
    return picked


def _response(request_id: str, model: str, plan: _Plan, streams: list[RequestStream],
              choices: list[Choice], k: int, n: int) -> dict:
    out = []
    for index, i in enumerate(_best(choices, k, n) if k > n else range(len(choices))):
        stream, c = streams[i], choices[i]
        text = plan.text(stream, c.text, True)
        logprobs = None
        if plan.want_logprobs:  # offsets index the returned text
            entries = plan.entries(TokenPieces(), stream, c.logprobs, c.prompt_logprobs, True)
            logprobs = legacy(entries, 0, len(text))
        out.append({"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": c.finish_reason})
    completion_tokens = sum(plan.completion_tokens(len(c.token_ids)) for c in choices)
    return {"id": request_id, "object": "text_completion", "created": created(), "model": model,
            "choices": out, "usage": _usage(streams[::k], completion_tokens)}


async def _stream(request_id: str, model: str, body: CompletionRequest, plan: _Plan,
                  streams: list[RequestStream], k: int, items: AsyncIterator[Item]):
    started = [False] * len(streams)
    offsets = [0] * len(streams)  # each choice's text so far: offsets index its text
    pieces = [TokenPieces() for _ in streams]
    completion_tokens = 0
    include_usage = body.include_usage
    base = {"id": request_id, "object": "text_completion", "created": created(), "model": model}
    try:
        async for i, out in items:
            check_finish(out)
            first, started[i] = not started[i], True
            stream = streams[i]
            logprobs = None
            if plan.want_logprobs:
                entries = plan.entries(pieces[i], stream, out.new_logprobs, out.prompt_logprobs, first)
                logprobs = legacy(entries, offsets[i])
                offsets[i] += sum(len(e[0]) for e in entries)
            completion_tokens += plan.completion_tokens(len(out.new_token_ids))
            choice = {"index": i, "text": plan.text(stream, out.new_text, first),
                      "logprobs": logprobs, "finish_reason": finish_reason(out)}
            chunk = {**base, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            yield sse(chunk)
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(streams[::k], completion_tokens)})
    except Exception as exc:  # noqa: BLE001 - reported to the client inside the stream
        yield stream_error(exc)
    yield DONE
