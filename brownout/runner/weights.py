"""Fill `MoEForCausalLM` from a safetensors checkpoint (or any name -> tensor mapping), or
with random weights of the real shapes.

The family's `CheckpointLayout` (brownout.models.checkpoint) lists every piece the model
needs. `WeightLoader` places each checkpoint tensor by the weight-loading function of its
`Part` (q/k/v rows into qkv_proj, gate/up halves of gate_up_proj, one expert's slot of
w13 / w2, ...), which keeps only this rank's part under tensor parallelism; under expert
parallelism the experts of other ranks are skipped unread. It counts every piece and, once
all tensors are read, names the first one this rank needs that never came. A tensor of
the wrong shape or one the model has no place for is an error at once. Only safetensors
are read, never a pickle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from brownout.parallel.sharding import expert_piece, expert_slot, local_part, qkv_piece, shard_dim
from brownout.models.checkpoint import PACKED_COVERS, CheckpointLayout, Part, Piece, PieceKey
from brownout.models.moe_lm import MoEForCausalLM
from brownout.models.registry import layout_of
from brownout.models.spec import MoESpec

log = logging.getLogger(__name__)

Where = Union[Path, str]  # a checkpoint file, or what else the tensors came from, for errors

INDEX_FILE = "model.safetensors.index.json"  # names the files of a sharded checkpoint
DUMMY_STD = 0.02  # std of random weights: transformers' default initializer_range


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, misshapen, unexpected or unreadable."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every one."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"checkpoint index {index} is unreadable: {e!r}") from e
        files = [model_dir / n for n in names]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"checkpoint file {absent[0]}, named in {index}, does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model: no *.safetensors files in {model_dir} (only safetensors are read)")
    return files


@torch.no_grad()
def load_safetensors(model: MoEForCausalLM, model_dir: Path) -> None:
    loader = WeightLoader(model)
    for file in checkpoint_files(model_dir):
        try:
            _read_file(loader, file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {file} is not a readable safetensors file: {e}") from e
    loader.check_complete(f"the checkpoint in {model_dir}")


def _read_file(loader: WeightLoader, file: Path) -> None:
    """Place every tensor of one file that this rank needs; shapes are checked before reading."""
    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            piece = loader.lookup(name, file)
            if piece is not None:
                loader.check_shape(piece, tuple(f.get_slice(name).get_shape()), file)
                loader.place(piece, f.get_tensor(name), file)


@torch.no_grad()
def load_tensors(model: MoEForCausalLM, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Fill `model` from checkpoint-named tensors held in memory (e.g. a transformers
    model's state dict); `source` names them in errors."""
    loader = WeightLoader(model)
    for name, t in tensors.items():
        piece = loader.lookup(name, source)
        if piece is not None:
            loader.place(piece, t, source)
    loader.check_complete(source)


class WeightLoader:
    """Places checkpoint tensors into one rank's model and counts the pieces still needed."""

    def __init__(self, model: MoEForCausalLM, layout: Optional[CheckpointLayout] = None):
        if any(moe.shared_slots is not None for moe in model.moe_layers()):
            raise CheckpointError("the model's shared expert is already folded into its expert slots: "
                                  "load weights before folding (ModelLoadConfig(fold_shared_expert=False) "
                                  "keeps it a module of its own)")
        self.model, self.spec, self.parallel = model, model.spec, model.parallel
        self.layout = layout or layout_of(model.spec)
        self.params = dict(model.named_parameters())
        pieces = self.layout.pieces(self.spec)
        _check_covers(self.params, pieces)
        self.known = {p.name: p for p in pieces + self.layout.packed_pieces(self.spec)}
        self.needed = [p for p in pieces if self._held_here(p)]
        self.filled: set[PieceKey] = set()  # Piece.key of every piece placed

    def _held_here(self, piece: Piece) -> bool:
        return piece.expert is None or expert_slot(piece.expert, self.spec, self.parallel) is not None

    def lookup(self, name: str, where: Where) -> Optional[Piece]:
        """The piece checkpoint tensor `name` fills on this rank; None for a tensor to skip.

        A tensor the model has no place for means config.json describes another model than
        the checkpoint holds (a bias, q/k norm or expert count it lacks), so it is an error,
        except the few that every model rebuilds itself (`CheckpointLayout.harmless`)."""
        piece = self.known.get(self.layout.canonical(name))
        if piece is None:
            if self.layout.harmless(name, self.spec):
                log.debug("skipping checkpoint tensor %s in %s", name, where)
                return None
            raise CheckpointError(f"checkpoint tensor {name} in {where} has no place in the model "
                                  f"({self.spec.architecture} as config.json describes it)")
        return piece if self._held_here(piece) else None

    def check_shape(self, piece: Piece, shape: tuple[int, ...], where: Where) -> None:
        want = self.expected_shape(piece)
        if shape != want:
            raise CheckpointError(f"checkpoint tensor {piece.name} in {where} has shape {shape}, "
                                  f"the model expects {want}")

    def place(self, piece: Piece, t: torch.Tensor, where: Where) -> None:
        """Copy this rank's part of the whole checkpoint tensor `t` into the model."""
        self.check_shape(piece, tuple(t.shape), where)
        if piece.key in self.filled:
            log.warning("checkpoint tensor %s appears twice; the one in %s is kept", piece.name, where)
        PART_LOADERS[piece.part](self.params[piece.param], piece, t, self)
        self.filled.update(self._keys_filled(piece))

    def _keys_filled(self, piece: Piece) -> Iterator[PieceKey]:
        covers = PACKED_COVERS.get(piece.part)
        if covers is None:
            yield piece.key
            return
        lo, n = self.parallel.expert_range(self.spec.num_experts)
        yield from ((piece.param, part, e) for e in range(lo, lo + n) for part in covers)

    def check_complete(self, where: str) -> None:
        missing = [p for p in self.needed if p.key not in self.filled]
        if missing:
            more = f" (and {len(missing) - 1} more pieces)" if len(missing) > 1 else ""
            raise CheckpointError(f"{missing[0].name} is missing from {where}{more}")

    def expected_shape(self, piece: Piece) -> tuple[int, ...]:
        """Shape of the checkpoint tensor of `piece` (whole, as one process holds it)."""
        full = full_shape(self.model, piece.param, self.params[piece.param])
        return PART_SHAPES[piece.part](full, self.spec)


