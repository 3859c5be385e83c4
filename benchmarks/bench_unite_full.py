#!/usr/bin/env python3
"""Time and memory of `brownout unite` (distill) and `brownout eval perplexity` on a full-size
checkpoint with random weights.

Steps, each timed with the wall clock, its peak GPU memory (torch's allocator) and the
process's peak host RSS:
  1. write: a random-weight safetensors checkpoint of a preset (or a config.json), optionally
     truncated to its first --layers decoder layers, in Hugging Face layout (config.json, one
     shard per decoder layer plus one for the embedding and head, the index, and the
     tokenizer of --tokenizer). It goes one shard at a time, so host memory holds one layer.
     Tensor names and shapes come from the family's checkpoint layout and the loader
     (brownout.models.checkpoint, brownout.runner.weights), the values as `load_format=dummy`
     draws them (norms one, the rest normal with std DUMMY_STD).
  2. unite: `brownout unite --method distill` run in this process through the command's own
     `run`, its parts timed from outside: loading the model, the calibration mix, per layer
     the capture of calibration states (the step of the one pass over the decoder stack that
     reaches that layer; the windows' embedding before it is left in the unite total) and the
     build (grouping and distillation), the save.
  3. eval: `brownout eval perplexity` at tau 1 and 0 on the held-out tail of --eval-text,
     through the command's own `run`: loading (with the united experts) and scoring.

With --layers below the model's, the full model's figures are extrapolated and marked as
such: the capture carries the windows' states from layer to layer (each layer's capture
runs that layer), so capture, build and save scale with the layer count; loading and
writing scale with the bytes; the scoring time scales with the layers (an upper bound: the
embedding and head do not grow); peak memory is the measured peak with the truncated
model's weights swapped for the full model's.

  python3 benchmarks/bench_unite_full.py --preset qwen1.5-moe-a2.7b \
      --calibration ../shared/data/text/gsm8k_train.jsonl --out unite_q15.json
  python3 benchmarks/bench_unite_full.py --render unite_q15.json unite_q3.json \
      --out benchmarks/results/unite/unite_full_h200.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import platform
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the demo model's tokenizer, as benchmarks/headline.py uses for dummy presets: its ids
# (8192) fall inside every preset's vocabulary and it carries a chat template
TOKENIZER = ROOT / "brownout" / "assets" / "demo" / "model"
NOT_TOKENIZER = re.compile(r"(^config\.json$|^generation_config\.json$|\.safetensors(\.index\.json)?$)")
INDEX_FILE = "model.safetensors.index.json"
GIB = 1024 ** 3
TIME_TARGET_S = 30 * 60  # an operator's budget for one unite or eval on one GPU
TAUS = "1,0"  # the exact model and every token on united experts


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Meter:
    """Wall time, peak GPU memory and peak host RSS of named phases. Phases nest: each one
    resets torch's peak counter, so the peak seen inside is carried up to every enclosing
    phase, and to the run's overall peak."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.phases: dict[str, dict] = {}
        self.layers: dict[int, dict] = {}
        self._open: list[int] = []  # running GPU peak of each open phase, outermost first
        self.overall_gpu = 0

    def _gpu_peak_since_reset(self) -> int:
        if not self.cuda:
            return 0
        import torch
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def _carry(self, peak: int) -> None:
        """Fold a peak into every open phase and the overall peak, then restart the counter."""
        self._open = [max(p, peak) for p in self._open]
        self.overall_gpu = max(self.overall_gpu, peak)
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def phase(self, name: str, layer: int | None = None):
        self._carry(self._gpu_peak_since_reset())
        self._open.append(0)
        start = time.perf_counter()
        try:
            yield
        finally:
            now = self._gpu_peak_since_reset()  # synchronizes first: the time includes the GPU's work
            seconds = time.perf_counter() - start
            peak = max(self._open.pop(), now)
            self._carry(peak)
            entry = {"seconds": seconds, "gpu_peak_bytes": peak, "rss_peak_bytes": _rss_peak_bytes()}
            if layer is None:
                self.phases[name] = entry
            else:
                self.layers.setdefault(layer, {"layer": layer})[name] = entry

    def gpu_total_peak(self) -> int:
        self._carry(self._gpu_peak_since_reset())
        return self.overall_gpu


