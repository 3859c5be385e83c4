"""The HTTP process's handle on the engine, which runs in its own process (brownout.engine.worker).

`EngineClient` spawns the worker, waits until it reports ready, and routes the worker's
step outputs to one asyncio queue per request. It is torch-free: the worker does all
tokenisation and chat templating, and its messages hold only builtin types and
`brownout.types` dataclasses. Errors from `add_request` come back as `ValidationError`
(with `.field`) or `AdmissionError` (with `.retry_after_s`); a dead worker fails every
pending request with `EngineDeadError` and is started again; a request that the engine
ended with an error (a failed step) raises `EngineInternalError` from its stream.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Union

from brownout.api.engine_restart import RestartPolicy

from brownout.types import (AdmissionError, FinishReason, Logprob, RequestOutput, SamplingParams,
                            StepStats, ValidationError)

logger = logging.getLogger(__name__)

# Imported by name so that static import analysis of this module stays torch-free even if
# the worker module ever grows engine imports; the worker itself imports the engine lazily.
_WORKER_MODULE = "brownout.engine.worker"

# How often the waits on the worker's queue wake up to notice that the worker died.
_POLL_S = 0.5
# A killed engine process is given this long to be reaped before shutdown moves on.
_TERMINATE_JOIN_S = 5.0
# What the gauges read while no engine runs.
_EMPTY_SNAPSHOT = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0}
# A refusal whose message carries no retry hint asks the client to retry after this long.
_DEFAULT_RETRY_AFTER_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine process is gone; no request can be served."""


class EngineInternalError(RuntimeError):
    """add_request failed for a reason that is not the user's fault."""


@dataclass(slots=True)
class TokenLogprob(Logprob):
    """A `Logprob` with the text of the token and of each alternative."""

    text: str = ""
    top_texts: dict[int, str] = field(default_factory=dict)
    token_bytes: bytes = b""  # the token's raw bytes (not always whole UTF-8 characters)
    top_bytes: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model_name: str
    max_model_len: int
    max_prompt_tokens: int
    vocab_size: Optional[int] = None  # token ids are in [0, vocab_size)


class EngineListener(Protocol):
    """Receives every engine step (the metrics exporter implements this)."""

    def on_step(self, t: float, outputs: list[RequestOutput], stats: Optional[StepStats],
                snapshot: dict) -> None: ...

    def on_snapshot(self, snapshot: dict) -> None: ...

    def on_request_start(self, request_id: str, arrival_time: float) -> None: ...

    def on_request_end(self, request_id: str) -> None: ...

    def on_engine_restart(self, num_restarts: int) -> None: ...


