"""Engine outputs: detokenise accepted tokens, find stop strings, build `RequestOutput`s.

Every request's text is decoded incrementally (`IncrementalDetokenizer`, kept on the
request); a stop string found in it ends the output there, and the engine finishes the
request through the scheduler.
"""

from __future__ import annotations

from typing import Optional

from brownout.engine.detokenizer import IncrementalDetokenizer
from brownout.engine.request import Request
from brownout.engine.scheduler import NewToken
from brownout.types import FinishReason, RequestOutput


def start_detokenizer(tokenizer, req: Request) -> None:
    p = req.sampling
    req.detok_state = IncrementalDetokenizer(tokenizer, req.prompt_token_ids, p.stop,
                                             p.include_stop_str_in_output)


def detokenize(req: Request, token: int) -> Optional[int]:
    """Add a token to the request's text; the index where a stop string ends it, if any."""
    detok: IncrementalDetokenizer = req.detok_state
    detok.add(token)
    return detok.find_stop()


def token_output(new: NewToken, cut: Optional[int]) -> RequestOutput:
    """The output of a detokenised token: the text that became final (up to `cut`, where a
    stop string ends it), and the prompt logprobs the first time they are all there."""
    req = new.request
    text = req.detok_state.flush(req.finished, cut)
    out = RequestOutput(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                        new_token_ids=[new.token_id], new_text=text,
                        output_token_ids=list(req.output_token_ids),
                        new_logprobs=[new.logprob] if new.logprob is not None else [])
    if req.sampling.prompt_logprobs is not None and not req.prompt_logprobs_sent:
        out.prompt_logprobs = [None] + list(req.prompt_logprobs)
        req.prompt_logprobs_sent = True
    return out


def empty_output(req: Request) -> RequestOutput:
    """An output without a new token (a request finished outside a step's tokens)."""
    return RequestOutput(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                         new_token_ids=[], new_text="", output_token_ids=list(req.output_token_ids))


def close_output(out: RequestOutput, req: Request, reason: Optional[FinishReason],
                 now: float) -> None:
    """Mark `out` as the request's last: its finish reason and final timings."""
    req.metrics.finished_time = now
    out.finished, out.finish_reason, out.metrics = True, reason, req.metrics


def time_per_output_token(req: Request, now: float) -> Optional[float]:
    """Seconds per output token after the first; None with fewer than two tokens."""
    n_out = len(req.output_token_ids)
    first = req.metrics.first_token_time
    return (now - first) / (n_out - 1) if n_out > 1 and first else None
