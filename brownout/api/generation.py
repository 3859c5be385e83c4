"""Shared plumbing of the generation endpoints: submit, merge streams, SSE, disconnects.

A request may carry several prompts (completions); each becomes one engine request and
one choice. `Outputs` merges their engine streams through one queue, which the shutdown
drain watches (brownout.api.drain), so a shutdown can end the response. A streaming
response starts only once the first output has come: a request refused before its first
token (queue timeout 429, engine gone 503, shutdown 503) gets that status, not a 200 with
an error event. Whatever way a response ends (done, client gone, error), every engine
request still running is aborted at once, so its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from brownout.api.drain import Drain
from brownout.api.errors import APIError, retry_after, to_api_error
from brownout.api.engine_client import EngineClient, RequestStream, TokenLogprob
from brownout.types import FinishReason, RequestOutput

DONE = "data: [DONE]\n\n"

T = TypeVar("T")
Item = tuple[int, RequestOutput]  # (choice index, output)


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
    """A request dropped from the queue for waiting too long is an overload answer (429). Its
    Retry-After is the time it waited: the queue ahead of it took at least that long."""
    if out.finish_reason == FinishReason.TIMEOUT:
        m = out.metrics
        waited = m.finished_time - m.arrival_time if m and m.finished_time is not None else 0.0
        raise APIError(429, "request waited in the queue longer than the queue timeout",
                       code="queue_timeout", headers={"Retry-After": retry_after(waited)})


def finish_reason(out: RequestOutput) -> Optional[str]:
    return out.finish_reason.value if out.finished and out.finish_reason is not None else None


class Outputs:
    """(choice index, output) from all streams of one request in arrival order. Raises what
    a stream raises, or the drain's error when a shutdown ends the request. `close()` it."""

    def __init__(self, streams: list[RequestStream], drain: Drain):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._left = len(streams)
        self._drain = drain
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        drain.watch(self._queue)

    async def _pump(self, i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((i, out))
        except Exception as exc:  # handed to the consumer, which raises it
            self._queue.put_nowait(exc)

    def __aiter__(self) -> "Outputs":
        return self

    async def __anext__(self) -> Item:
        if self._left == 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._left -= item[1].finished
        return item

    async def first(self) -> Item:
        """The first output; a refusal (queue timeout) raises."""
        item = await self.__anext__()
        check_finish(item[1])
        return item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._drain.unwatch(self._queue)


async def with_first(first: Item, outputs: Outputs) -> AsyncIterator[Item]:
    yield first
    async for item in outputs:
        yield item


@dataclass
class Choice:
    """Everything one finished engine request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    finish_reason: Optional[str] = None


async def collect(outputs: Outputs, n: int) -> list[Choice]:
    choices = [Choice() for _ in range(n)]
    async for i, out in outputs:
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


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`; ClientGone (and `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        watcher.cancel()
        task.cancel()


async def collect_all(request: Request, client: EngineClient, drain: Drain,
                      streams: list[RequestStream]) -> Optional[list[Choice]]:
    """Every output gathered into one choice per stream; None if the client left first."""
    outputs = Outputs(streams, drain)
    try:
        return await or_disconnect(request, collect(outputs, len(streams)))
    except ClientGone:
        return None
    finally:
        outputs.close()
        abort_all(client, streams)


async def first_output(request: Request, client: EngineClient, drain: Drain,
                       streams: list[RequestStream]) -> Optional[tuple[Item, Outputs]]:
    """The first output and the outputs after it, for a stream (whose `on_close` must close
    them); None if the client left first. A refusal before the first token raises."""
    outputs = Outputs(streams, drain)
    try:
        return await or_disconnect(request, outputs.first()), outputs
    except BaseException as exc:
        outputs.close()
        abort_all(client, streams)
        if isinstance(exc, ClientGone):
            return None
        raise


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


def streaming(content: AsyncIterator[str], client: EngineClient, streams: list[RequestStream],
              outputs: Outputs) -> AbortingStreamingResponse:
    def close() -> None:
        outputs.close()
        abort_all(client, streams)

    return AbortingStreamingResponse(content, on_close=close)


def stream_error(exc: BaseException) -> str:
    """An error met after the stream started: sent as one SSE event before [DONE]."""
    return sse(to_api_error(exc).body())