@contextlib.contextmanager
def wrapped(module, name: str, make_wrapper):
    """Replace `module.name` by make_wrapper(original) for the block (restored after)."""
    original = getattr(module, name)
    setattr(module, name, make_wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


# ---- the checkpoint ----------------------------------------------------------------------

def timed(meter: Meter, name: str, layer_of=None):
    """A wrapper for `wrapped` that times each call as the meter's phase `name` (per layer
    when `layer_of(args, kwargs)` names the call's layer)."""
    def wrap(fn):
        def call(*a, **k):
            extra = {} if layer_of is None else {"layer": layer_of(a, k)}
            with meter.phase(name, **extra):
                return fn(*a, **k)
        return call
    return wrap


def model_config(preset: str | None, config: Path | None, layers: int | None):
    """A transformers config of the preset or config.json, cut to its first `layers` layers."""
    from transformers import AutoConfig

    from brownout.models.registry import PRESETS

    if preset is not None:
        if preset not in PRESETS:
            raise SystemExit(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        values = dict(PRESETS[preset])
    else:
        values = json.loads(Path(config).read_text())
        for key in ("transformers_version", "layer_types", "dtype", "torch_dtype"):
            values.pop(key, None)  # per-layer lists follow the layer count; dtype is ours to set
    full_layers = int(values["num_hidden_layers"])
    if layers is not None:
        if not 1 <= layers <= full_layers:
            raise SystemExit(f"--layers: expected 1..{full_layers}, got {layers}")
        values["num_hidden_layers"] = layers
    values.pop("layer_types", None)
    return AutoConfig.for_model(values.pop("model_type"), **values), full_layers


def model_bytes(spec, extra_slots: int, bytes_per_value: int) -> int:
    """Bytes of a model's parameters (built on the meta device: nothing is allocated)."""
    import torch

    from brownout.models.moe_lm import MoEForCausalLM

    with torch.device("meta"):
        model = MoEForCausalLM(spec, extra_slots=extra_slots)
    return sum(p.numel() for p in model.parameters()) * bytes_per_value


def _shard_of(param: str) -> int:
    """Decoder layer i -> shard i + 1; the embedding, final norm and head -> shard 0."""
    m = re.match(r"layers\.(\d+)\.", param)
    return 0 if m is None else int(m.group(1)) + 1


def write_checkpoint(hf_config, out_dir: Path, tokenizer_dir: Path, seed: int, dtype_name: str,
                     device: str, progress_bar=True) -> dict:
    """Random-weight checkpoint in Hugging Face layout; one shard in host memory at a time."""
    import torch
    from safetensors.torch import save_file

    from brownout.cliutil import progress
    from brownout.models.moe_lm import MoEForCausalLM
    from brownout.models.registry import family_of
    from brownout.runner.weights import DUMMY_STD, WeightLoader

    spec = family_of(hf_config).spec_from_config(hf_config)
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):  # shapes only
        model = MoEForCausalLM(spec, extra_slots=0)
    loader = WeightLoader(model)
    shards: dict[int, list] = {}
    for piece in loader.needed:
        shards.setdefault(_shard_of(piece.param), []).append(piece)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.dtype = dtype_name
    hf_config.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and not NOT_TOKENIZER.search(f.name):
            shutil.copy2(f, out_dir / f.name)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    n = len(shards)
    bar = progress(n, "checkpoint", "shard") if progress_bar else None
    for k, index in enumerate(sorted(shards)):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for piece in shards[index]:
            t = torch.empty(loader.expected_shape(piece), dtype=dtype, device=device)
            if piece.param.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, DUMMY_STD, generator=gen)
            tensors[piece.name] = t.cpu()
            weight_map[piece.name] = name
            total += t.numel() * t.element_size()
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        del tensors
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=1) + "\n")
    return {"bytes": total, "shards": n, "tensors": len(weight_map)}