class RequestStream:
    """Async iterator over one request's outputs; also holds what the worker told us about it."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.prompt_token_ids: list[int] = []
        self.output_token_ids: list[int] = []
        self.max_tokens: int = 0
        self.arrival_time: float = 0.0
        self.prompt_text: Optional[str] = None
        self.prompt_token_texts: Optional[list[str]] = None
        self.prompt_token_bytes: Optional[list[bytes]] = None
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


def _unpack_logprob(packed) -> Optional[TokenLogprob]:
    if packed is None:
        return None
    token_id, text, logprob, tops, token_bytes = packed
    return TokenLogprob(token_id, logprob, top={t: v for t, _, v, _ in tops}, text=text,
                        top_texts={t: s for t, s, _, _ in tops}, token_bytes=token_bytes,
                        top_bytes={t: b for t, _, _, b in tops})


class EngineClient:
    """Starts the engine process, talks to it from asyncio code, and starts it again when it
    dies (brownout.api.engine_restart): while it restarts `is_alive` is false and
    `restarting` true; after too many deaths `gave_up` holds why, and the callbacks in
    `on_give_up` run (the server exits then)."""

    def __init__(self, config: Any, options: Any = None, ready_timeout_s: float = 900.0,
                 restart_policy: Optional[RestartPolicy] = None):
        worker = importlib.import_module(_WORKER_MODULE)
        self._worker_main = worker.worker_main
        self._add_command = worker.AddCommand
        self.config = config
        self.options = options or worker.WorkerOptions()
        self.ready_timeout_s = ready_timeout_s
        self.info: Optional[EngineInfo] = None
        self.last_snapshot: dict = {}
        self.dead_reason: Optional[str] = None
        self.listeners: list[EngineListener] = []
        self.restart_policy = restart_policy or RestartPolicy()
        self.num_restarts = 0
        self.gave_up: Optional[str] = None
        self.on_give_up: list[Callable[[str], None]] = []
        self._restart_task: Optional[asyncio.Task] = None
        self._streams: dict[str, RequestStream] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._queries: dict[int, asyncio.Future] = {}
        self._next_query = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._proc = None
        self._generation = 0  # counts engine processes started; a reader serves one of them
        self._stop = threading.Event()
        self._cmd_q = self._out_q = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> EngineInfo:
        self._loop = asyncio.get_running_loop()
        return await self._start_process()

    async def _start_process(self) -> EngineInfo:
        """Spawn an engine process, wait until it is ready, start reading its messages."""
        ctx = multiprocessing.get_context("spawn")
        self._cmd_q, self._out_q = ctx.Queue(), ctx.Queue()
        self._generation += 1
        self._proc = proc = ctx.Process(target=self._worker_main, name="brownout-engine", daemon=True,
                                        args=(self.config, self.options, self._cmd_q, self._out_q))
        proc.start()
        self.info = await self._loop.run_in_executor(None, self._wait_ready, proc, self._out_q)
        self.dead_reason = None
        threading.Thread(target=self._read_loop, args=(self._generation, proc, self._out_q),
                         name="engine-reader", daemon=True).start()
        logger.info("engine ready: %s (pid %d)", self.info, proc.pid)
        return self.info

    def _wait_ready(self, proc, out_q) -> EngineInfo:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                msg = out_q.get(timeout=_POLL_S)
            except queue.Empty:
                if not proc.is_alive():
                    raise EngineDeadError(f"engine exited with code {proc.exitcode} while loading")
                continue
            if msg[0] == "ready":
                return EngineInfo(**msg[1])
            if msg[0] == "fatal":
                raise EngineDeadError(f"engine failed to start: {msg[1]}")
        if self._stop.is_set():
            raise EngineDeadError("engine shut down while loading")
        raise EngineDeadError(f"engine not ready after {self.ready_timeout_s} s")

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self._proc is None or self._cmd_q is None:  # never started, or already shut down
            return
        if self._proc.is_alive():
            self._cmd_q.put(("shutdown",))
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, timeout_s)
        self._mark_dead("engine shut down")
        self._end_process()

    def _end_process(self) -> None:
        """Kill the engine process if it still runs (it ignores SIGTERM) and drop its queues."""
        if self._proc.is_alive():
            logger.warning("engine process %d did not stop; killing it", self._proc.pid)
            self._proc.kill()
        self._proc.join(_TERMINATE_JOIN_S)
        for q in (self._cmd_q, self._out_q):
            q.cancel_join_thread()  # a dead reader never drains what is left in the pipe
            q.close()
        # Dropped so their semaphores are released now, not reported as leaked at exit.
        self._cmd_q = self._out_q = None

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._proc is not None and self._proc.is_alive()

    @property
    def restarting(self) -> bool:
        return self._restart_task is not None and not self._restart_task.done()

    @property
    def worker_pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    # ------------------------------------------------------------------ restarts
    def _on_exit(self, generation: int, reason: str) -> None:
        """The engine process of `generation` is gone: fail its requests, start another."""
        if generation != self._generation or self._stop.is_set():
            return
        self._mark_dead(reason)
        self.last_snapshot = dict(_EMPTY_SNAPSHOT)  # the dead engine's queue and KV are gone
        self._notify("on_snapshot", self.last_snapshot)
        if not self.restarting and self.gave_up is None:
            self._restart_task = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        while not self._stop.is_set():
            delay = self.restart_policy.on_death(time.monotonic())
            if delay is None:
                self._give_up()
                return
            logger.warning("engine died (%s); starting it again in %.1f s", self.dead_reason, delay)
            await asyncio.sleep(delay)
            self._end_process()
            try:
                await self._start_process()
            except Exception as exc:  # a failed start counts as one more death
                self.dead_reason = f"engine restart failed: {exc}"
                logger.error("%s", self.dead_reason)
                continue
            self.num_restarts += 1
            self._notify("on_engine_restart", self.num_restarts)
            return

    def _give_up(self) -> None:
        self.gave_up = (f"engine died {self.restart_policy.recent_deaths} times within "
                        f"{self.restart_policy.window_s:g} s; last: {self.dead_reason}")
        logger.critical("giving up on the engine: %s", self.gave_up)
        for callback in self.on_give_up:
            callback(self.gave_up)

    # ------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, prompt: Union[str, list[int], None],
                          params: SamplingParams, *, messages: Optional[list[dict]] = None,
                          priority: int = 0, arrival_time: Optional[float] = None,
                          clamp_max_tokens: bool = False,
                          want_prompt_text: bool = False) -> RequestStream:
        """Submit a request; returns its stream once the engine accepted it, else raises."""
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine not running")
        if request_id in self._streams:
            raise ValidationError("request_id", f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id)
        ack = self._loop.create_future()
        self._streams[request_id] = stream
        self._pending[request_id] = ack
        cmd = self._add_command(request_id, prompt, messages, params,
                                arrival_time if arrival_time is not None else time.monotonic(),
                                priority, clamp_max_tokens, want_prompt_text)
        self._cmd_q.put(("add", cmd))
        stream.arrival_time = cmd.arrival_time
        try:
            await ack
        except asyncio.CancelledError:  # the caller went away before the engine answered
            self.abort(request_id)
            raise
        return stream

    async def generate(self, request_id: str, prompt_or_messages: Union[str, list],
                       params: SamplingParams, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; aborts it if the consumer stops early."""
        is_chat = isinstance(prompt_or_messages, list) and bool(prompt_or_messages) \
            and isinstance(prompt_or_messages[0], dict)
        stream = await self.add_request(
            request_id, None if is_chat else prompt_or_messages, params,
            messages=prompt_or_messages if is_chat else None, priority=priority,
            clamp_max_tokens=is_chat)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def query(self, kind: str, **payload) -> Any:
        """A tokenizer query answered by the engine process between steps (see worker.py)."""
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine not running")
        self._next_query += 1
        query_id = self._next_query
        answer = self._loop.create_future()
        self._queries[query_id] = answer
        self._cmd_q.put(("query", query_id, kind, payload))
        try:
            return await answer
        finally:
            self._queries.pop(query_id, None)

    def _on_answer(self, query_id: int, value: Any, err) -> None:
        answer = self._queries.pop(query_id, None)
        if answer is None or answer.done():
            return
        if err is None:
            answer.set_result(value)
        elif err.kind == "validation":
            answer.set_exception(ValidationError(err.field or "request", err.message))
        else:
            answer.set_exception(EngineInternalError(err.message))

    def abort(self, request_id: str) -> None:
        """Stop a request now (its KV blocks are freed by the engine); unknown ids are ignored."""
        stream = self._streams.pop(request_id, None)
        ack = self._pending.pop(request_id, None)
        if ack is not None and not ack.done():
            ack.cancel()
        if stream is None:
            return
        if self.is_alive:
            self._cmd_q.put(("abort", request_id))
        self._notify("on_request_end", request_id)

    # ------------------------------------------------------------------ worker messages
    def _read_loop(self, generation: int, proc, out_q) -> None:
        """Reader thread of one engine process: hands its messages to the event loop, and
        its exit too (once its queue is drained)."""
        while not self._stop.is_set():
            try:
                msg = out_q.get(timeout=_POLL_S)
            except queue.Empty:
                if not proc.is_alive():
                    self._to_loop(self._on_exit, generation,
                                  f"engine process exited (code {proc.exitcode})")
                    return
                continue
            except (EOFError, OSError, ValueError):  # ValueError: the queue was closed
                self._to_loop(self._on_exit, generation, "engine pipe closed")
                return
            if not self._to_loop(self._dispatch_of, generation, msg):
                return

    def _to_loop(self, callback, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # event loop closed during shutdown
            return False

    def _dispatch_of(self, generation: int, msg: tuple) -> None:
        if generation == self._generation:  # else a message of an engine already replaced
            self._dispatch(msg)

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._on_step(*msg[1:])
        elif kind == "snapshot":
            self.last_snapshot = msg[2]
            self._notify("on_snapshot", msg[2])
        elif kind == "added":
            self._on_added(msg[1], msg[2])
        elif kind == "add_error":
            self._on_add_error(msg[1], msg[2])
        elif kind == "answer":
            self._on_answer(*msg[1:])
        elif kind == "fatal":
            self._mark_dead(f"engine failed: {msg[1]}")

    def _on_added(self, request_id: str, result) -> None:
        # Filled in here, not in add_request: this request's first output may be dispatched
        # before the awaiting coroutine resumes.
        ack = self._pending.pop(request_id, None)
        stream = self._streams.get(request_id)
        if stream is None:
            return
        stream.prompt_token_ids = result.prompt_token_ids
        stream.max_tokens = result.max_tokens
        stream.prompt_text = result.prompt_text
        stream.prompt_token_texts = result.prompt_token_texts
        stream.prompt_token_bytes = result.prompt_token_bytes
        self._notify("on_request_start", request_id, stream.arrival_time)
        if ack is not None and not ack.done():
            ack.set_result(result)

    def _on_add_error(self, request_id: str, err) -> None:
        self._streams.pop(request_id, None)
        ack = self._pending.pop(request_id, None)
        if ack is None or ack.done():
            return
        if err.kind == "validation":
            ack.set_exception(ValidationError(err.field or "request", err.message))
        elif err.kind == "admission":
            ack.set_exception(AdmissionError(err.message, err.retry_after_s or _DEFAULT_RETRY_AFTER_S))
        else:
            ack.set_exception(EngineInternalError(err.message))

    def _on_step(self, t: float, packed: list, stats: Optional[StepStats], snapshot: dict) -> None:
        self.last_snapshot = snapshot
        outputs = []
        for p in packed:
            stream = self._streams.get(p.request_id)
            if stream is None:  # aborted while the step ran
                continue
            stream.output_token_ids.extend(p.new_token_ids)
            out = RequestOutput(
                p.request_id, stream.prompt_token_ids, p.new_token_ids, p.new_text,
                list(stream.output_token_ids), p.finished, p.finish_reason,
                [_unpack_logprob(x) for x in p.new_logprobs],
                None if p.prompt_logprobs is None else [_unpack_logprob(x) for x in p.prompt_logprobs],
                p.metrics)
            outputs.append(out)
            if p.finish_reason == FinishReason.ERROR:  # its step failed; the others go on
                stream._queue.put_nowait(EngineInternalError("the engine failed while running "
                                                             "this request"))
            else:
                stream._queue.put_nowait(out)
            if p.finished:
                del self._streams[p.request_id]
        self._notify("on_step", t, outputs, stats, snapshot)

    def _notify(self, method: str, *args) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, method)(*args)
            except Exception:  # a metrics bug must never break request routing
                logger.exception("engine listener %s.%s failed", type(listener).__name__, method)

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            if reason != "engine shut down":
                logger.error("%s", reason)
        for ack in self._pending.values():
            if not ack.done():
                ack.set_exception(EngineDeadError(reason))
        for stream in self._streams.values():
            stream._queue.put_nowait(EngineDeadError(reason))
            self._notify("on_request_end", stream.request_id)
        for answer in self._queries.values():
            if not answer.done():
                answer.set_exception(EngineDeadError(reason))
        self._pending.clear()
        self._streams.clear()
        self._queries.clear()
