"""Build united experts for every MoE layer of a loaded model (SPEC 1.2), one layer at a time.

Per layer: capture calibration states (if any; each token labelled with its calibration
source; the layers' captures make one pass over the decoder stack, see
calibration.StackCapture), group the experts, build one united expert per group with the
chosen method (with distill, the groups of a layer are fitted together in one stacked
optimisation, in as few runs of consecutive groups as the memory budget allows), measure each
group's fit error on calibration tokens of sources left out of its fit (a random held-out
split where a group saw one source), then drop the layer's states before the next layer.
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
from brownout.unite.calibration import CalibrationMix, LayerStates, StackCapture, group_targets
from brownout.unite.distill import distill_groups, held_out_error, make_folds
from brownout.unite.options import DistillConfig
from brownout.unite.sources import HELD_OUT_FRACTION, SourceSpec
from brownout.unite.store import FORMAT_VERSION, config_sha256, model_shapes

log = logging.getLogger(__name__)

METHODS = ("average", "frequency", "distill")
GROUPINGS = ("contiguous", "similarity")
FLOAT_BYTES = 4  # fits run in float32
# float32 copies of each distilled model's weights alive during a step: the weights, their
# gradient, Adam's two moments, the update's temporary and the anchor's start
WEIGHT_COPIES = 6
# share of the device memory free when a layer's fits start that the groups distilled together
# may take: the estimate leaves out the allocator's fragmentation and small temporaries
STACK_FREE_SHARE = 0.5
# bytes the groups distilled together may take in host memory, which also holds the model and
# the layer's captured states
STACK_BYTES_HOST = 4 * 2**30
# groups distilled together by default off the GPU: on a CPU one group's tensors stay in its
# caches, while a stack of them runs its elementwise work several times slower per element
HOST_GROUP_BATCH = 1


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
    # groups distilled together at most (None: as many as the memory budget takes); the fits
    # are the same whatever it is, to floating-point rounding
    distill_group_batch: Optional[int] = None
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
        if self.distill_group_batch is not None and self.distill_group_batch < 1:
            raise ValueError(f"distill_group_batch: must be >= 1, got {self.distill_group_batch}")
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


def _group_rows(states: LayerStates, group_of: torch.Tensor, max_tokens: Optional[int]) -> list[int]:
    """Calibration tokens each group is fitted on (those routed to it, capped) -> [G]."""
    groups = group_of.cpu()[states.topk_ids.long()]  # [N, k]
    hit = torch.zeros(groups.shape[0], int(group_of.max()) + 1, dtype=torch.bool)
    hit.scatter_(1, groups, True)
    rows = hit.sum(0).tolist()
    return [min(n, max_tokens) if max_tokens is not None else n for n in rows]


def _group_bytes(rows: int, models: int, dim: int, inter: int, cfg: DistillConfig) -> int:
    """Upper estimate of the memory one group takes while it is distilled with others."""
    data = rows * (2 * dim + 2) * FLOAT_BYTES * 2  # x, target, weight, source; twice while joined
    val = min(rows, (models - 1) * cfg.max_val_tokens) * (2 * dim + 1) * FLOAT_BYTES * 2
    index = models * rows * 8 * 2  # each model's training rows, and their targets' norms
    weights = models * WEIGHT_COPIES * 3 * inter * dim * FLOAT_BYTES
    step = models * min(cfg.batch_tokens, rows) * (4 * dim + 6 * inter) * FLOAT_BYTES
    return data + val + index + weights + step


def _stack_budget(device: torch.device) -> int:
    """Bytes the groups distilled together may take on `device`."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * STACK_FREE_SHARE)
    return STACK_BYTES_HOST


def _chunks(opts: UniteOptions, states: LayerStates, group_of, dim: int, inter: int,
            device) -> list[list[int]]:
    """Groups distilled together: consecutive runs within the memory budget (and within
    opts.distill_group_batch groups where that is set), at least one group each."""
    G = int(group_of.max()) + 1
    if opts.method != "distill":
        return [[g] for g in range(G)]
    cfg = opts.distill
    sources = 1 if states.source is None else int(states.source.unique().numel())
    folds = max(sources if cfg.validation == "sources" else 1, 1)
    models = (min(folds, cfg.max_folds) if cfg.max_folds else folds) + 1
    default = G if device.type == "cuda" else HOST_GROUP_BATCH
    budget, cap = _stack_budget(device), opts.distill_group_batch or default
    chunks, used = [[]], 0
    for g, rows in enumerate(_group_rows(states, group_of, opts.max_group_tokens)):
        need = _group_bytes(rows, models, dim, inter, cfg)
        if chunks[-1] and (used + need > budget or len(chunks[-1]) >= cap):
            chunks.append([])
            used = 0
        chunks[-1].append(g)
        used += need
    return chunks


