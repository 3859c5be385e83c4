"""Build a model from a Hugging Face-format checkpoint (safetensors only) or from a config
with random weights (load_format="dummy"), on the chosen device and dtype.

Checkpoint tensors are mapped onto the packed layout of `MoEForCausalLM` (q/k/v fused into
one projection, every expert's gate/up into `w13[e]` and down into `w2[e]`) by the family's
checkpoint layout, and every piece is accounted for (brownout.runner.weights). Under tensor
parallelism each rank keeps only its part of every tensor (brownout.parallel.sharding);
dummy weights are drawn at full size and then split, so they equal the one-process ones.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from brownout.config import ModelLoadConfig
from brownout.parallel.info import SINGLE, ParallelInfo
from brownout.models.moe_lm import MoEForCausalLM
from brownout.models.registry import PRESETS, family_of, preset_config
from brownout.models.spec import MoESpec
# checkpoint_files: brownout.unite reads a checkpoint's file list from this module
from brownout.runner.weights import checkpoint_files, init_dummy, load_safetensors  # noqa: F401

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNITED_ROOM_WAY = 2  # default extra expert slots hold way-2 (or coarser) united experts


@dataclass
class LoadedModel:
    model: MoEForCausalLM
    spec: MoESpec
    hf_config: object
    device: torch.device
    dtype: torch.dtype
    model_dir: Optional[Path]  # None for a dummy preset
    parallel: ParallelInfo = SINGLE  # this process's rank and how the model is split


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def set_cpu_threads(device: torch.device, threads: Optional[int]) -> None:
    """Torch threads of this process on the CPU (None: leave torch's default)."""
    if device.type == "cpu" and threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_hf_config(load: ModelLoadConfig):
    if load.load_format == "dummy" and load.model in PRESETS:
        return preset_config(load.model)
    path = Path(load.model)
    if not (path / "config.json").is_file():
        presets = f"; with --load-format dummy a preset name: {', '.join(PRESETS)}"
        raise ValueError(f"model: {load.model!r} is not a directory with a config.json{presets}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


@contextmanager
def _default(device: torch.device, dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def load_model(load: ModelLoadConfig, parallel: Optional[ParallelInfo] = None) -> LoadedModel:
    """This rank's shard of the model (the whole model in one process)."""
    parallel = parallel or SINGLE
    hf_config = load_hf_config(load)
    spec = family_of(hf_config).spec_from_config(hf_config)
    device = resolve_device(load.device)
    set_cpu_threads(device, load.cpu_threads)
    dtype = resolve_dtype(load.dtype, device)
    extra = load.extra_expert_slots
    if extra is None:
        extra = math.ceil(spec.num_experts / UNITED_ROOM_WAY)
    max_pos = min(spec.max_position_embeddings, load.max_model_len or spec.max_position_embeddings)
    with _default(device, dtype):
        model = MoEForCausalLM(spec, extra_slots=extra, max_positions=max_pos, parallel=parallel)
    model.eval().requires_grad_(False)
    if load.load_format == "dummy":
        init_dummy(model, load.seed)
        model_dir = Path(load.model) if (Path(load.model) / "config.json").is_file() else None
    else:
        model_dir = Path(load.model)
        load_safetensors(model, model_dir)
    fold = load.fold_shared_expert if load.fold_shared_expert is not None else device.type == "cuda"
    if fold:
        folded = [moe.fold_shared_expert() for moe in model.moe_layers()]
        if any(folded) and device.type == "cuda":
            torch.cuda.empty_cache()  # the unfolded expert tensors' blocks go back before KV sizing
    return LoadedModel(model, spec, hf_config, device, dtype, model_dir, parallel)
