"""Train the project's small demo MoE checkpoint (Qwen2-MoE architecture, from scratch).

No pretrained MoE weights can be fetched here, so the project trains its own: a
transformers `Qwen2MoeForCausalLM` (32 routed experts, top-4, no top-k renormalisation,
a shared expert with its sigmoid gate, as Qwen1.5-MoE) on the public-domain text of
`../shared/data/text/`, with the router's load-balancing loss.

Stages (the tokenizer is trained on the CPU; only `train` needs the GPU):
  prepare  tokenizer -> brownout/assets/demo/model, token streams -> .demo_data/
  train    train on the streams, save the checkpoint, the training log and the
           per-layer expert load on held-out text into --out
  report   write the markdown summaries from the JSON written by `train`
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_demo_model")

MODEL_SHAPE = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=6, num_experts=32, num_experts_per_tok=4,
                   moe_intermediate_size=64, shared_expert_intermediate_size=256,
                   intermediate_size=256, max_position_embeddings=2048)


def build_model(vocab_size: int, special: dict):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=vocab_size, **MODEL_SHAPE, norm_topk_prob=False,
                         output_router_logits=True, router_aux_loss_coef=0.001,
                         decoder_sparse_step=1, tie_word_embeddings=True, rope_theta=10000.0,
                         eos_token_id=special["eos"], pad_token_id=special["pad"],
                         bos_token_id=None, initializer_range=0.02)
    return Qwen2MoeForCausalLM(cfg)


def special_ids(tokenizer_dir: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return {"eos": tok.token_to_id("<|im_end|>"), "pad": tok.token_to_id("<|endoftext|>"),
            "vocab": tok.get_vocab_size()}


def batches(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Endless random windows [batch, seq] of the token stream."""
    while True:
        starts = torch.randint(0, stream.numel() - seq, (batch,), generator=gen)
        yield torch.stack([stream[s:s + seq] for s in starts.tolist()])


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, held: torch.Tensor, seq: int, device, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (held.numel() - 1) // seq)
    x = held[: n * seq + 1]
    inputs = x[:-1].view(n, seq).long().to(device)
    labels = x[1:].view(n, seq).long().to(device)
    losses = []
    for i in range(0, n, 16):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=inputs[i:i + 16], output_router_logits=False).logits
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels[i:i + 16].flatten(), reduction="sum"))
    model.train()
    return float(torch.stack(losses).sum() / labels.numel())


@torch.no_grad()
def expert_load(model, held: torch.Tensor, seq: int, device) -> dict:
    """Routing counts per layer and expert on held-out text (the top-k choices)."""
    model.eval()
    n = (held.numel() - 1) // seq
    inputs = held[: n * seq].view(n, seq).long().to(device)
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int64)
    for i in range(0, n, 16):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=inputs[i:i + 16], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # [tokens, E]
            ids = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.flatten().cpu()
            counts[layer] += torch.bincount(ids, minlength=cfg.num_experts)
    model.train()
    return {"tokens": n * seq, "top_k": cfg.num_experts_per_tok, "counts": counts.tolist()}


def train(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = Path(args.tokens_dir)
    train_stream = torch.from_numpy(np.load(tokens / "train.npy").astype(np.int64))
    held = torch.from_numpy(np.load(tokens / "held_out.npy").astype(np.int64))
    special = special_ids(Path(args.tokenizer_dir))
    torch.manual_seed(args.seed)
    model = build_model(special["vocab"], special).to(device).train()
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %s", n_params / 1e6, model.config._experts_implementation)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    data = batches(train_stream, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    history, total_steps, t0 = [], args.max_steps, time.perf_counter()
    best = {"loss": float("inf"), "step": -1, "state": None}
    step, t_warm = 0, t0
    while step < total_steps:
        if step == 10:
            _sync(device)
            t_warm = time.perf_counter()
        if step == 40:  # fix the cosine schedule from the measured step time
            _sync(device)
            now = time.perf_counter()
            per_step = (now - t_warm) / 30
            left = args.minutes * 60 - (now - t0)
            total_steps = min(args.max_steps, step + int(left / (per_step * 1.04)))
            log.info("%.4f s/step -> %d steps", per_step, total_steps)
        lr = lr_at(step, total_steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = next(data).to(device, non_blocking=True)  # [B, L]; the model shifts the labels
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step == total_steps - 1
        if step % args.log_every == 0 or last:
            entry = {"step": step, "lr": lr, "loss": out.loss.item(), "aux_loss": out.aux_loss.item(),
                     "grad_norm": norm.item(), "elapsed_s": time.perf_counter() - t0}
            if step % (args.log_every * 5) == 0 or last:
                entry["held_out_loss"] = held_out_loss(model, held, args.seq, device)
                if entry["held_out_loss"] < best["loss"]:  # keep the best: the corpus is small
                    best = {"loss": entry["held_out_loss"], "step": step,
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            history.append(entry)
            log.info("%s", entry)
        step += 1
    model.load_state_dict(best["state"])
    finish(model, args, special, history, held, device, n_params, best["step"])


def finish(model, args, special, history, held, device, n_params, best_step) -> None:
    out = Path(args.out)
    model_dir = out / "model"
    model.config.output_router_logits = False  # inference needs no aux loss
    model.to(torch.bfloat16).save_pretrained(str(model_dir))
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(args.tokenizer_dir) / name, model_dir / name)
    load = expert_load(model, held, args.seq, device)
    log_json = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "parameters": n_params,
                "config": {k: getattr(model.config, k) for k in MODEL_SHAPE},
                "train": {k: getattr(args, k) for k in ("batch", "seq", "lr", "warmup", "seed",
                                                          "minutes")},
                "tokens_per_step": args.batch * args.seq, "steps": len(history) and history[-1]["step"] + 1,
                "best_step": best_step,
                "final_held_out_loss": held_out_loss(model, held, args.seq, device, 10_000),
                "history": history}
    (out / "demo_training.json").write_text(json.dumps(log_json, indent=1))
    (out / "demo_expert_load.json").write_text(json.dumps(load))


def greedy_samples(model_dir: Path, prompts=("ROMEO:\n", "My fellow citizens, ")) -> str:
    """Greedy continuations with transformers on the CPU: a sanity check of the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        texts.append(tok.decode(out[0]))
    return "\n---\n".join(texts)


def report(args) -> None:
    """Markdown summaries of the training log and the expert load."""
    from demo_report import write_reports

    write_reports(Path(args.results_dir), greedy_samples(Path(args.tokenizer_dir)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["prepare", "train", "report"])
    p.add_argument("--text-dir", default=str(ROOT / ".." / "shared" / "data" / "text"))
    p.add_argument("--tokenizer-dir", default=str(ROOT / "brownout" / "assets" / "demo" / "model"))
    p.add_argument("--tokens-dir", default=str(ROOT / ".demo_data"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results" / "demo_model"))
    p.add_argument("--out", default="demo-out")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts-impl", default=None, help="transformers experts kernel (eager, grouped_mm)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.stage == "prepare":
        from demo_data import prepare

        prepare(Path(args.text_dir), Path(args.tokenizer_dir), Path(args.tokens_dir), args.vocab_size)
    elif args.stage == "train":
        train(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
