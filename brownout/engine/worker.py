"""The engine's own process: receives commands, steps the engine, sends outputs back.

`worker_main` is the spawn target. It is torch-free at import time: the engine class is
named by a "module:attr" string and imported inside the child, so the HTTP process never
loads torch. All tokenisation and chat templating happen here; the parent only sees token
ids and text.

Wire protocol (plain tuples of builtin types and `brownout.types` dataclasses, so the
parent can unpickle them without importing the engine):
  parent -> child: ("add", AddCommand) | ("abort", request_id) | ("shutdown",)
                   | ("query", query_id, kind, payload)   kind: tokenize | detokenize | tokenizer_info
  child -> parent: ("ready", info) | ("fatal", message)
                   | ("added", request_id, AddResult) | ("add_error", request_id, AddError)
                   | ("answer", query_id, value, AddError | None)
                   | ("step", time, [PackedOutput], StepStats | None, snapshot)
                   | ("snapshot", time, snapshot)
When idle the child blocks on its command queue; while it has work it takes in commands
without blocking between steps (text up to TEXT_CHARS_PER_STEP characters per step). No one
request ends the process: a failed add is that request's AddError, a failed step ends the
requests it held with finish reason "error" (brownout.engine.llm_engine); only an engine whose
steps keep failing exits, and the parent starts a fresh one.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import queue
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, Union

from brownout.engine.gc_pauses import GCPauses, freeze_startup_heap
from brownout.engine.tokens import TokenBytes, tokenizer_query
from brownout.types import (AdmissionError, EngineBrokenError, FinishReason, Logprob,
                            RequestMetrics, SamplingParams, StepStats, ValidationError)

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_FACTORY = "brownout.engine.llm_engine:LLMEngine"
# Texts of single tokens kept for echo and logprobs: a vocabulary's common tokens, bounded.
_TOKEN_TEXT_CACHE = 65536
# An idle worker wakes this often, and a busy one looks this often between steps, to notice
# that the serving process died.
_IDLE_POLL_S = 1.0

# Text a busy engine takes in between two steps, in characters: the prompts of a burst of long
# text requests are tokenised over several steps, so the running requests keep stepping.
TEXT_CHARS_PER_STEP = 65536
# A text prompt longer than this many characters per allowed token is measured on growing
# prefixes first, so text far over the limit is refused after tokenising about a context's
# worth of it, not all of it (real text averages about 4 characters per token).
_PREFIX_CHARS_PER_TOKEN = 8
# Tokens a prefix may hold beyond the limit before it refuses the text: the word cut at the
# prefix's end may split into more tokens than it does in the whole text.
_PREFIX_TOKEN_MARGIN = 64

# (token_id, token_text, logprob, [(alt_id, alt_text, alt_logprob, alt_bytes), ...], token_bytes)
# or None; a token's bytes are its raw bytes, which need not be whole UTF-8 characters
PackedLogprob = Optional[tuple]


@dataclass(slots=True)
class AddCommand:
    request_id: str
    prompt: Union[str, list[int], None]  # text or token ids (completions)
    messages: Optional[list[dict]]  # chat messages (chat completions); prompt is None then
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    clamp_max_tokens: bool = False  # shrink max_tokens to fit the context (chat default)
    want_prompt_text: bool = False  # echo: send the prompt's text and per-token text back


@dataclass(slots=True)
class AddResult:
    prompt_token_ids: list[int]
    max_tokens: int  # after clamping
    prompt_text: Optional[str] = None
    prompt_token_texts: Optional[list[str]] = None
    prompt_token_bytes: Optional[list[bytes]] = None


@dataclass(slots=True)
class AddError:
    kind: str  # "validation" | "admission" | "internal"
    message: str
    field: Optional[str] = None
    retry_after_s: Optional[float] = None


@dataclass(slots=True)
class PackedOutput:
    """One request's step output, without the full token lists (the parent rebuilds them)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: Optional[FinishReason]
    new_logprobs: list[PackedLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[PackedLogprob]] = None
    metrics: Optional[RequestMetrics] = None


