"""Build united experts for every MoE layer of a loaded model (SPEC 1.2), one layer at a time.

Per layer: capture calibration states (if any; each token labelled with its calibration
source), group the experts, build one united expert per group with the chosen method,
measure each group's fit error on calibration tokens of sources left out of its fit (a
random held-out split where a group saw one source), then drop the layer's states before
the next layer.
"""

from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from brownout.unite import grouping, methods
from brownout.unite.calibration import CalibrationMix, LayerStates, capture_layer, group_targets
from brownout.unite.distill import distill, held_out_error, make_folds
from brownout.unite.options import DistillConfig
from brownout.unite.sources import HELD_OUT_FRACTION, SourceSpec
from brownout.unite.store import FORMAT_VERSION, config_sha256, model_shapes

log = logging.getLogger(__name__)

METHODS = ("average", "frequency", "distill")
GROUPINGS = ("contiguous", "similarity")


@dataclass
class UniteOptions:
    way: int
    grouping: str = "contiguous"
    method: str = "average"
    seed: int = 0
    calibration: Sequence[SourceSpec] = ()  # sources of the calibration mix
    calibration_tokens: int = 65536  # over all sources, split by their weights
    calibration_part: str = "fit"  # the part of each source taken (sources.PARTS)
    seq_len: int = 512
    batch_tokens: int = 2048
    similarity_sample: int = 256  # routed states per expert on which outputs are compared
    max_group_tokens: Optional[int] = 131072  # calibration tokens per group kept for fitting
    distill: DistillConfig = field(default_factory=DistillConfig)
    save_dtype: Optional[torch.dtype] = None  # None: the model's expert dtype
    # None: every layer is fitted on the exact model's states. A tau: each layer's united
    # experts are installed once built, and the next layer is fitted on the states it sees
    # when the layers before it run at this tau (what serving at that tau feeds it)
    capture_tau: Optional[float] = None

    def __post_init__(self) -> None:
        if self.way < 2:
            raise ValueError(f"way: must be >= 2, got {self.way}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping: must be one of {'|'.join(GROUPINGS)}, got {self.grouping!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {'|'.join(METHODS)}, got {self.method!r}")
        if self.capture_tau is not None and not 0.0 <= self.capture_tau <= 1.0:
            raise ValueError(f"capture_tau: must be in [0, 1], got {self.capture_tau}")
        needs_data = self.grouping == "similarity" or self.method != "average"
        if needs_data and not self.calibration:
            raise ValueError(f"calibration: grouping {self.grouping!r} with method {self.method!r} "
                             "needs calibration text (--calibration FILE)")


def _affinity(states: LayerStates, w13, w2, per_expert: int, seed: int) -> torch.Tensor:
    """Load-weighted merge affinity of every pair of experts (see grouping) -> [E, E]."""
    E = w13.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = states.topk_ids.long()  # [N, k]
    rows, owner = [], []
    for e in range(E):  # a sample of the states routed to each expert
        mine = (ids == e).any(dim=1).nonzero().flatten()
        mine = mine[torch.randperm(mine.numel(), generator=gen)[:per_expert]]
        rows.append(mine)
        owner.append(torch.full((mine.numel(),), e, dtype=torch.long))
    x = states.x[torch.cat(rows)].to(w13.device)  # [n, D]
    outputs = torch.stack([methods.expert_forward(w13[e], w2[e], x) for e in range(E)]).cpu()
    distance = grouping.routed_distance(outputs, torch.cat(owner), E)  # [E, E]
    return grouping.merge_affinity(distance, states.counts(E))


def _start(opts: UniteOptions, w13, w2, members, counts):
    """The method's starting point: uniform or count-weighted mean of the members."""
    kind = opts.distill.start if opts.method == "distill" else opts.method
    if kind == "average" or counts is None:
        return methods.average(w13, w2, members)
    return methods.frequency(w13, w2, members, counts)


def _fit_group(opts: UniteOptions, init, data: methods.GroupData, counts, members, seed: int):
    """Distil (if asked) one group's united expert -> (w13, w2, fit report entry)."""
    folds = make_folds(data, opts.distill, seed)
    entry = {"tokens": int(data.x.shape[0]), "assignments": int(counts[members].sum()),
             "validation": "sources" if folds and folds[0].held_out_source is not None else "random",
             "error_before": held_out_error(*init, folds)}
    final = init
    if opts.method == "distill":
        *final, info = distill(*init, data, folds, opts.distill, seed)
        entry.update(info)
    entry["error_after"] = held_out_error(*final, folds)
    entry["error_in_sample"] = methods.fit_error(*final, data)
    return final[0], final[1], entry