# ---- unite and eval, in process ----------------------------------------------------------

def run_unite(meter: Meter, model_dir: Path, out_dir: Path, args) -> dict:
    """`brownout unite --method distill` through its own `run`, its parts timed."""
    from brownout.runner import loader as loader_module
    from brownout.unite import builder, calibration, store
    from brownout.unite import cli as unite_cli

    flags = ["--model", str(model_dir), "--way", str(args.way), "--method", "distill",
             "--grouping", args.grouping, "--calibration", *map(str, args.calibration),
             "--calibration-tokens", str(args.calibration_tokens), "--seq-len", str(args.seq_len),
             "--distill-steps", str(args.distill_steps), "--device", args.device,
             "--dtype", args.unite_dtype, "--out", str(out_dir), "--seed", str(args.seed)]
    if args.distill_group_batch is not None:
        flags += ["--distill-group-batch", str(args.distill_group_batch)]
    parser = argparse.ArgumentParser(prog="brownout unite")
    unite_cli.add_arguments(parser)
    cli_args = parser.parse_args(flags)

    with contextlib.ExitStack() as stack:
        stack.enter_context(wrapped(loader_module, "load_model", timed(meter, "unite.load")))
        stack.enter_context(wrapped(calibration, "calibration_mix", timed(meter, "unite.calibration_mix")))
        stack.enter_context(wrapped(store, "save_united", timed(meter, "unite.save")))
        # StackCapture.states(self, i) takes the MoE layer's index, build_layer(..., layer) its
        # decoder layer: equal where every layer is MoE, as in the presets
        stack.enter_context(wrapped(calibration.StackCapture, "states",
                                    timed(meter, "capture", lambda a, k: a[1])))
        stack.enter_context(wrapped(builder, "build_layer", timed(meter, "build", lambda a, k: a[3])))
        with meter.phase("unite"):
            rc = unite_cli.run(cli_args)
    if rc != 0:
        raise SystemExit(f"brownout unite exited {rc}")
    return {"flags": flags}


def run_eval(meter: Meter, model_dir: Path, united_dir: Path, out_json: Path, args) -> dict:
    """`brownout eval perplexity` at tau 1 and 0 through its own `run`, its parts timed."""
    from brownout.eval import cli as eval_cli
    from brownout.eval import perplexity, scoring

    flags = ["perplexity", "--model", str(model_dir), "--united-experts", str(united_dir),
             "--tau", TAUS, "--text", str(args.eval_text), "--part", "tail",
             "--max-tokens", str(args.eval_tokens), "--window", str(args.eval_window),
             "--batch-tokens", str(args.eval_batch_tokens), "--device", args.device,
             "--dtype", args.eval_dtype, "--out", str(out_json)]
    parser = argparse.ArgumentParser(prog="brownout eval")
    eval_cli.add_arguments(parser)
    cli_args = parser.parse_args(flags)

    with wrapped(scoring, "load_eval_model", timed(meter, "eval.load")), \
            wrapped(perplexity, "evaluate_perplexity", timed(meter, "eval.score")):
        with meter.phase("eval"):
            rc = eval_cli.run(cli_args)
    if rc != 0:
        raise SystemExit(f"brownout eval exited {rc}")
    report = json.loads(out_json.read_text())
    return {"flags": flags, "results": [{"tau": r["tau"], "perplexity": r["perplexity"],
                                         "tokens_scored": r.get("tokens_scored"), "steps": r.get("steps")}
                                        for r in report["results"]]}


