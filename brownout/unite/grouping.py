"""Partition one layer's experts into groups of `way` (SPEC 1.2).

`contiguous`: the paper's `group(e) = e // way`. `similarity`: experts are grouped so that
one united expert can stand in for each member with the least expected error. The cost
of putting experts a and b together is how far apart their outputs are on the
calibration states routed to either of them, times the harmonic load
`c_a * c_b / (c_a + c_b)`: a count-weighted merge of a busy and a rarely used expert is
close to the busy one, so such a pair costs little even when their outputs differ, while
two busy experts must be alike to share a united expert. (Plain output similarity,
ignoring load, grouped busy experts together and was worse than contiguous groups on the
demo model.) Groups have exactly `way` members, except the last, which is smaller when
`way` does not divide `E`.
"""

from __future__ import annotations

import torch

from brownout.kernels.brownout_routing import contiguous_groups


def group_sizes(num_experts: int, way: int) -> list[int]:
    sizes = [way] * (num_experts // way)
    if num_experts % way:
        sizes.append(num_experts % way)
    return sizes


def routed_distance(outputs: torch.Tensor, owner: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mean squared output distance of each pair of experts on the states routed to either.

    outputs [E, n, D]: every expert's output on n calibration states; owner [n]: the
    expert each state was sampled for. Returns d [E, E], relative to the mean output norm.
    """
    out = outputs.double()
    scale = out.pow(2).sum(-1).mean().clamp_min(1e-30)
    sums = torch.zeros(num_experts, num_experts, num_experts, dtype=torch.float64)  # [c, a, b]
    sizes = torch.bincount(owner, minlength=num_experts).double()  # [E]
    for c in range(num_experts):
        o = out[:, owner == c]  # [E, n_c, D]
        if o.shape[1] == 0:
            continue
        norms = o.pow(2).sum(dim=(1, 2))  # [E]
        gram = torch.einsum("and,bnd->ab", o, o)  # [E, E]
        sums[c] = norms[:, None] + norms[None, :] - 2 * gram  # sum over S_c of ||o_a - o_b||^2
    idx = torch.arange(num_experts)
    pair_sum = sums[idx[:, None], idx[:, None], idx[None, :]] + sums[idx[None, :], idx[:, None], idx[None, :]]
    pair_n = (sizes[:, None] + sizes[None, :]).clamp_min(1)
    return (pair_sum / pair_n / scale).clamp_min(0)


def merge_affinity(distance: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Affinity (higher = better together) = -distance * harmonic load of the pair."""
    c = counts.double()
    harmonic = c[:, None] * c[None, :] / (c[:, None] + c[None, :]).clamp_min(1e-9)
    return -(distance.double() * harmonic)


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
    """Balanced clustering maximising within-group affinity `sim` [E, E] -> group_of [E].

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
