"""What each distillation choice buys on sources the fit never saw (demo model, CPU).

For a sample of united-expert groups, every variant is run as a whole procedure (early
stopping included) on three of the four calibration sources and scored on the fourth
(nested leave-one-source-out): the number is the relative fit error of the united expert
on the left-out source's tokens, averaged over the four choices of left-out source, with
the gsm8k fold (the source least like the others) shown apart. Fit errors are cheap to
measure; `accuracy_sources.py` prices the winning recipe in perplexity.

Writes benchmarks/results/accuracy/distill_ablation.json and .md.

  python scripts/accuracy_distill_ablation.py --data ../shared/data --layers 1,3 --groups 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from accuracy_sources import MODEL, SOURCES  # noqa: E402

# variant -> DistillConfig overrides; "_train": False scores the start itself, "_tokens" keeps
# that share of the fit tokens
VARIANTS = {
    "frequency start, no training": {"_train": False},
    "average start, no training": {"start": "average", "_train": False},
    "distill, random-split early stopping": {"validation": "random"},
    "distill, left-out-source early stopping": {},
    "+ anchor 0.1 (L2 pull to the start)": {"anchor": 0.1},
    "+ anchor 1": {"anchor": 1.0},
    "+ weight decay 0.1": {"weight_decay": 0.1},
    "average start": {"start": "average"},
    "3x the steps (3000)": {"max_steps": 3000},
    "1/4 of the tokens": {"_tokens": 0.25},
}
log = logging.getLogger("accuracy_distill_ablation")


def _nested(data, members, w13, w2, counts, variant, seed):
    """Per left-out source: run the variant on the other sources, score on the left-out one."""
    from brownout.unite import methods
    from brownout.unite.distill import distill, make_folds
    from brownout.unite.options import DistillConfig

    overrides = dict(VARIANTS[variant])
    share = overrides.pop("_tokens", 1.0)
    train = overrides.pop("_train", True)
    cfg = replace(DistillConfig(), **overrides)
    start = methods.average(w13, w2, members) if cfg.start == "average" \
        else methods.frequency(w13, w2, members, counts)
    out, gen = {}, torch.Generator().manual_seed(seed)
    for s in data.source.unique().tolist():
        left_out = data.pick((data.source == s).nonzero().squeeze(1))
        rest = data.pick((data.source != s).nonzero().squeeze(1))
        if share < 1:
            keep = torch.randperm(rest.x.shape[0], generator=gen)[: int(rest.x.shape[0] * share)]
            rest = rest.pick(keep.sort().values)
        final = start
        if train:
            *final, _ = distill(*start, rest, make_folds(rest, cfg, seed), cfg, seed)
        out[int(s)] = methods.fit_error(*final, left_out)
    return out


def main() -> None:
    from transformers import AutoTokenizer

    from brownout.config import ModelLoadConfig
    from brownout.runner.loader import load_model
    from brownout.unite import grouping, methods
    from brownout.unite.calibration import StackCapture, calibration_mix, group_targets
    from brownout.unite.sources import SourceSpec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--way", type=int, default=4)
    p.add_argument("--layers", default="1,3")
    p.add_argument("--groups", default="0,1,2,3")
    p.add_argument("--calibration-tokens", type=int, default=131072)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # the 2-core box is shared: one thread avoids oversubscription
    names = list(SOURCES)
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    loaded = load_model(ModelLoadConfig(model=str(MODEL), device="cpu", dtype="float32", extra_expert_slots=0))
    mix = calibration_mix(tok, [SourceSpec(args.data / SOURCES[s]) for s in names],
                          args.calibration_tokens, 512, "fit")
    raw = args.results / "distill_ablation.json"
    report = json.loads(raw.read_text()) if raw.is_file() else {"groups": []}
    capture = StackCapture(loaded.model, mix.windows, 2048, loaded.device)
    for layer in sorted(int(v) for v in args.layers.split(",")):  # one pass: ascending
        states = capture.states(layer)
        states.source = mix.token_sources()
        moe = loaded.model.moe_layers()[layer]
        E = moe.num_experts
        w13, w2 = moe.w13[:E].detach().float(), moe.w2[:E].detach().float()
        counts = states.counts(E)
        groups = grouping.groups_from_map(grouping.make_groups("contiguous", E, args.way))
        for g in (int(v) for v in args.groups.split(",")):
            data = methods.GroupData(*group_targets(
                states, groups[g], E, lambda e, x: methods.expert_forward(w13[e], w2[e], x), 65536, w13.device))
            entry = {"way": args.way, "layer": layer, "group": g, "members": groups[g],
                     "tokens": {names[s]: int((data.source == s).sum()) for s in range(len(names))},
                     "error": {}}
            for variant in VARIANTS:
                start = time.perf_counter()
                errs = _nested(data, groups[g], w13, w2, counts, variant, seed=layer * 100 + g)
                entry["error"][variant] = {names[s]: e for s, e in errs.items()}
                log.info("layer %d group %d %s: %s (%.0f s)", layer, g, variant,
                         " ".join(f"{names[s]} {e:.3f}" for s, e in errs.items()), time.perf_counter() - start)
            report["groups"] = [r for r in report["groups"]
                                if (r["way"], r["layer"], r["group"]) != (args.way, layer, g)] + [entry]
            _write(args, report)


def _write(args, report: dict) -> None:
    report.update({"model": os.path.relpath(MODEL, ROOT), "machine": f"{platform.node()} (CPU, 1 thread)",
                   "torch": torch.__version__, "calibration_tokens": args.calibration_tokens,
                   "variants": {k: v for k, v in VARIANTS.items()}})
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "distill_ablation.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.results / "distill_ablation.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    groups = report["groups"]
    lines = ["# Distillation choices scored on left-out sources (fit error)", "",
             f"Measured on {report['machine']}, torch {report['torch']}, by "
             "`scripts/accuracy_distill_ablation.py`; raw numbers in `distill_ablation.json`. "
             f"{len(groups)} groups of the demo model (way {groups[0]['way'] if groups else '-'}, contiguous "
             "grouping). For each left-out source the variant runs on the other three (early stopping "
             "included) and is scored on the left-out one: relative squared error of the united "
             "expert against its members' routed mixture (0: exact; 1: as far off as outputting "
             "zero). Lower is better.", "",
             "| variant | mean over left-out sources | left-out gsm8k | left-out plain sources (mean) |",
             "|---|---|---|---|"]
    for variant in report["variants"]:
        rows = [g["error"][variant] for g in groups if variant in g["error"]]
        if not rows:
            continue
        mean = sum(sum(r.values()) / len(r) for r in rows) / len(rows)
        gsm = sum(r["gsm8k"] for r in rows) / len(rows)
        plain = sum(sum(v for k, v in r.items() if k != "gsm8k") / (len(r) - 1) for r in rows) / len(rows)
        lines.append(f"| {variant} | {mean:.3f} | {gsm:.3f} | {plain:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