@dataclass(slots=True)
class WorkerOptions:
    engine_factory: str = DEFAULT_ENGINE_FACTORY
    max_prompt_tokens: Optional[int] = None  # default: max_model_len - 1
    # "module:function" returning the model directory to use when config.load.model is ""
    default_model_factory: Optional[str] = None
    log_level: int = logging.INFO


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class _Session:
    """The child's state: the engine plus helpers to turn its outputs into wire tuples."""

    def __init__(self, engine: Any, options: WorkerOptions, out_q):
        self.engine = engine
        self.out_q = out_q
        self.max_model_len = int(engine.max_model_len)
        self.max_prompt_tokens = min(options.max_prompt_tokens or self.max_model_len - 1,
                                     self.max_model_len - 1)
        self.token_text = lru_cache(maxsize=_TOKEN_TEXT_CACHE)(self._decode_one)
        self.token_bytes = lru_cache(maxsize=_TOKEN_TEXT_CACHE)(
            TokenBytes(getattr(engine, "tokenizer", None), self._decode_one))
        self.gc_pauses: Optional[GCPauses] = None  # set by the worker process

    def _decode_one(self, token_id: int) -> str:
        return self._decode([token_id])

    def _decode(self, ids: list[int]) -> str:
        tokenizer = self.engine.tokenizer
        return "" if tokenizer is None else tokenizer.decode(ids)

    # ------------------------------------------------------------------ commands
    def add(self, cmd: AddCommand) -> None:
        try:
            result = self._add(cmd)
        except ValidationError as exc:
            self.out_q.put(("add_error", cmd.request_id, AddError("validation", exc.message, exc.field)))
        except AdmissionError as exc:
            err = AddError("admission", str(exc), retry_after_s=float(exc.retry_after_s))
            self.out_q.put(("add_error", cmd.request_id, err))
        except Exception as exc:  # anything else is the engine's fault, not the client's
            logger.exception("add_request %s failed", cmd.request_id)
            self._drop(cmd.request_id)
            err = AddError("internal", f"{type(exc).__name__}: {exc}")
            self.out_q.put(("add_error", cmd.request_id, err))
        else:
            self.out_q.put(("added", cmd.request_id, result))

    def _drop(self, request_id: str) -> None:
        """Take back a request whose add failed after the engine queued it (its client was
        told it failed, so nothing would ever end it)."""
        if request_id in self.engine.requests:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:  # one request's clean-up must not end the engine
            logger.exception("abort of request %s failed", request_id)

    def _add(self, cmd: AddCommand) -> AddResult:
        prompt = cmd.prompt
        if isinstance(prompt, str):
            self._check_text_len(prompt)
        if cmd.messages is not None:
            prompt = [int(t) for t in self.engine.apply_chat_template(cmd.messages)]
        if isinstance(prompt, list):
            self._check_prompt_len(len(prompt), "messages" if cmd.messages is not None else "prompt")
            if cmd.clamp_max_tokens:
                cmd.params.max_tokens = max(1, min(cmd.params.max_tokens,
                                                   self.max_model_len - len(prompt)))
        ids = [int(t) for t in self.engine.add_request(
            cmd.request_id, prompt, cmd.params, arrival_time=cmd.arrival_time,
            priority=cmd.priority)]
        try:  # a text prompt is only measured once the engine has tokenised it
            self._check_prompt_len(len(ids), "prompt")
        except ValidationError:
            self.engine.abort_request(cmd.request_id)
            raise
        result = AddResult(ids, cmd.params.max_tokens)
        if cmd.want_prompt_text:
            result.prompt_text = prompt if isinstance(prompt, str) else self._decode(ids)
            result.prompt_token_texts = [self.token_text(t) for t in ids]
            result.prompt_token_bytes = [self.token_bytes(t) for t in ids]
        return result

    def query(self, query_id: int, kind: str, payload: dict) -> None:
        """Answer a tokenizer query (tokenize, detokenize, tokenizer_info) without a step."""
        try:
            value = tokenizer_query(self.engine, kind, payload)
        except ValidationError as exc:
            self.out_q.put(("answer", query_id, None, AddError("validation", exc.message, exc.field)))
        except Exception as exc:  # anything else is the engine's fault, not the client's
            logger.exception("%s query failed", kind)
            self.out_q.put(("answer", query_id, None, AddError("internal", f"{type(exc).__name__}: {exc}")))
        else:
            self.out_q.put(("answer", query_id, value, None))

    def _check_text_len(self, text: str) -> None:
        """Refuse a long text whose prefix already holds too many tokens (the engine still
        measures the whole text of one that passes)."""
        tokenizer = self.engine.tokenizer
        size = self.max_prompt_tokens * _PREFIX_CHARS_PER_TOKEN
        while tokenizer is not None and size < len(text):
            n = len(tokenizer.encode(text[:size], add_special_tokens=False))
            if n > self.max_prompt_tokens + _PREFIX_TOKEN_MARGIN:
                raise ValidationError("prompt", f"prompt has more than {self.max_prompt_tokens} "
                                                f"tokens (its first {size} characters hold {n})")
            size *= 2

    def _check_prompt_len(self, n: int, field_name: str) -> None:
        if n > self.max_prompt_tokens:
            raise ValidationError(field_name, f"prompt has {n} tokens; at most "
                                              f"{self.max_prompt_tokens} are allowed")
        if n == 0:
            raise ValidationError(field_name, "prompt is empty (0 tokens)")

    # ------------------------------------------------------------------ outputs
    def _pack_logprob(self, lp: Optional[Logprob]) -> PackedLogprob:
        if lp is None:
            return None
        tops = [(int(t), self.token_text(int(t)), float(v), self.token_bytes(int(t)))
                for t, v in lp.top.items()]
        token_id = int(lp.token_id)
        return (token_id, self.token_text(token_id), float(lp.logprob), tops,
                self.token_bytes(token_id))

    def pack(self, out) -> PackedOutput:
        packed = PackedOutput(out.request_id, [int(t) for t in out.new_token_ids], str(out.new_text),
                              bool(out.finished), out.finish_reason, metrics=out.metrics)
        if out.new_logprobs:
            packed.new_logprobs = [self._pack_logprob(lp) for lp in out.new_logprobs]
        if out.prompt_logprobs is not None:
            packed.prompt_logprobs = [self._pack_logprob(lp) for lp in out.prompt_logprobs]
        return packed

    def snapshot(self) -> dict:
        snap = dict(self.engine.snapshot())
        if self.gc_pauses is not None:
            snap.update(self.gc_pauses.snapshot())
        return snap

    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineBrokenError:
            raise
        except Exception:  # no one request's: end them all, keep the engine
            logger.exception("engine step failed; ending every request with an error")
            outputs = self.engine.fail_all()
        # the step this call collected (None when it collected none), else the engine's last
        stats: Optional[StepStats] = getattr(self.engine, "fresh_step_stats",
                                             getattr(self.engine, "last_step_stats", None))
        packed = [self.pack(o) for o in outputs]
        self.out_q.put(("step", time.monotonic(), packed, stats, self.snapshot()))


