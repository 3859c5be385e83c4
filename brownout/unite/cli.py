"""`brownout unite`: build united experts for a checkpoint, offline (SPEC 1.2).

Example:
  brownout unite --model brownout/assets/demo/model --way 4 --grouping similarity \
      --method distill --calibration ../shared/data/text/tinyshakespeare.txt --out united-way4
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from brownout.config import ModelLoadConfig

log = logging.getLogger(__name__)

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--way", type=int, required=True, help="experts per group: 2, 4 or 8")
    p.add_argument("--grouping", choices=["contiguous", "similarity"], default="contiguous")
    p.add_argument("--method", choices=["average", "frequency", "distill"], default="average")
    p.add_argument("--calibration", nargs="+", type=Path, default=[], metavar="FILE",
                   help="plain-text calibration file(s); needed by similarity/frequency/distill")
    p.add_argument("--calibration-tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--distill-steps", type=int, default=1000, help="Adam steps per group at most")
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
    from brownout.unite.calibration import calibration_windows
    from brownout.unite.methods import DistillConfig
    from brownout.unite.store import save_united

    if args.way not in (2, 4, 8):
        log.warning("way %d: the tested group sizes are 2, 4 and 8", args.way)
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    opts = UniteOptions(way=args.way, grouping=args.grouping, method=args.method, seed=args.seed,
                        calibration_files=list(args.calibration),
                        calibration_tokens=args.calibration_tokens, seq_len=args.seq_len,
                        distill=DistillConfig(max_steps=args.distill_steps), save_dtype=save_dtype)
    for path in opts.calibration_files:
        if not Path(path).is_file():
            raise SystemExit(f"calibration: {path} is not a file")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    loaded = load_model(ModelLoadConfig(model=str(args.model), device=args.device, dtype="float32",
                                        extra_expert_slots=0))
    if opts.save_dtype is None and loaded.model_dir is not None:
        opts.save_dtype = _checkpoint_dtype(loaded.model_dir)
    windows = None
    if opts.calibration_files:
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        windows = calibration_windows(tokenizer, opts.calibration_files, opts.calibration_tokens,
                                      opts.seq_len)
        log.info("calibration: %d windows of %d tokens", windows.shape[0], windows.shape[1])
    tensors, manifest = build_united(loaded, opts, windows,
                                     progress_factory=lambda total: tqdm(total=total, unit="group"))
    save_united(args.out, tensors, manifest)
    print(f"wrote {args.out} (way {opts.way}, {opts.grouping}, {opts.method}) "
          f"in {time.perf_counter() - start:.1f} s")
    _print_fit(manifest)
    return 0


def _print_fit(manifest: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="united-expert fit error (relative, held-out calibration tokens)")
    for col in ("layer", "groups", "mean before", "mean after"):
        table.add_column(col, justify="right")
    for layer, groups in manifest["fit_error"].items():
        before = [g["error_before"] for g in groups if g.get("error_before") is not None]
        after = [g["error_after"] for g in groups if g.get("error_after") is not None]
        fmt = lambda v: f"{sum(v) / len(v):.4f}" if v else "-"  # noqa: E731
        table.add_row(layer, str(len(groups)), fmt(before), fmt(after))
    Console().print(table)
