"""On-disk format of united experts and installing them into a loaded model.

A directory holds `united.safetensors` (per MoE layer i of the decoder:
`layers.{i}.w13` [G, 2I, D], `layers.{i}.w2` [G, D, I], `layers.{i}.group_of` [E] int64)
and `manifest.json` (source checkpoint and the sha256 of its config.json, shapes, way,
grouping map per layer, method, calibration data, seed, date, fit errors per group).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "united.safetensors"
MANIFEST_FILE = "manifest.json"


def config_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def model_shapes(spec) -> dict:
    """The shapes a united-expert set depends on, from a model's `MoESpec`."""
    return {"num_experts": spec.num_experts, "hidden_size": spec.hidden_size,
            "moe_intermediate_size": spec.moe_intermediate_size,
            "num_layers": spec.num_layers, "moe_layers": list(spec.moe_layers)}


def save_united(out_dir: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "brownout-united", "version": str(FORMAT_VERSION)})
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(united_dir: Path) -> dict:
    path = Path(united_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"united experts: {united_dir} has no {MANIFEST_FILE}")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"united experts: format_version {manifest.get('format_version')!r} "
                         f"is not the supported {FORMAT_VERSION}")
    return manifest


def check_manifest(manifest: dict, spec, model_dir: Optional[Path] = None,
                   way: Optional[int] = None) -> None:
    """Raise ValueError naming every field where the united set and the model differ."""
    problems = []
    want = model_shapes(spec)
    for key, value in want.items():
        got = manifest.get("shapes", {}).get(key)
        if got != value:
            problems.append(f"shapes.{key}: united experts have {got}, model has {value}")
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        sha = config_sha256(Path(model_dir))
        if manifest.get("source_config_sha256") != sha:
            problems.append(f"source model: built for {manifest.get('source_model')!r} "
                            f"(config sha256 {str(manifest.get('source_config_sha256'))[:12]}...), "
                            f"model config sha256 is {sha[:12]}...")
    if way is not None and manifest.get("way") != way:
        problems.append(f"way: united experts have way {manifest.get('way')}, expected {way}")
    if problems:
        raise ValueError("united experts do not match the model: " + "; ".join(problems))


def read_united(united_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    manifest = read_manifest(united_dir)
    path = Path(united_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"united experts: {united_dir} has no {WEIGHTS_FILE}")
    return manifest, load_file(str(path))


def load_united(model, united_dir: Path, model_dir: Optional[Path] = None,
                way: Optional[int] = None) -> dict:
    """Validate `united_dir` against `model` and install it into every MoE layer.

    `model` is a `LoadedModel` (its spec and checkpoint directory are used) or a bare
    `MoEForCausalLM` (then pass `model_dir` to check the source checkpoint). Returns the
    manifest.
    """
    if hasattr(model, "model") and hasattr(model, "spec"):  # LoadedModel
        model_dir = model_dir or model.model_dir
        model = model.model
    manifest, tensors = read_united(united_dir)
    check_manifest(manifest, model.spec, model_dir, way)
    for layer, moe in zip(model.spec.moe_layers, model.moe_layers()):
        try:
            w13 = tensors[f"layers.{layer}.w13"]
            w2 = tensors[f"layers.{layer}.w2"]
            group_of = tensors[f"layers.{layer}.group_of"]
        except KeyError as missing:
            raise ValueError(f"united experts: {WEIGHTS_FILE} lacks {missing}") from None
        dtype, device = moe.w13.dtype, moe.w13.device
        moe.install_united(w13.to(device, dtype), w2.to(device, dtype), group_of.to(device))
    log.info("installed united experts from %s (way %s, %s, %s)", united_dir, manifest["way"],
             manifest["grouping"]["kind"], manifest["method"])
    return manifest