class ParentGone(Exception):
    """The serving process died without sending shutdown."""


def _next_commands(cmd_q, block: bool) -> list[tuple]:
    """All queued commands; waits for the first one only when `block` (the engine is idle)."""
    cmds = []
    parent = multiprocessing.parent_process()
    while block and not cmds:
        try:  # wakes only to notice an orphaned worker
            cmds.append(cmd_q.get(timeout=_IDLE_POLL_S))
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                raise ParentGone()
    while True:
        try:
            cmds.append(cmd_q.get_nowait())
        except queue.Empty:
            return cmds


def _check_parent(last_check: float) -> float:
    """Raise ParentGone if the serving process died; looks once per _IDLE_POLL_S."""
    now = time.monotonic()
    if now - last_check < _IDLE_POLL_S:
        return last_check
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        raise ParentGone()
    return now


def _text_chars(cmd: tuple) -> int:
    if cmd[0] != "add":
        return 0
    add: AddCommand = cmd[1]
    if add.messages is not None:
        return sum(len(str(m.get("content") or "")) for m in add.messages if isinstance(m, dict))
    return len(add.prompt) if isinstance(add.prompt, str) else 0


def _serve(session: _Session, cmd_q) -> None:
    """Take in commands in order and step while there is work; between two steps, take in
    text up to TEXT_CHARS_PER_STEP characters (at least one command), the rest after the step."""
    engine = session.engine
    parent_checked = time.monotonic()
    backlog: deque[tuple] = deque()
    while True:
        busy = engine.has_unfinished_requests() or bool(backlog)
        backlog.extend(_next_commands(cmd_q, block=not busy))
        took, budget = bool(backlog), TEXT_CHARS_PER_STEP
        while backlog and budget > 0:
            cmd = backlog.popleft()
            budget -= _text_chars(cmd)
            if cmd[0] == "add":
                session.add(cmd[1])
            elif cmd[0] == "abort":
                session.abort(cmd[1])
            elif cmd[0] == "query":
                session.query(*cmd[1:])
            elif cmd[0] == "shutdown":
                return
        if engine.has_unfinished_requests():
            parent_checked = _check_parent(parent_checked)
            session.step()
        elif took:  # aborts free KV blocks: let the parent's gauges see it
            session.out_q.put(("snapshot", time.monotonic(), session.snapshot()))


def worker_main(config: Any, options: WorkerOptions, cmd_q, out_q) -> None:
    """Spawn target: build the engine from `config`, report ready, serve until shutdown."""
    logging.basicConfig(level=options.log_level,
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    # Ctrl-C and a SIGTERM to the process group reach the engine too; the parent decides when
    # the engine stops (after draining), and the engine exits by itself when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if not config.load.model and options.default_model_factory:
            model_dir = str(_load_factory(options.default_model_factory)())
            config = dataclasses.replace(config, load=dataclasses.replace(config.load, model=model_dir))
        engine = _load_factory(options.engine_factory)(config)
        session = _Session(engine, options, out_q)
        # the model and libraries stay alive for the process's life: out of the collector's
        # way, full collections walk only what serving allocates (see gc_pauses)
        frozen = freeze_startup_heap()
        session.gc_pauses = GCPauses().install()
        logger.info("froze %d objects of the startup heap for the garbage collector", frozen)
        out_q.put(("ready", {"model_name": str(engine.model_name),
                             "max_model_len": session.max_model_len,
                             "max_prompt_tokens": session.max_prompt_tokens,
                             "vocab_size": int(engine.spec.vocab_size)}))
        out_q.put(("snapshot", time.monotonic(), session.snapshot()))
        _serve(session, cmd_q)
    except ParentGone:
        logger.warning("serving process is gone; engine exits")
        out_q.cancel_join_thread()
    except BaseException as exc:  # report why, so the parent can fail requests with a reason
        logger.error("engine failed: %s", traceback.format_exc())
        out_q.put(("fatal", f"{type(exc).__name__}: {exc}"))
    finally:
        out_q.close()
        out_q.join_thread()