def unite_defaults() -> dict:
    """`brownout unite`'s own defaults of the two settings that set its time."""
    from brownout.unite import cli as unite_cli

    parser = argparse.ArgumentParser()
    unite_cli.add_arguments(parser)
    return {"calibration_tokens": parser.get_default("calibration_tokens"),
            "distill_steps": parser.get_default("distill_steps")}


# ---- extrapolation to the full model -----------------------------------------------------

def extrapolate(report: dict) -> dict:
    """The full model's times and peaks from a truncated run's (equal to them when whole)."""
    ph, layers = report["phases"], report["layers"]
    run_l, full_l = report["layers_run"], report["layers_full"]
    scale_bytes = report["weights"]["checkpoint_full_bytes"] / report["weights"]["checkpoint_run_bytes"]
    capture = [e["capture"]["seconds"] for e in layers]
    # each layer's capture runs that layer once: the full model's is the mean times its layers
    capture_full = sum(capture) / len(capture) * full_l if run_l < full_l else sum(capture)
    build = [e["build"]["seconds"] for e in layers]
    build_full = sum(build) / len(build) * full_l
    unite_parts = {"unite.load": ph["unite.load"]["seconds"] * scale_bytes,
                   "unite.calibration_mix": ph["unite.calibration_mix"]["seconds"],
                   "capture": capture_full, "build": build_full,
                   "unite.save": ph["unite.save"]["seconds"] * full_l / run_l}
    unite_other = ph["unite"]["seconds"] - sum(
        ph[k]["seconds"] for k in ("unite.load", "unite.calibration_mix", "unite.save")) \
        - sum(capture) - sum(build)
    eval_full = {"eval.load": ph["eval.load"]["seconds"] * scale_bytes,
                 "eval.score": ph["eval.score"]["seconds"] * full_l / run_l}
    eval_other = ph["eval"]["seconds"] - ph["eval.load"]["seconds"] - ph["eval.score"]["seconds"]
    w = report["weights"]
    steps = sum(e.get("distill_steps", 0) for e in layers)
    per_step = sum(build) / steps if steps else None
    # the command's defaults: calibration scales the capture, the step cap the fits (an upper
    # bound: every group taking as many steps over the cap as it took here, none stopping early)
    d = report["cli_defaults"]
    token_scale = d["calibration_tokens"] / report["params"]["calibration_tokens"]
    steps_scale = d["distill_steps"] / max(1.0, steps / max(1, len(layers) * report["groups_per_layer"]))
    at_defaults = (unite_parts["unite.load"] + unite_parts["unite.save"] + max(0.0, unite_other)
                   + (unite_parts["unite.calibration_mix"] + capture_full) * token_scale
                   + build_full * steps_scale)
    return {
        "distill_step_s": per_step,
        "unite_s_at_cli_defaults": at_defaults,
        "extrapolated": run_l < full_l,
        "write_s": ph["write"]["seconds"] * scale_bytes,
        "unite_s": sum(unite_parts.values()) + max(0.0, unite_other),
        "unite_parts_s": unite_parts,
        "capture_per_layer_s": sum(capture) / len(capture),
        "build_per_layer_s": sum(build) / len(build),
        "eval_s": sum(eval_full.values()) + max(0.0, eval_other),
        "eval_parts_s": eval_full,
        "unite_gpu_peak_bytes": None if not report["gpu_peak_bytes"] else
        ph["unite"]["gpu_peak_bytes"] - w["unite_run_bytes"] + w["unite_full_bytes"],
        "eval_gpu_peak_bytes": None if not report["gpu_peak_bytes"] else
        ph["eval"]["gpu_peak_bytes"] - w["eval_run_bytes"] + w["eval_full_bytes"],
    }


# ---- one run -----------------------------------------------------------------------------

def environment(cuda: bool) -> dict:
    """Where and when the run happened."""
    import torch
    import transformers

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
            "torch": torch.__version__, "transformers": transformers.__version__}


