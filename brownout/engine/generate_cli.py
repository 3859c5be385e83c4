"""`brownout generate`: offline generation with the engine, for a quick look at a model.

With no --model it runs the embedded demo model with its way-4 united experts (used when
--tau is below 1).
"""

from __future__ import annotations

import argparse
import logging

from brownout.cliutil import add_model_arguments, float_in, int_at_least, resolve_model, resolve_united, shown_path, united_summary
from brownout.types import SamplingParams, ValidationError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt texts, one completion each")
    add_model_arguments(p)
    p.add_argument("--fixed-tau", dest="tau", type=float_in(0.0, 1.0), default=1.0,
                   help="fixed brownout threshold in [0, 1], as `brownout serve --fixed-tau`; 1 is the "
                        "exact model")
    p.add_argument("--tau", dest="tau", type=float_in(0.0, 1.0), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # former name
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--max-tokens", type=int_at_least(1), default=64, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling: smallest set of tokens whose probability reaches this fraction")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: cuda when available)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of a preset's or checkpoint's shapes")


def run(args: argparse.Namespace) -> int:
    from brownout.engine.llm import LLM  # lazy: torch loads only when the command runs

    dummy = args.load_format == "dummy"
    model = resolve_model(args.model, dummy=dummy)
    united = None if dummy and args.united_experts is None else resolve_united(args.united_experts, model)
    if args.tau < 1.0 and united is None:
        raise ValidationError("--united-experts", "tau below 1 needs united experts: expected a directory "
                                                  "written by `brownout unite` or average:WAY")
    log.info("model %s; united experts %s; tau %g", shown_path(model), united_summary(united), args.tau)
    llm = LLM(model, united_experts=united, tau=args.tau, device=args.device,
              load_format=args.load_format)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outs = llm.generate(args.prompts, params)
    for prompt, out in zip(args.prompts, outs):
        print(f"--- {prompt!r} ({len(out.token_ids)} tokens, {out.finish_reason.value})")
        print(out.text)
    return 0
