"""Build a model from a Hugging Face-format checkpoint (safetensors only) or from a config
with random weights (load_format="dummy"), on the chosen device and dtype.

Checkpoint tensors are mapped onto the packed layout of `MoEForCausalLM`: q/k/v fused into
one projection, every expert's gate/up into `w13[e]` and down into `w2[e]`. Under tensor
parallelism each rank keeps only its part of every tensor (brownout.distributed.sharding);
dummy weights are drawn at full size and then split, so they equal the one-process ones.
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from brownout.config import ModelLoadConfig
from brownout.parallel.info import SINGLE, ParallelInfo
from brownout.parallel.sharding import expert_piece, expert_slot, local_part, qkv_piece, shard_dim
from brownout.models.moe_lm import MoEForCausalLM
from brownout.models.registry import PRESETS, family_of, preset_config
from brownout.models.spec import MoESpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        extra = math.ceil(spec.num_experts / 2)  # room for way-2 (or coarser) united experts
    max_pos = min(spec.max_position_embeddings, load.max_model_len or spec.max_position_embeddings)
    with _default(device, dtype):
        model = MoEForCausalLM(spec, extra_slots=extra, max_positions=max_pos, parallel=parallel)
    model.eval().requires_grad_(False)
    if load.load_format == "dummy":
        _init_dummy(model, load.seed)
        model_dir = Path(load.model) if (Path(load.model) / "config.json").is_file() else None
    else:
        model_dir = Path(load.model)
        load_safetensors(model, spec, model_dir)
    return LoadedModel(model, spec, hf_config, device, dtype, model_dir, parallel)


@torch.no_grad()
def _init_dummy(model: MoEForCausalLM, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif model.parallel.active:  # draw the full tensor, keep this rank's part
            full = torch.empty(_full_shape(model, name, p), dtype=p.dtype, device=p.device)
            p.copy_(local_part(name, full.normal_(0.0, 0.02, generator=gen), model.spec, model.parallel))
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _full_shape(model: MoEForCausalLM, name: str, p: torch.Tensor) -> tuple[int, ...]:
    """Shape of parameter `name` in the one-process model."""
    s, ws = model.spec, model.parallel.world_size
    if name.endswith(("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias")):
        return (s.q_size + 2 * s.kv_size,) + tuple(p.shape[1:])
    if name.endswith("self_attn.o_proj.weight"):
        return (p.shape[0], s.q_size)
    if name.endswith("gate_up_proj.weight"):
        return (p.shape[0] * ws, p.shape[1])
    if name.endswith("down_proj.weight"):
        return (p.shape[0], p.shape[1] * ws)
    if name.endswith((".w13", ".w2")):
        slots = s.num_experts + model.extra_slots
        inter = s.moe_intermediate_size
        return (slots, 2 * inter, s.hidden_size) if name.endswith(".w13") else (slots, s.hidden_size, inter)
    return tuple(p.shape)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_PROJ_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {model_dir} (only safetensors are read)")
    return files


@torch.no_grad()
def load_safetensors(model: MoEForCausalLM, spec: MoESpec, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                target = _place(params, spec, key, f.get_tensor(key), model.parallel)
                if target is None:
                    log.warning("ignoring checkpoint tensor %s", key)
                else:
                    filled.add(target)
    expected = {n for n in params if ".w13" not in n and ".w2" not in n}
    expected |= {n for n in params if n.endswith((".w13", ".w2"))}
    if spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - filled)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _place(params: dict, spec: MoESpec, key: str, t: torch.Tensor,
           parallel: ParallelInfo = SINGLE) -> Optional[str]:
    """Copy (this rank's part of) one checkpoint tensor into the model; return the parameter
    name it filled."""
    top = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if key in top:
        params[top[key]].copy_(t)
        return top[key]
    m = _LAYER.match(key)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    pre = f"layers.{i}."
    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        proj, kind = rest.split(".")[1:3]
        lo, rows = qkv_piece(proj, t, spec, parallel)
        params[pre + f"self_attn.qkv_proj.{kind}"][lo:lo + rows.shape[0]].copy_(rows)
        return pre + f"self_attn.qkv_proj.{kind}"  # filled once all three arrived
    em = _EXPERT.match(rest)
    if em:
        e, proj = int(em.group(1)), _PROJ_ALIASES.get(em.group(2), em.group(2))
        name = pre + ("mlp.w2" if proj == "down_proj" else "mlp.w13")
        slot = expert_slot(e, spec, parallel)
        if slot is None:  # expert parallel: another rank holds expert e
            return name
        t = expert_piece(proj, t, parallel)
        if proj == "down_proj":
            params[name][slot].copy_(t)
            return name
        inter = t.shape[0]  # this rank's width
        lo = 0 if proj == "gate_proj" else inter
        params[name][slot, lo:lo + inter].copy_(t)
        return name
    rest = re.sub(r"^block_sparse_moe\.", "mlp.", rest)
    if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # already packed
        name = pre + ("mlp.w13" if "gate_up" in rest else "mlp.w2")
        t = local_part(name, t, spec, parallel)
        params[name][: t.shape[0]].copy_(t)
        return name
    for dense in ("mlp.shared_expert.", "mlp."):
        if rest in (dense + "gate_proj.weight", dense + "up_proj.weight"):
            w = params[pre + dense + "gate_up_proj.weight"]
            half = w.shape[0] // 2
            lo = 0 if "gate_proj" in rest else half
            w[lo:lo + half].copy_(shard_dim(t, parallel, 0, "MLP intermediate size"))
            return pre + dense + "gate_up_proj.weight"
    if pre + rest in params:
        params[pre + rest].copy_(local_part(pre + rest, t, spec, parallel))
        return pre + rest
    return None