def bench(args, meter: Meter) -> dict:
    import torch

    from brownout.models.registry import family_of

    cuda = meter.cuda
    hf_config, full_layers = model_config(args.preset, args.config, args.layers)
    full_config, _ = model_config(args.preset, args.config, None)
    spec, full_spec = (family_of(c).spec_from_config(c) for c in (hf_config, full_config))
    layers_run = spec.num_layers
    groups = math.ceil(spec.num_experts / args.way)
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    weights = {
        "checkpoint_run_bytes": model_bytes(spec, 0, size[args.checkpoint_dtype]),
        "checkpoint_full_bytes": model_bytes(full_spec, 0, size[args.checkpoint_dtype]),
        "unite_run_bytes": model_bytes(spec, 0, size[args.unite_dtype]),
        "unite_full_bytes": model_bytes(full_spec, 0, size[args.unite_dtype]),
        "eval_run_bytes": model_bytes(spec, groups, size[args.eval_dtype]),
        "eval_full_bytes": model_bytes(full_spec, groups, size[args.eval_dtype]),
    }
    own_work = not args.workdir
    work = Path(tempfile.mkdtemp(prefix="bench-unite-")) if own_work else Path(args.workdir)
    model_dir = work / "model"
    united_dir = Path(args.united_dir) if args.united_dir else work / "united"
    for d in (model_dir, united_dir):
        if d.exists():
            raise SystemExit(f"--workdir: {d} exists; give an empty directory")
    gen_device = "cuda" if cuda else "cpu"
    try:
        with meter.phase("write"):
            written = write_checkpoint(hf_config, model_dir, args.tokenizer, args.seed,
                                       args.checkpoint_dtype, gen_device)
        if cuda:
            torch.cuda.empty_cache()
        unite = run_unite(meter, model_dir, united_dir, args)
        if cuda:
            torch.cuda.empty_cache()
        evaluation = run_eval(meter, model_dir, united_dir, work / "eval.json", args)
        manifest = json.loads((united_dir / "manifest.json").read_text())
    finally:  # the checkpoint and the united experts take tens of GB of the disk
        if not args.keep:
            for d in (model_dir, united_dir, *([work] if own_work else [])):
                shutil.rmtree(d, ignore_errors=True)
    steps = [g.get("steps", 0) for groups_ in manifest["fit_error"].values() for g in groups_]
    for layer, groups_ in manifest["fit_error"].items():
        meter.layers[int(layer)]["distill_steps"] = sum(g.get("steps", 0) for g in groups_)
    report = {
        "script": "benchmarks/bench_unite_full.py",
        "command": args.command,
        **environment(cuda),
        "weights_kind": "random (dummy): timing and memory only; the perplexities mean nothing",
        "preset": args.preset, "config": None if args.config is None else str(args.config),
        "architecture": spec.architecture,
        "layers_run": layers_run, "layers_full": full_layers, "truncated": layers_run < full_layers,
        "num_experts": spec.num_experts, "way": args.way, "groups_per_layer": groups,
        "grouping": args.grouping,
        "params": {"calibration": [str(c) for c in args.calibration],
                   "calibration_tokens": args.calibration_tokens, "seq_len": args.seq_len,
                   "distill_steps_max": args.distill_steps,
                   "distill_group_batch": args.distill_group_batch, "eval_text": str(args.eval_text),
                   "eval_part": "tail", "eval_tokens": args.eval_tokens, "eval_window": args.eval_window,
                   "eval_batch_tokens": args.eval_batch_tokens, "taus": TAUS,
                   "checkpoint_dtype": args.checkpoint_dtype, "unite_dtype": args.unite_dtype,
                   "eval_dtype": args.eval_dtype, "seed": args.seed},
        "cli_defaults": unite_defaults(),
        "checkpoint": written, "weights": weights,
        "phases": meter.phases,
        "layers": [meter.layers[i] for i in sorted(meter.layers)],
        "distill_steps_taken": {"groups": len(steps), "mean": sum(steps) / max(1, len(steps)),
                                "max": max(steps, default=0)},
        "gpu_peak_bytes": meter.gpu_total_peak() if cuda else None,
        "rss_peak_bytes": _rss_peak_bytes(),
        "unite": unite, "eval": evaluation,
        "united_dir": str(united_dir) if args.keep else None,
        "model_dir": str(model_dir) if args.keep else None,
    }
    report["full_model"] = extrapolate(report)
    return report


