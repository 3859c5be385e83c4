"""`brownout unite`: build united experts for a checkpoint, offline (SPEC 1.2).

Example (a calibration mix of a plain-text file and a JSONL of logged requests, the
requests given twice the tokens of the text):
  brownout unite --model brownout/assets/demo/model --way 4 --grouping similarity \
      --method distill --calibration ../shared/data/text/tinyshakespeare.txt requests.jsonl:2 \
      --out united-way4

Calibration sources are balanced by tokens (equal shares unless weighted) and taken from
each source's fit part (all but its last 5%, which stays for pricing with `brownout eval
perplexity`); the manifest records each source's file, sha256, part and tokens.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from brownout.config import ModelLoadConfig
from brownout.unite.options import STARTS, VALIDATIONS, DistillConfig
from brownout.unite.sources import PARTS, SourceSpec

log = logging.getLogger(__name__)

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--way", type=int, required=True, help="experts per group: 2, 4 or 8")
    p.add_argument("--grouping", choices=["contiguous", "similarity"], default="contiguous")
    p.add_argument("--method", choices=["average", "frequency", "distill"], default="average")
    p.add_argument("--calibration", nargs="+", default=[], metavar="FILE[:WEIGHT]",
                   help="calibration sources: plain text, or .jsonl/.json records of requests "
                        "(e.g. {question, answer}, {prompt, output}); needed by "
                        "similarity/frequency/distill")
    p.add_argument("--calibration-tokens", type=int, default=65536, help="over all sources")
    p.add_argument("--calibration-part", choices=PARTS, default="fit",
                   help="part of each source to calibrate on (fit: all but the last 5%%)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--distill-steps", type=int, default=1000, help="Adam steps per group at most")
    p.add_argument("--distill-validation", choices=VALIDATIONS, default="sources",
                   help="early stopping on left-out sources (leave-one-source-out) or a random split")
    p.add_argument("--distill-folds", type=int, default=DistillConfig.max_folds,
                   help="left-out sources validated on per group (0: every source)")
    p.add_argument("--distill-start", choices=STARTS, default="frequency")
    p.add_argument("--distill-anchor", type=float, default=DistillConfig.anchor,
                   help="weight of the L2 pull toward the start")
    p.add_argument("--distill-weight-decay", type=float, default=DistillConfig.weight_decay)
    p.add_argument("--capture-tau", type=float, default=None,
                   help="fit each layer on the states it sees when the layers before it, with "
                        "their united experts, run at this tau (default: the exact model's states)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="auto",
                   help="dtype of the saved united experts (auto: the checkpoint's)")


def _checkpoint_dtype(model_dir: Path):
    """dtype of the first expert tensor in the checkpoint (united experts are stored alike)."""
    # lazy: the torch chain loads only when the command runs (`brownout --help` stays fast)
    import torch
    from safetensors import safe_open

    from brownout.runner.loader import checkpoint_files

    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if ".experts." in key:
                    return f.get_tensor(key).dtype
    return torch.float32


def run(args: argparse.Namespace) -> int:
    # lazy: the torch and transformers chain loads only when the command runs
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from brownout.runner.loader import load_model
    from brownout.unite.builder import UniteOptions, build_united
    from brownout.unite.calibration import calibration_mix
    from brownout.unite.store import save_united

    if args.way not in (2, 4, 8):
        log.warning("way %d: the tested group sizes are 2, 4 and 8", args.way)
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    try:
        sources = [SourceSpec.parse(text) for text in args.calibration]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for spec in sources:
        if not spec.path.is_file():
            raise SystemExit(f"calibration: {spec.path} is not a file")
    distill = DistillConfig(max_steps=args.distill_steps, validation=args.distill_validation,
                            max_folds=args.distill_folds,
                            start=args.distill_start, anchor=args.distill_anchor,
                            weight_decay=args.distill_weight_decay)
    opts = UniteOptions(way=args.way, grouping=args.grouping, method=args.method, seed=args.seed,
                        calibration=sources, calibration_tokens=args.calibration_tokens,
                        calibration_part=args.calibration_part, seq_len=args.seq_len,
                        distill=distill, save_dtype=save_dtype, capture_tau=args.capture_tau)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # united slots only where built layers are installed to feed the next (--capture-tau)
    slots = 0 if args.capture_tau is None else None
    loaded = load_model(ModelLoadConfig(model=str(args.model), device=args.device, dtype="float32",
                                        extra_expert_slots=slots))
    if opts.save_dtype is None and loaded.model_dir is not None:
        opts.save_dtype = _checkpoint_dtype(loaded.model_dir)
    mix = None
    if opts.calibration:
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        mix = calibration_mix(tokenizer, opts.calibration, opts.calibration_tokens, opts.seq_len,
                              opts.calibration_part)
        log.info("calibration: %d windows of %d tokens from %s", mix.windows.shape[0], opts.seq_len,
                 ", ".join(f"{s['name']} ({s['tokens']})" for s in mix.sources))
    tensors, manifest = build_united(loaded, opts, mix,
                                     progress_factory=lambda total: tqdm(total=total, unit="group"))
    save_united(args.out, tensors, manifest)
    print(f"wrote {args.out} (way {opts.way}, {opts.grouping}, {opts.method}) "
          f"in {time.perf_counter() - start:.1f} s")
    _print_fit(manifest)
    return 0


def _print_fit(manifest: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="united-expert fit error (relative, on calibration tokens of left-out "
                        "sources, or a random held-out split)")
    for col in ("layer", "groups", "mean before", "mean after"):
        table.add_column(col, justify="right")
    for layer, groups in manifest["fit_error"].items():
        before = [g["error_before"] for g in groups if g.get("error_before") is not None]
        after = [g["error_after"] for g in groups if g.get("error_after") is not None]
        fmt = lambda v: f"{sum(v) / len(v):.4f}" if v else "-"  # noqa: E731
        table.add_row(layer, str(len(groups)), fmt(before), fmt(after))
    Console().print(table)
