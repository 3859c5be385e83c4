"""`brownout generate`: offline generation with the engine, for a quick look at a model."""

from __future__ import annotations

import argparse

from brownout.types import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--united-experts", default=None, help="united-experts directory (brownout unite)")
    p.add_argument("--tau", type=float, default=1.0, help="fixed brownout threshold in [0, 1]")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])


def run(args: argparse.Namespace) -> int:
    from brownout.engine.llm import LLM  # lazy: torch loads only when the command runs

    llm = LLM(args.model, united_experts=args.united_experts, tau=args.tau, device=args.device,
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
