"""Prefix caching on a multi-turn chat workload: TTFT and throughput with caching on vs off.

Each conversation resends its whole history every turn, as chat clients do: a shared system
prompt, then for every earlier turn the user's message and the model's answer, then the new
message. The users' messages are real ShareGPT first-turn prompts (one per turn, taken in
file order), tokenised with the demo model's tokenizer and cut to --max-user-tokens; answers
are --answer-tokens generated tokens (greedy, EOS ignored). All conversations start at once
and each sends its next turn as soon as its previous answer is complete (closed loop), so
the two runs see the same requests; only the engine's prefix cache differs.

The model is any preset on dummy (random) weights: token ids, not meaning, decide the cost.

  python benchmarks/bench_prefix_cache.py --prompts ../shared/data/prompts/sharegpt_v3_first_turns_1000.json \
      --out benchmarks/results/engine/prefix_cache_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from brownout.config import CacheConfig, SchedulerConfig
from brownout.defaults import default_model_dir
from brownout.engine.llm import LLM
from brownout.types import SamplingParams

PRESET = "qwen1.5-moe-a2.7b"
# A system prompt of typical length for a deployed assistant (a few hundred tokens).
SYSTEM_PROMPT_WORDS = 300
log = logging.getLogger("bench_prefix_cache")


def user_messages(path: Path, tok: Tokenizer, n: int, max_tokens: int) -> list[list[int]]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        text = row["conversations"][0]["value"]
        ids = tok.encode(text).ids[:max_tokens]
        if ids:
            out.append(ids)
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"--prompts: {path} holds {len(out)} usable prompts, {n} needed")
    return out


def run(llm: LLM, system: list[int], users: list[list[int]], conversations: int, turns: int,
        answer_tokens: int) -> dict:
    """Drive the closed-loop workload through the engine; per-request TTFT and totals."""
    engine = llm.engine
    params = SamplingParams(max_tokens=answer_tokens, temperature=0.0, ignore_eos=True)
    history = {c: list(system) for c in range(conversations)}
    turn = dict.fromkeys(range(conversations), 0)
    ttft, prompt_lens = [], []
    sent = {}

    def send(c: int) -> None:
        prompt = history[c] + users[c * turns + turn[c]]
        rid = f"c{c}t{turn[c]}"
        engine.add_request(rid, prompt, params)
        sent[rid] = (c, prompt, time.perf_counter())
        prompt_lens.append(len(prompt))

    hits0, queries0 = engine.scheduler.num_prefix_cache_hits, engine.scheduler.num_prefix_cache_queries
    start = time.perf_counter()
    for c in range(conversations):
        send(c)
    generated = 0
    first_seen = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            c, prompt, t0 = sent[out.request_id]
            if out.new_token_ids and out.request_id not in first_seen:
                first_seen.add(out.request_id)
                ttft.append(now - t0)
            if out.finished:
                generated += len(out.output_token_ids)
                history[c] = prompt + list(out.output_token_ids)
                turn[c] += 1
                if turn[c] < turns:
                    send(c)
    wall = time.perf_counter() - start
    hits = engine.scheduler.num_prefix_cache_hits - hits0
    queries = engine.scheduler.num_prefix_cache_queries - queries0
    return dict(requests=len(ttft), wall_s=wall, generated_tokens=generated,
                prompt_tokens=sum(prompt_lens), mean_prompt_tokens=statistics.mean(prompt_lens),
                output_tok_s=generated / wall, requests_s=len(ttft) / wall,
                ttft_p50_s=statistics.median(ttft),
                ttft_p90_s=sorted(ttft)[int(0.9 * (len(ttft) - 1))],
                prefix_cache_queries=queries, prefix_cache_hits=hits,
                hit_rate=hits / queries if queries else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=Path, required=True,
                    help="ShareGPT first-turn prompts (JSON list)")
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--preset", default=PRESET, help="model preset on dummy weights (default: %(default)s)")
    ap.add_argument("--device", default="cuda", help="default: %(default)s")
    ap.add_argument("--conversations", type=int, default=48, help="concurrent conversations (default: %(default)s)")
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation (default: %(default)s)")
    ap.add_argument("--answer-tokens", type=int, default=96, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--max-user-tokens", type=int, default=256,
                    help="a user message is cut to this many tokens (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating off/on pairs (default: %(default)s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tok = Tokenizer.from_file(str(Path(default_model_dir()) / "tokenizer.json"))
    # Each repeat has its own users' messages (a repeat must not hit the KV of the one
    # before it); the warm-up takes the messages after them.
    per_run = args.conversations * args.turns
    users = user_messages(args.prompts, tok, per_run * args.repeats + 2 * args.turns,
                          args.max_user_tokens)
    warm = users[per_run * args.repeats:]
    system = tok.encode(" ".join(["You are a helpful, careful assistant."] * (SYSTEM_PROMPT_WORDS // 6))).ids
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    max_len = len(system) + args.turns * (args.max_user_tokens + args.answer_tokens) + 16
    rows = []
    for caching in (False, True):
        llm = LLM(args.preset, load_format="dummy", device=args.device, dtype=dtype,
                  max_model_len=max(max_len, 2048),
                  cache=CacheConfig(enable_prefix_caching=caching),
                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048))
        run(llm, system, warm, 2, args.turns, 4)  # warm-up: graphs, allocator
        for rep in range(args.repeats):
            r = run(llm, system, users[rep * per_run:(rep + 1) * per_run], args.conversations,
                    args.turns, args.answer_tokens)
            r.update(prefix_caching=caching, repeat=rep)
            log.info("%s", r)
            rows.append(r)
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                torch=torch.__version__, preset=args.preset, weights="dummy (random), " + dtype,
                conversations=args.conversations, turns=args.turns, answer_tokens=args.answer_tokens,
                max_user_tokens=args.max_user_tokens, system_prompt_tokens=len(system),
                prompts=args.prompts.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    for caching in (False, True):
        sel = [r for r in rows if r["prefix_caching"] is caching]
        print(f"caching {'on ' if caching else 'off'}: TTFT P50 "
              f"{statistics.median(r['ttft_p50_s'] for r in sel) * 1e3:.1f} ms, output "
              f"{statistics.median(r['output_tok_s'] for r in sel):.0f} tok/s, hit rate "
              f"{sel[0]['hit_rate']:.2f}")


if __name__ == "__main__":
    main()