# ---- the table ---------------------------------------------------------------------------

def _s(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _g(v) -> str:
    return "-" if not v else f"{v / GIB:.1f}"


def _group_batch(params: dict) -> str:
    """How many groups of a layer were distilled together (reports made before the flag: one)."""
    if "distill_group_batch" not in params:
        return "one group at a time"
    batch = params["distill_group_batch"]
    return "groups distilled together: as many as fit in memory" if batch is None \
        else f"groups distilled together: at most {batch}"


def render(reports: list[dict], notes: tuple[str, ...] = ()) -> str:
    first = reports[0]
    lines = [
        "# `brownout unite` (distill) and `brownout eval` on full-size checkpoints",
        "",
        f"Machine: {first['machine']}, {first['device']}"
        + (f" ({first['gpu_memory_bytes'] / GIB:.0f} GiB)" if first.get("gpu_memory_bytes") else "")
        + f"; torch {first['torch']}, transformers {first['transformers']}; date {first['date'][:10]}.",
        "",
        "Weights are random (dummy), written by the script in Hugging Face layout: the times and "
        "memory are those of the real shapes, the perplexities mean nothing. Made by "
        "`benchmarks/bench_unite_full.py` (commands below); this table by "
        "`python3 benchmarks/bench_unite_full.py --render JSON... --out FILE`.",
        "",
        *(line for note in notes for line in (note, "")),
    ]
    for r in reports:
        if not r.get("complete", False):
            lines += [f"## Stopped before the end: `{r['command']}` ({r['stopped_by']})", "",
                      "| phase | measured s | GPU peak GiB |", "|---|---:|---:|"]
            lines += [f"| {k} | {_s(e['seconds'])} | {_g(e['gpu_peak_bytes'])} |" for k, e in r["phases"].items()]
            lines += [f"| layer {e['layer']} {k} | {_s(e[k]['seconds'])} | {_g(e[k]['gpu_peak_bytes'])} |"
                      for e in r["layers"] for k in ("capture", "build") if k in e]
            lines.append("")
            continue
        name = r["preset"] or r["config"]
        full = r["full_model"]
        p = r["params"]
        lines += [f"## {name} ({r['architecture']}, {r['num_experts']} experts, way {r['way']}: "
                  f"{r['groups_per_layer']} groups per layer)", ""]
        if r["truncated"]:
            lines += [f"Measured on the first {r['layers_run']} of its {r['layers_full']} layers; "
                      "every full-model figure is an EXTRAPOLATION (see the method below), not a "
                      "measurement.", ""]
        else:
            lines += [f"Measured on the whole model ({r['layers_full']} layers).", ""]
        lines += [f"Command: `{r['command']}`", "",
                  f"Calibration: {p['calibration_tokens']} tokens of "
                  f"{', '.join(Path(c).name for c in p['calibration'])} in windows of "
                  f"{p['seq_len']}; distillation at most {p['distill_steps_max']} steps per group "
                  f"(taken: mean {r['distill_steps_taken']['mean']:.0f}, max "
                  f"{r['distill_steps_taken']['max']}; {_group_batch(p)}); unite runs the model in {p['unite_dtype']}, "
                  f"eval in {p['eval_dtype']} at tau {p['taus']} on {p['eval_tokens']} tokens of "
                  f"the tail of {Path(p['eval_text']).name}; checkpoint in {p['checkpoint_dtype']} "
                  f"({r['checkpoint']['bytes'] / GIB:.1f} GiB, {r['checkpoint']['shards']} shards).",
                  "",
                  "| phase | measured s | GPU peak GiB | host RSS peak so far GiB |",
                  "|---|---:|---:|---:|"]
        ph = r["phases"]
        for key, label in (("write", "write checkpoint"), ("unite", "unite (all)"),
                           ("unite.load", "  load model"), ("unite.calibration_mix", "  calibration text"),
                           ("unite.save", "  save united experts"), ("eval", "eval (all)"),
                           ("eval.load", "  load model + united"), ("eval.score", "  score (all taus)")):
            e = ph[key]
            lines.append(f"| {label} | {_s(e['seconds'])} | {_g(e['gpu_peak_bytes'])} | "
                         f"{_g(e['rss_peak_bytes'])} |")
        cap = sum(x["capture"]["seconds"] for x in r["layers"])
        bld = sum(x["build"]["seconds"] for x in r["layers"])
        lines.append(f"|   capture calibration states ({_n(r['layers_run'], 'layer')}) | {_s(cap)} | "
                     f"{_g(max(x['capture']['gpu_peak_bytes'] for x in r['layers']))} | - |")
        lines.append(f"|   group + distill ({_n(r['layers_run'], 'layer')}; "
                     f"{full['build_per_layer_s']:.1f} s per layer) | {_s(bld)} | "
                     f"{_g(max(x['build']['gpu_peak_bytes'] for x in r['layers']))} | - |")
        kind = "extrapolated" if full["extrapolated"] else "measured"
        gpu = r.get("gpu_memory_bytes")
        fits = lambda b: "" if not gpu else (" (fits)" if b < gpu else " (DOES NOT FIT)")  # noqa: E731
        within = lambda s: " (within 30 min)" if s <= TIME_TARGET_S else " (OVER 30 min)"  # noqa: E731
        lines += ["", f"Full model ({r['layers_full']} layers), {kind}:", "",
                  "| | time | GPU peak GiB |", "|---|---:|---:|",
                  f"| write checkpoint | {full['write_s'] / 60:.1f} min | - |",
                  f"| unite | {full['unite_s'] / 60:.1f} min{within(full['unite_s'])} | "
                  f"{_g(full['unite_gpu_peak_bytes'])}{fits(full['unite_gpu_peak_bytes'])} |",
                  f"| eval | {full['eval_s'] / 60:.1f} min{within(full['eval_s'])} | "
                  f"{_g(full['eval_gpu_peak_bytes'])}{fits(full['eval_gpu_peak_bytes'])} |",
                  f"| unite at the command's defaults ({r['cli_defaults']['calibration_tokens']} "
                  f"calibration tokens, up to {r['cli_defaults']['distill_steps']} steps), an upper "
                  f"bound extrapolated from this run | {full['unite_s_at_cli_defaults'] / 60:.1f} min"
                  f"{within(full['unite_s_at_cli_defaults'])} | - |", ""]
        if full.get("distill_step_s"):
            lines += [f"One distillation step (with its share of the group's set-up) takes "
                      f"{full['distill_step_s'] * 1000:.1f} ms.", ""]
        if full["extrapolated"]:
            parts = full["unite_parts_s"]
            if "capture_fit" in full:  # a report whose capture ran the model up to each layer
                capture = ("capture of layer i runs i + 1 layers, so the line "
                           f"{full['capture_fit']['a_s']:.2f} s + {full['capture_fit']['b_s_per_layer_run']:.2f} s "
                           f"x (i + 1) fitted to the capture times of the {_n(r['layers_run'], 'measured layer')} "
                           f"is summed over {r['layers_full']} layers")
            else:
                capture = ("capture carries the states from layer to layer, so "
                           f"{full['capture_per_layer_s']:.2f} s per layer (the mean of the "
                           f"{_n(r['layers_run'], 'measured layer')}) x {r['layers_full']}")
            lines += [f"Extrapolation: {capture} ({parts['capture'] / 60:.1f} min); group + distill "
                      f"= {full['build_per_layer_s']:.1f} s per layer x {r['layers_full']} "
                      f"({parts['build'] / 60:.1f} min); loading and writing scale with the checkpoint's "
                      "bytes; scoring with the layers (an upper bound: embedding and head do not grow); "
                      "the GPU peak is the measured one with the truncated weights swapped for the full "
                      "model's.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--render", nargs="+", type=Path, default=None, metavar="JSON",
                   help="render these result files as markdown to --out instead of running")
    p.add_argument("--note", action="append", default=[], help="with --render: a paragraph under the title")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", default=None, help="a preset of brownout/models/registry.py")
    which.add_argument("--config", type=Path, default=None, help="a config.json instead of a preset")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="directory holding the tokenizer")
    p.add_argument("--calibration", nargs="+", type=Path, default=None, help="calibration text files")
    p.add_argument("--eval-text", type=Path, default=None,
                   help="text priced at tau 1 and 0, its held-out tail (default: the first "
                        "calibration file, whose tail calibration leaves out)")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-group-batch", type=int, default=None,
                   help="unite's --distill-group-batch: groups of a layer distilled together at most "
                        "(1: one group at a time; default: unite's, as many as fit in memory)")
    p.add_argument("--way", type=int, default=4)
    p.add_argument("--grouping", choices=["contiguous", "similarity"], default="contiguous")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored at each tau")
    p.add_argument("--eval-window", type=int, default=512, help="eval's --window")
    p.add_argument("--eval-batch-tokens", type=int, default=2048, help="eval's --batch-tokens")
    p.add_argument("--checkpoint-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--unite-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="unite's --dtype")
    p.add_argument("--eval-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="eval's --dtype")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help="where the checkpoint and united experts go (default: a new temporary "
                        "directory); never under $OUT, which carries results only")
    p.add_argument("--united-dir", default=None,
                   help="where the united experts go (default: WORKDIR/united); another disk "
                        "when the checkpoint fills the work directory's")
    p.add_argument("--keep", action="store_true",
                   help="keep the checkpoint and the united experts (deleted by default)")
    p.add_argument("--out", type=Path, required=True, help="result JSON (with --render: the markdown)")
    args = p.parse_args(argv)
    if args.render:
        text = render([json.loads(f.read_text()) for f in args.render], tuple(args.note))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
        return 0
    if (args.preset is None) == (args.config is None):
        p.error("give --preset or --config")
    if not args.calibration:
        p.error("--calibration FILE is needed")
    args.eval_text = args.eval_text or args.calibration[0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    args.command = "python3 benchmarks/bench_unite_full.py " + " ".join(
        sys.argv[1:] if argv is None else argv)

    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    meter = Meter(cuda)
    # `timeout -s TERM` ends the run as an exception, so the phases so far are still written
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        report = bench(args, meter)
    except BaseException as exc:  # an interrupted run keeps what it measured
        partial = {"complete": False, "stopped_by": repr(exc), "command": args.command,
                   **environment(cuda),
                   "phases": meter.phases, "layers": [meter.layers[i] for i in sorted(meter.layers)],
                   "gpu_peak_bytes": meter.overall_gpu if cuda else None, "rss_peak_bytes": _rss_peak_bytes()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(partial, indent=1) + "\n")
        print(f"stopped ({exc!r}); wrote the phases measured so far to {args.out}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["complete"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    full = report["full_model"]
    print(f"wrote {args.out}: unite {report['phases']['unite']['seconds']:.1f} s, eval "
          f"{report['phases']['eval']['seconds']:.1f} s measured; full model "
          f"({'extrapolated' if full['extrapolated'] else 'measured'}): unite {full['unite_s'] / 60:.1f} min, "
          f"eval {full['eval_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