def _check_covers(params: dict, pieces: list[Piece]) -> None:
    """Every parameter of the model is filled by some rule of the family's layout."""
    uncovered = set(params) - {p.param for p in pieces}
    if uncovered:
        raise RuntimeError(f"no rule of the checkpoint layout fills parameters {sorted(uncovered)}")


# full shape of the checkpoint tensor of each part, from the full parameter shape
PART_SHAPES: dict[Part, Callable[[tuple[int, ...], MoESpec], tuple[int, ...]]] = {
    Part.WHOLE: lambda full, s: full,
    Part.Q: lambda full, s: (s.q_size, *full[1:]),
    Part.K: lambda full, s: (s.kv_size, *full[1:]),
    Part.V: lambda full, s: (s.kv_size, *full[1:]),
    Part.GATE: lambda full, s: (full[0] // 2, *full[1:]),  # gate_up_proj [2I, D]
    Part.UP: lambda full, s: (full[0] // 2, *full[1:]),
    Part.EXPERT_GATE: lambda full, s: (full[1] // 2, full[2]),  # w13 [S, 2I, D]
    Part.EXPERT_UP: lambda full, s: (full[1] // 2, full[2]),
    Part.EXPERT_DOWN: lambda full, s: full[1:],  # w2 [S, D, I]
    Part.EXPERTS_GATE_UP: lambda full, s: (s.num_experts, *full[1:]),
    Part.EXPERTS_DOWN: lambda full, s: (s.num_experts, *full[1:]),
}


def _load_whole(param: torch.Tensor, piece: Piece, t: torch.Tensor, w: WeightLoader) -> None:
    param.copy_(local_part(piece.param, t, w.spec, w.parallel))


def _load_qkv(param: torch.Tensor, piece: Piece, t: torch.Tensor, w: WeightLoader) -> None:
    lo, rows = qkv_piece(piece.part.value, t, w.spec, w.parallel)
    param[lo:lo + rows.shape[0]].copy_(rows)


def _load_gate_up(param: torch.Tensor, piece: Piece, t: torch.Tensor, w: WeightLoader) -> None:
    half = param.shape[0] // 2  # this rank's width
    lo = 0 if piece.part is Part.GATE else half
    param[lo:lo + half].copy_(shard_dim(t, w.parallel, 0, "MLP intermediate size"))


_EXPERT_PROJ = {Part.EXPERT_GATE: "gate_proj", Part.EXPERT_UP: "up_proj", Part.EXPERT_DOWN: "down_proj"}


def _load_expert(param: torch.Tensor, piece: Piece, t: torch.Tensor, w: WeightLoader) -> None:
    slot = expert_slot(piece.expert, w.spec, w.parallel)
    t = expert_piece(_EXPERT_PROJ[piece.part], t, w.parallel)
    if piece.part is Part.EXPERT_DOWN:
        param[slot].copy_(t)
        return
    inter = t.shape[0]  # this rank's width
    lo = 0 if piece.part is Part.EXPERT_GATE else inter
    param[slot, lo:lo + inter].copy_(t)


def _load_packed_experts(param: torch.Tensor, piece: Piece, t: torch.Tensor, w: WeightLoader) -> None:
    t = local_part(piece.param, t, w.spec, w.parallel)  # routed experts only: united slots stay
    param[:t.shape[0]].copy_(t)


# the weight loader of each part: (parameter, piece, checkpoint tensor, loader) -> None
PART_LOADERS: dict[Part, Callable[[torch.Tensor, Piece, torch.Tensor, WeightLoader], None]] = {
    Part.WHOLE: _load_whole,
    Part.Q: _load_qkv, Part.K: _load_qkv, Part.V: _load_qkv,
    Part.GATE: _load_gate_up, Part.UP: _load_gate_up,
    Part.EXPERT_GATE: _load_expert, Part.EXPERT_UP: _load_expert, Part.EXPERT_DOWN: _load_expert,
    Part.EXPERTS_GATE_UP: _load_packed_experts, Part.EXPERTS_DOWN: _load_packed_experts,
}


@torch.no_grad()
def init_dummy(model: MoEForCausalLM, seed: int) -> None:
    """Random weights (norms one); under tensor parallelism each full tensor is drawn and
    split, so every rank's part equals the one-process model's."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif model.parallel.active:  # draw the full tensor, keep this rank's part
            full = torch.empty(full_shape(model, name, p), dtype=p.dtype, device=p.device)
            full.normal_(0.0, DUMMY_STD, generator=gen)
            p.copy_(local_part(name, full, model.spec, model.parallel))
        else:
            p.normal_(0.0, DUMMY_STD, generator=gen)


def full_shape(model: MoEForCausalLM, name: str, p: torch.Tensor) -> tuple[int, ...]:
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
