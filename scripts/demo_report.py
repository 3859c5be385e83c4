"""Markdown summaries of the demo model's training log and per-layer expert load.

Reads `demo_training.json` and `demo_expert_load.json` (written by
`train_demo_model.py train`) and writes `demo_training.md` and `demo_expert_load.md`
beside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def load_stats(counts: list[int]) -> dict:
    """How skewed one layer's routing is: the numbers brownout's keep set depends on."""
    total = sum(counts)
    mean = total / len(counts)
    desc = sorted(counts, reverse=True)
    probs = [c / total for c in counts if c]
    entropy = -sum(p * math.log(p) for p in probs) / math.log(len(counts))

    def experts_for(share: float) -> int:
        acc = 0
        for i, c in enumerate(desc):
            acc += c
            if acc >= share * total:
                return i + 1
        return len(desc)

    return {"max_over_mean": desc[0] / mean, "min_over_mean": desc[-1] / mean,
            "top_quarter_share": sum(desc[: max(1, len(desc) // 4)]) / total,
            "normalised_entropy": entropy, "experts_for_50pct": experts_for(0.5),
            "experts_for_80pct": experts_for(0.8), "experts_for_90pct": experts_for(0.9)}


def _bar(value: float, scale: float, width: int = 30) -> str:
    return "#" * (max(1, round(width * value / scale)) if value > 0 else 0)


def expert_load_md(load: dict, training: dict) -> str:
    E = len(load["counts"][0])
    lines = ["# Demo model: expert load on held-out text", "",
             f"Top-{load['top_k']} routing of {load['tokens']:,} held-out tokens (last 5% of each "
             f"training source, never trained on) through the demo checkpoint, measured on "
             f"{training.get('device', '?')} by `scripts/train_demo_model.py`; raw counts in "
             "`demo_expert_load.json`. Uniform routing would give max/mean = 1, top-quarter "
             f"share = 25% and {E // 2} experts for 50% of the assignments.", "",
             "| layer | max/mean | min/mean | top 25% experts' share | norm. entropy | "
             "experts for 50% / 80% / 90% |", "|---|---|---|---|---|---|"]
    for i, counts in enumerate(load["counts"]):
        s = load_stats(counts)
        lines.append(f"| {i} | {s['max_over_mean']:.2f} | {s['min_over_mean']:.2f} | "
                     f"{100 * s['top_quarter_share']:.1f}% | {s['normalised_entropy']:.3f} | "
                     f"{s['experts_for_50pct']} / {s['experts_for_80pct']} / {s['experts_for_90pct']} |")
    for i, counts in enumerate(load["counts"]):
        total = sum(counts)
        top = max(counts) / total
        lines += ["", f"## Layer {i} (experts by load, % of assignments)", "", "```"]
        for e in sorted(range(E), key=lambda e: -counts[e]):
            lines.append(f"e{e:02d} {100 * counts[e] / total:5.2f}% {_bar(counts[e] / total, top)}")
        lines.append("```")
    return "\n".join(lines) + "\n"


def training_md(training: dict, sample: str = "") -> str:
    cfg, tr = training["config"], training["train"]
    hist = training["history"]
    lines = ["# Demo model: training run", "",
             f"Trained by `scripts/train_demo_model.py train` on {training['device']} "
             f"(torch {training['torch']}); raw log in `demo_training.json`.", "",
             f"- architecture: Qwen2MoeForCausalLM, {training['parameters'] / 1e6:.2f}M parameters, "
             f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
             f"{cfg['num_experts']} routed experts of width {cfg['moe_intermediate_size']}, "
             f"top-{cfg['num_experts_per_tok']}, shared expert width "
             f"{cfg['shared_expert_intermediate_size']} with sigmoid gate, no top-k renormalisation",
             "- data: byte-level BPE (8192 tokens) over Shakespeare, US inaugural and State of the "
             "Union addresses, GSM8K as ChatML chats; 5% of each source held out",
             f"- optimisation: AdamW, peak lr {tr['lr']}, warmup {tr['warmup']}, cosine to 10%, "
             f"bf16 autocast, {training['tokens_per_step']:,} tokens per step, "
             f"{training['steps']} steps in {hist[-1]['elapsed_s']:.0f} s; the checkpoint kept is "
             f"the one with the best held-out loss (step {training.get('best_step', '?')})",
             f"- held-out loss of the saved checkpoint: {training['final_held_out_loss']:.3f} "
             f"(perplexity {math.exp(training['final_held_out_loss']):.1f})", "",
             "The table's held-out loss is taken on the first 64 windows of 512 held-out tokens "
             "(Shakespeare); the saved checkpoint's line above on all held-out windows. The "
             "corpus is small (2.1M tokens), so the model overfits after ~8 epochs: the best "
             "held-out checkpoint is kept.", "",
             "| step | train loss | aux loss | held-out loss |", "|---|---|---|---|"]
    for h in hist:
        if "held_out_loss" in h:
            lines.append(f"| {h['step']} | {h['loss']:.3f} | {h['aux_loss']:.3f} | {h['held_out_loss']:.3f} |")
    if sample:
        lines += ["", "Greedy continuation (transformers, CPU):", "", "```", sample, "```"]
    return "\n".join(lines) + "\n"


def write_reports(results_dir: Path, sample: str = "") -> None:
    training = json.loads((results_dir / "demo_training.json").read_text())
    load = json.loads((results_dir / "demo_expert_load.json").read_text())
    (results_dir / "demo_training.md").write_text(training_md(training, sample))
    (results_dir / "demo_expert_load.md").write_text(expert_load_md(load, training))
