"""Shared plumbing of the generation endpoints: submit, merge streams, SSE, disconnects.

A request may carry several prompts (completions); each becomes one engine request and
one choice. Whatever way a response ends (done, client gone, error), every engine request
still running is aborted at once, so its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from starlette.requests import Request
from starlette.responses import StreamingResponse

from brownout.api.errors import APIError, to_api_error
from brownout.api.engine_client import EngineClient, RequestStream, TokenLogprob
from brownout.types import FinishReason, RequestOutput

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def created() -> int:
    return int(time.time())


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def submit_all(client: EngineClient, request_id: str, jobs: list[dict]) -> list[RequestStream]:
    """Submit every prompt at once; if any is refused, abort the others and raise."""
    ids = [request_id if len(jobs) == 1 else f"{request_id}-{i}" for i in range(len(jobs))]
    results = await asyncio.gather(*(client.add_request(rid, **job) for rid, job in zip(ids, jobs)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        abort_all(client, [r for r in results if isinstance(r, RequestStream)])
        raise errors[0]
    return list(results)


def abort_all(client: EngineClient, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.finished:
            client.abort(stream.request_id)


def check_finish(out: RequestOutput) -> None:
    """A request dropped from the queue for waiting too long is an overload answer (429)."""
    if out.finish_reason == FinishReason.TIMEOUT:
        raise APIError(429, "request waited in the queue longer than the queue timeout",
                       code="queue_timeout", headers={"Retry-After": "1"})


def finish_reason(out: RequestOutput) -> Optional[str]:
    return out.finish_reason.value if out.finished and out.finish_reason is not None else None


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from all streams in arrival order."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                q.put_nowait((i, out))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await q.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class Choice:
    """Everything one finished engine request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    finish_reason: Optional[str] = None


async def collect(streams: list[RequestStream]) -> list[Choice]:
    choices = [Choice() for _ in streams]
    async for i, out in merged(streams):
        check_finish(out)
        c = choices[i]
        c.text += out.new_text
        c.token_ids.extend(out.new_token_ids)
        c.logprobs.extend(out.new_logprobs)
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            c.finish_reason = finish_reason(out)
    return choices


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, client: EngineClient, streams: list[RequestStream],
                           work) -> Optional[object]:
    """Run `work` (a coroutine); None if the client went away first (requests aborted)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        abort_all(client, streams)


class AbortingStreamingResponse(StreamingResponse):
    """A streaming response that runs `on_close` however the stream ends (client gone too)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def stream_error(exc: BaseException) -> str:
    """An error met after the stream started: sent as one SSE event before [DONE]."""
    return sse(to_api_error(exc).body())