def build_layer(moe, states: Optional[LayerStates], opts: UniteOptions, layer: int, progress=None):
    """United experts of one layer -> (w13_u [G, 2I, D], w2_u [G, D, I], group_of [E], report)."""
    E = moe.num_experts
    w13 = moe.w13[:E].detach().float()  # [E, 2I, D]
    w2 = moe.w2[:E].detach().float()  # [E, D, I]
    sim = _affinity(states, w13, w2, opts.similarity_sample, opts.seed + layer) \
        if opts.grouping == "similarity" else None
    group_of = grouping.make_groups(opts.grouping, E, opts.way, sim)  # [E]
    counts = states.counts(E) if states is not None else None
    united13, united2, report = [], [], []
    for g, members in enumerate(grouping.groups_from_map(group_of)):
        init = _start(opts, w13, w2, members, counts)
        final, entry = init, {"group": g, "members": members}
        if states is not None:
            data = methods.GroupData(*group_targets(
                states, members, E, lambda e, x: methods.expert_forward(w13[e], w2[e], x),
                opts.max_group_tokens, w13.device))
            *final, fit = _fit_group(opts, init, data, counts, members,
                                     opts.seed * 1000 + layer * 100 + g)
            entry.update(fit)
        united13.append(final[0])
        united2.append(final[1])
        report.append(entry)
        if progress is not None:
            progress.update(1)
    return torch.stack(united13), torch.stack(united2), group_of, report


def build_united(loaded, opts: UniteOptions, mix: Optional[CalibrationMix], progress_factory=None):
    """All MoE layers -> (tensors for united.safetensors, manifest)."""
    model, spec = loaded.model, loaded.spec
    layers = list(zip(spec.moe_layers, model.moe_layers()))
    save_dtype = opts.save_dtype or layers[0][1].w13.dtype
    groups_per_layer = math.ceil(spec.num_experts / opts.way)
    progress = progress_factory(total=len(layers) * groups_per_layer) if progress_factory else None
    tensors, grouping_map, fit = {}, {}, {}
    for i, (layer, moe) in enumerate(layers):
        states = None
        if mix is not None:
            states = capture_layer(model, i, mix.windows, opts.batch_tokens, loaded.device,
                                   opts.capture_tau)
            states.source = mix.token_sources()
        if progress is not None:
            progress.set_description(f"layer {layer}")
        w13_u, w2_u, group_of, report = build_layer(moe, states, opts, layer, progress)
        del states  # one layer's calibration states in memory at a time
        if opts.capture_tau is not None:  # as served: rounded to the saved dtype
            moe.install_united(w13_u.to(save_dtype).to(moe.w13.dtype), w2_u.to(save_dtype).to(moe.w2.dtype),
                               group_of.to(moe.w13.device))
        tensors[f"layers.{layer}.w13"] = w13_u.to(save_dtype).cpu()
        tensors[f"layers.{layer}.w2"] = w2_u.to(save_dtype).cpu()
        tensors[f"layers.{layer}.group_of"] = group_of.cpu()
        grouping_map[str(layer)] = group_of.tolist()
        fit[str(layer)] = report
    if progress is not None:
        progress.close()
    return tensors, make_manifest(loaded, opts, mix, grouping_map, fit, save_dtype)


def make_manifest(loaded, opts: UniteOptions, mix: Optional[CalibrationMix], grouping_map, fit,
                  save_dtype) -> dict:
    model_dir = loaded.model_dir
    has_config = model_dir is not None and (Path(model_dir) / "config.json").is_file()
    calibration = None
    if mix is not None:
        calibration = {"sources": mix.sources, "tokens": int(mix.windows.numel()),
                       "seq_len": int(mix.windows.shape[1]), "part": opts.calibration_part,
                       "held_out_fraction": HELD_OUT_FRACTION,
                       "balance": "equal" if len({s.weight for s in opts.calibration}) == 1 else "weights"}
    return {
        "format_version": FORMAT_VERSION,
        "source_model": str(model_dir) if model_dir is not None else None,
        "source_config_sha256": config_sha256(Path(model_dir)) if has_config else None,
        "architecture": loaded.spec.architecture,
        "shapes": model_shapes(loaded.spec),
        "way": opts.way,
        "num_groups": math.ceil(loaded.spec.num_experts / opts.way),
        "grouping": {"kind": opts.grouping, "group_of": grouping_map},
        "method": opts.method,
        "distill": dict(vars(opts.distill)) if opts.method == "distill" else None,
        "calibration": calibration,
        "capture_tau": opts.capture_tau,
        "seed": opts.seed,
        "dtype": str(save_dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fit_error": fit,
    }
