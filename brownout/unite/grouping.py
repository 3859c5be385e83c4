"""Partition one layer's experts into groups of `way` (SPEC 1.2).

`contiguous`: the paper's `group(e) = e // way`. `similarity`: experts whose outputs on
the same calibration states point the same way share a group, so one united expert can
stand in for each of them with less error. Groups have exactly `way` members, except
the last, which is smaller when `way` does not divide `E`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brownout.kernels.brownout_routing import contiguous_groups


def group_sizes(num_experts: int, way: int) -> list[int]:
    sizes = [way] * (num_experts // way)
    if num_experts % way:
        sizes.append(num_experts % way)
    return sizes


def output_similarity(outputs: torch.Tensor) -> torch.Tensor:
    """outputs [E, n, D] of every expert on the same n states -> cosine similarity [E, E]."""
    flat = F.normalize(outputs.flatten(1).double(), dim=1)  # [E, n*D]
    return flat @ flat.t()


def _within(sim: torch.Tensor, members: list[int]) -> float:
    idx = torch.tensor(members)
    return float(sim[idx][:, idx].sum() - sim[idx, idx].sum())


def _greedy(sim: torch.Tensor, sizes: list[int]) -> list[list[int]]:
    """Seed each group with the most similar free pair, grow by mean similarity."""
    free = set(range(sim.shape[0]))
    groups = []
    for size in sizes:
        cand = sorted(free)
        if size == 1 or len(cand) == 1:
            groups.append([cand[0]])
            free.discard(cand[0])
            continue
        sub = sim[cand][:, cand].clone()
        sub.fill_diagonal_(-float("inf"))
        a, b = divmod(int(torch.argmax(sub)), len(cand))
        group = [cand[a], cand[b]]
        while len(group) < size:
            rest = [e for e in cand if e not in group]
            score = sim[rest][:, group].mean(dim=1)
            group.append(rest[int(torch.argmax(score))])
        groups.append(sorted(group))
        free -= set(group)
    return groups


def _improve_by_swaps(sim: torch.Tensor, groups: list[list[int]], max_passes: int = 20) -> None:
    """Swap members across groups while that raises the total within-group similarity."""
    for _ in range(max_passes):
        improved = False
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                for a in list(groups[gi]):
                    for b in list(groups[gj]):
                        old = _within(sim, groups[gi]) + _within(sim, groups[gj])
                        ga = [b if e == a else e for e in groups[gi]]
                        gb = [a if e == b else e for e in groups[gj]]
                        if _within(sim, ga) + _within(sim, gb) > old + 1e-12:
                            groups[gi], groups[gj] = ga, gb
                            improved = True
                            break
                    else:
                        continue
                    break
        if not improved:
            return


def similarity_groups(sim: torch.Tensor, way: int) -> torch.Tensor:
    """Balanced clustering of experts by output similarity -> group_of [E] int64.

    Groups are numbered by their lowest member so the map is deterministic.
    """
    E = sim.shape[0]
    groups = _greedy(sim, group_sizes(E, way))
    _improve_by_swaps(sim, groups)
    group_of = torch.empty(E, dtype=torch.int64)
    for g, members in enumerate(sorted(groups, key=lambda m: (len(m) < way, min(m)))):
        group_of[members] = g
    return group_of


def groups_from_map(group_of: torch.Tensor) -> list[list[int]]:
    """group_of [E] -> members of each group, in group order."""
    G = int(group_of.max()) + 1
    return [sorted(torch.nonzero(group_of == g).flatten().tolist()) for g in range(G)]


def make_groups(kind: str, num_experts: int, way: int, sim: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "contiguous":
        return contiguous_groups(num_experts, way)
    if kind == "similarity":
        if sim is None:
            raise ValueError("similarity grouping needs calibration data (--calibration)")
        return similarity_groups(sim, way)
    raise ValueError(f"grouping: must be 'contiguous' or 'similarity', got {kind!r}")