def _fit_groups(opts: UniteOptions, inits: list, datas: list, counts, members: list, seeds: list[int],
                on_done) -> list:
    """Distil (if asked) the united experts of some groups together -> [fit report entry]."""
    folds = [make_folds(d, opts.distill, s) for d, s in zip(datas, seeds)]
    entries = []
    for data, f, m, init in zip(datas, folds, members, inits):
        entries.append({"tokens": int(data.x.shape[0]), "assignments": int(counts[m].sum()),
                        "validation": "sources" if f and f[0].held_out_source is not None else "random",
                        "error_before": held_out_error(*init, f)})
    finals = [(*init, None) for init in inits]
    if opts.method == "distill":
        finals = distill_groups(inits, datas, folds, opts.distill, seeds, on_done=on_done)
    else:
        for g in range(len(inits)):
            on_done(g)
    for entry, (w13, w2, info), data, f in zip(entries, finals, datas, folds):
        if info is not None:
            entry.update(info)
        entry["error_after"] = held_out_error(w13, w2, f)
        entry["error_in_sample"] = methods.fit_error(w13, w2, data)
        entry["w"] = (w13, w2)
    return entries


def build_layer(moe, states: Optional[LayerStates], opts: UniteOptions, layer: int, progress=None):
    """United experts of one layer -> (w13_u [G, 2I, D], w2_u [G, D, I], group_of [E], report)."""
    E = moe.num_experts
    w13 = moe.w13[:E].detach().float()  # [E, 2I, D]
    w2 = moe.w2[:E].detach().float()  # [E, D, I]
    sim = _affinity(states, w13, w2, opts.similarity_sample, opts.seed + layer) \
        if opts.grouping == "similarity" else None
    group_of = grouping.make_groups(opts.grouping, E, opts.way, sim)  # [E]
    counts = states.counts(E) if states is not None else None
    groups = grouping.groups_from_map(group_of)
    inits = [_start(opts, w13, w2, members, counts) for members in groups]
    united = list(inits)
    report = [{"group": g, "members": members} for g, members in enumerate(groups)]
    done = (lambda g: progress.update(1)) if progress is not None else (lambda g: None)  # noqa: E731
    if states is None:
        for g in range(len(groups)):
            done(g)
        return torch.stack([u[0] for u in united]), torch.stack([u[1] for u in united]), group_of, report
    for chunk in _chunks(opts, states, group_of, w13.shape[2], w2.shape[2], w13.device):
        datas = [methods.GroupData(*group_targets(
            states, groups[g], E, lambda e, x: methods.expert_forward(w13[e], w2[e], x),
            opts.max_group_tokens, w13.device)) for g in chunk]
        seeds = [opts.seed * 1000 + layer * 100 + g for g in chunk]
        entries = _fit_groups(opts, [inits[g] for g in chunk], datas, counts, [groups[g] for g in chunk],
                              seeds, lambda i: done(chunk[i]))
        for g, entry in zip(chunk, entries):
            united[g] = entry.pop("w")
            report[g].update(entry)
        del datas  # one chunk's calibration rows in memory at a time
    return torch.stack([u[0] for u in united]), torch.stack([u[1] for u in united]), group_of, report


def build_united(loaded, opts: UniteOptions, mix: Optional[CalibrationMix], progress_factory=None):
    """All MoE layers -> (tensors for united.safetensors, manifest)."""
    model, spec = loaded.model, loaded.spec
    layers = list(zip(spec.moe_layers, model.moe_layers()))
    save_dtype = opts.save_dtype or layers[0][1].w13.dtype
    groups_per_layer = math.ceil(spec.num_experts / opts.way)
    progress = progress_factory(total=len(layers) * groups_per_layer) if progress_factory else None
    tensors, grouping_map, fit = {}, {}, {}
    capture = None if mix is None else StackCapture(model, mix.windows, opts.batch_tokens,
                                                    loaded.device, opts.capture_tau)
    for i, (layer, moe) in enumerate(layers):
        states = None
        if capture is not None:
            states = capture.states(i)  # with capture_tau: after layer i - 1's install below
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
    del capture  # the carried hidden states
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
