"""`brownout unite`: build united experts for a checkpoint, offline (SPEC 1.2).

With no --model it unites the embedded demo model; `--model brownout/assets/demo` (a directory
holding a `model/` checkpoint) means the same.

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

from brownout.cliutil import (check_output_dir, float_in, int_at_least, progress, resolve_model,
                              user_errors)
from brownout.config import ModelLoadConfig
from brownout.types import ValidationError
from brownout.unite.options import STARTS, VALIDATIONS, DistillConfig
from brownout.unite.sources import PARTS, SourceSpec

log = logging.getLogger(__name__)

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# dtypes the model may run in while calibration states are captured; fits stay float32
LOAD_DTYPES = ("float32", "bfloat16", "float16")
# the group sizes whose united experts are tested and shipped
TESTED_WAYS = (2, 4, 8)
# ValueError fields of the unite options -> the flag that sets each
OPTION_FLAGS = {"way": "--way", "grouping": "--grouping", "method": "--method",
                "capture_tau": "--capture-tau", "calibration": "--calibration",
                "validation": "--distill-validation", "start": "--distill-start",
                "max_folds": "--distill-folds", "distill_group_batch": "--distill-group-batch"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (Hugging Face format), or a directory holding one in "
                        "model/ (default: the embedded demo model)")
    p.add_argument("--way", type=int_at_least(2), default=4,
                   help="experts per group; 2, 4 and 8 are tested")
    p.add_argument("--grouping", choices=["contiguous", "similarity"], default="contiguous",
                   help="how experts are grouped: contiguous ids (e // way) or similar outputs on "
                        "the calibration text")
    p.add_argument("--method", choices=["average", "frequency", "distill"], default="average",
                   help="how a group's united expert is built: plain or routing-frequency-weighted "
                        "average of its members, or fitted to their mixture (distill)")
    p.add_argument("--calibration", nargs="+", default=[], metavar="FILE[:WEIGHT]",
                   help="calibration sources: plain text, or .jsonl/.json records of requests "
                        "(e.g. {question, answer}, {prompt, output}); needed by "
                        "similarity/frequency/distill (default: none)")
    p.add_argument("--calibration-tokens", type=int_at_least(1), default=65536,
                   help="calibration tokens over all sources")
    p.add_argument("--calibration-part", choices=PARTS, default="fit",
                   help="part of each source to calibrate on (fit: all but the last 5%%)")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="calibration window length, in tokens")
    p.add_argument("--distill-steps", type=int_at_least(0), default=1000, help="Adam steps per group at most")
    p.add_argument("--distill-validation", choices=VALIDATIONS, default="sources",
                   help="early stopping on left-out sources (leave-one-source-out) or a random split")
    p.add_argument("--distill-folds", type=int_at_least(0), default=DistillConfig.max_folds,
                   help="left-out sources validated on per group (0: every source)")
    p.add_argument("--distill-start", choices=STARTS, default="frequency",
                   help="the mean the distillation starts from and --distill-anchor pulls toward")
    p.add_argument("--distill-anchor", type=float_in(0.0), default=DistillConfig.anchor,
                   help="weight of the L2 pull toward the start (unitless, >= 0)")
    p.add_argument("--distill-weight-decay", type=float_in(0.0), default=DistillConfig.weight_decay,
                   help="AdamW decoupled weight decay (unitless, >= 0)")
    p.add_argument("--distill-group-batch", type=int_at_least(1), default=None,
                   help="groups of a layer distilled together at most (default: on a GPU as many as "
                        "fit in its memory, on a CPU 1); the fits are the same whatever it is")
    p.add_argument("--capture-tau", type=float_in(0.0, 1.0), default=None,
                   help="fit each layer on the states it sees when the layers before it, with "
                        "their united experts, run at this tau (default: the exact model's states)")
    p.add_argument("--out", required=True, type=Path,
                   help="directory to write the united experts to (manifest.json, united.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling and the fits")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: cuda when available)")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="float32",
                   help="dtype the model runs in while calibration states are captured; each "
                        "layer's experts are upcast to float32 for their fits, one layer at a "
                        "time, whatever it is (bfloat16 halves the GPU memory of the loaded model: "
                        "a Qwen3-30B-A3B takes 61 GB in it, 122 GB in float32)")
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
    from transformers import AutoTokenizer

    from brownout.runner.loader import load_model
    from brownout.unite.builder import UniteOptions, build_united
    from brownout.unite.calibration import calibration_mix
    from brownout.unite.store import save_united

    args.model = resolve_model(args.model)
    check_output_dir("--out", args.out)
    if args.way not in TESTED_WAYS:
        log.warning("way %d: the tested group sizes are %s", args.way, ", ".join(map(str, TESTED_WAYS)))
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    with user_errors(OPTION_FLAGS):
        sources = [SourceSpec.parse(text) for text in args.calibration]
    for spec in sources:
        if not spec.path.is_file():
            raise ValidationError("--calibration", f"expected FILE[:WEIGHT] naming a readable file, "
                                                   f"got {spec.path} (no such file)")
    with user_errors(OPTION_FLAGS):
        distill = DistillConfig(max_steps=args.distill_steps, validation=args.distill_validation,
                                max_folds=args.distill_folds,
                                start=args.distill_start, anchor=args.distill_anchor,
                                weight_decay=args.distill_weight_decay)
        opts = UniteOptions(way=args.way, grouping=args.grouping, method=args.method, seed=args.seed,
                            calibration=sources, calibration_tokens=args.calibration_tokens,
                            calibration_part=args.calibration_part, seq_len=args.seq_len,
                            distill=distill, distill_group_batch=args.distill_group_batch,
                            save_dtype=save_dtype, capture_tau=args.capture_tau)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # united slots only where built layers are installed to feed the next (--capture-tau)
    slots = 0 if args.capture_tau is None else None
    loaded = load_model(ModelLoadConfig(model=str(args.model), device=args.device, dtype=args.dtype,
                                        extra_expert_slots=slots))
    if opts.save_dtype is None and loaded.model_dir is not None:
        opts.save_dtype = _checkpoint_dtype(loaded.model_dir)
    mix = None
    if opts.calibration:
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        try:
            mix = calibration_mix(tokenizer, opts.calibration, opts.calibration_tokens, opts.seq_len,
                                  opts.calibration_part)
        except UnicodeDecodeError:
            raise ValidationError("--calibration", "expected UTF-8 text or .jsonl/.json records") from None
        except ValueError as exc:  # a source's content: bad records, too few tokens
            raise ValidationError("--calibration", str(exc).removeprefix("calibration: ")) from None
        log.info("calibration: %d windows of %d tokens from %s", mix.windows.shape[0], opts.seq_len,
                 ", ".join(f"{s['name']} ({s['tokens']})" for s in mix.sources))
    tensors, manifest = build_united(loaded, opts, mix,
                                     progress_factory=lambda total: progress(total, "unite", "group"))
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
