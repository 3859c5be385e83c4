"""Distinct expert slots each MoE layer touches per step, versus tau, on real text.

Decode time of an MoE layer follows the bytes of the distinct expert weights a step reads,
so the number of distinct slots (routed experts kept + united experts used) is the
quantity brownout shrinks. Two kinds of steps of the demo model:
  - prefill-size steps of 2048 tokens (4 windows of 512), run exactly through the model
    at each tau (`run_step`);
  - decode-size steps of T tokens (T random positions of the text), formed
    from the router choices the exact model makes on real text, then remapped with
    `brownout_route` per layer. Later layers see exact-model routing, not the routing
    after brownout in earlier layers; the prefill rows compare both ways of counting.
Writes benchmarks/results/accuracy/brownout_touched.json (raw) and .md. CPU only.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
DATA = ROOT / ".." / "shared" / "data"
MODEL = ROOT / "brownout" / "assets" / "demo" / "model"
TAUS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
DECODE_SIZES = [1, 8, 16, 32, 64, 128, 256]
log = logging.getLogger("brownout_touched")


def capture_routing(em, batches) -> list[torch.Tensor]:
    """Exact-model router choices per MoE layer -> [n_windows, L, k] each."""
    moes = em.model.moe_layers()
    per_layer: list[list[torch.Tensor]] = [[] for _ in moes]
    for batch in batches:
        for moe in moes:
            moe.capture = []
        em.model.forward_full(batch)
        for i, moe in enumerate(moes):
            per_layer[i].append(moe.capture[0]["topk_ids"].view(batch.shape[0], batch.shape[1], -1))
            moe.capture = None
    return [torch.cat(chunks) for chunks in per_layer]


def decode_steps(routing, moes, size: int, repeats: int, gen) -> dict:
    """Mean/std of slots touched per layer for steps of `size` tokens at random places."""
    from brownout.kernels.brownout_routing import brownout_route, count_touched

    flat = [r[:, 1:].reshape(-1, r.shape[-1]) for r in routing]  # [n_tokens, k] per layer
    out = {}
    for tau in TAUS:
        counts = torch.zeros(repeats, len(moes))
        for r in range(repeats):
            picks = torch.randperm(flat[0].shape[0], generator=gen)[:size]
            for i, (ids_all, moe) in enumerate(zip(flat, moes)):
                ids = ids_all[picks]  # [size, k]
                w = torch.full(ids.shape, 1.0 / ids.shape[1])
                new_ids, _ = brownout_route(ids, w, torch.tensor(tau), moe.group_of, moe.num_experts)
                counts[r, i] = float(count_touched(new_ids, moe.num_slots))
        out[str(tau)] = {"mean": counts.mean(0).tolist(), "std": counts.std(0).tolist()}
    return out


def prefill_steps(em, batches, routing, moes) -> dict:
    """Exact run at each tau vs counting on exact-model routing, per layer (means)."""
    from brownout.eval.scoring import run_step
    from brownout.kernels.brownout_routing import brownout_route, count_touched

    rows = batches[0].shape[0]
    out = {}
    for tau in TAUS:
        exact = torch.zeros(len(moes))
        approx = torch.zeros(len(moes))
        for b, batch in enumerate(batches):
            _, touched = run_step(em.model, batch, tau)
            exact += torch.tensor(touched, dtype=torch.float32)
            for i, moe in enumerate(moes):
                ids = routing[i][b * rows:(b + 1) * rows].reshape(-1, routing[i].shape[-1])
                w = torch.full(ids.shape, 1.0 / ids.shape[1])
                new_ids, _ = brownout_route(ids, w, torch.tensor(tau), moe.group_of, moe.num_experts)
                approx[i] += float(count_touched(new_ids, moe.num_slots))
        out[str(tau)] = {"exact": (exact / len(batches)).tolist(), "from_exact_routing":
                         (approx / len(batches)).tolist()}
    return out


def main() -> None:
    from brownout.eval.perplexity import make_batches, tokenize_text
    from brownout.eval.scoring import load_eval_model
    from brownout_accuracy import held_out_text
    from touched_report import write_markdown

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--united", nargs="+", type=Path, default=[
        ROOT / "brownout" / "assets" / "demo" / "united-way2",
        ROOT / "brownout" / "assets" / "demo" / "united-way4"])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    texts = {"wikitext2_valid": (DATA / "eval" / "wikitext2_raw_valid.txt").read_text(encoding="utf-8"),
             "held_out_in_domain": held_out_text()}
    report = {"model": str(MODEL.relative_to(ROOT)), "machine": f"{platform.node()} (CPU)",
              "torch": torch.__version__, "taus": TAUS, "tokens_per_text": args.tokens, "repeats": args.repeats,
              "runs": []}
    for united in args.united:
        em = load_eval_model(str(MODEL), str(united), device="cpu")
        moes = em.model.moe_layers()
        for name, text in texts.items():
            batches = make_batches(tokenize_text(em.tokenizer, text, args.tokens), 512, 2048)
            routing = capture_routing(em, batches)
            gen = torch.Generator().manual_seed(0)
            run = {"united": str(united.relative_to(ROOT)) if united.is_relative_to(ROOT) else str(united),
                   "way": em.united["way"], "grouping": em.united["grouping"]["kind"],
                   "method": em.united["method"], "text": name,
                   "num_experts": moes[0].num_experts, "num_groups": em.united["num_groups"],
                   "prefill_2048": prefill_steps(em, batches, routing, moes),
                   "decode": {str(s): decode_steps(routing, moes, s, args.repeats, gen)
                              for s in DECODE_SIZES}}
            report["runs"].append(run)
            log.info("%s %s done", united.name, name)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "brownout_touched.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.results / "brownout_touched.md")


if __name__ == "__main__":
    main()
