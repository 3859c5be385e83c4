"""Where each expert slot lives under expert parallelism (EP).

Routed expert e lives on the rank whose contiguous id range holds it (`expert_bounds`).
United expert g (global slot E + g, SPEC 1.2) lives on the rank that holds most of group
g's members (ties: the lower rank), so that redirected assignments mostly stay where their
experts were; with contiguous grouping and ranges that split on group boundaries this is
the rank of every member. The slot table maps each global slot to (rank, local slot): a
rank's local slots are its routed experts in id order, then the united experts it holds in
group order.

Every rank computes the router and brownout routing for all tokens (identical on every
rank, so counts are over the whole batch), keeps only the assignments whose slot is local
(`localize`: the others become id -1, which the expert kernels skip) and the partial
outputs are summed by the decoder layer's all-reduce. An all-to-all dispatch would move
less data at large batch (each token's hidden state only to the ranks of its experts);
at decode batch sizes the all-reduce of [T, D] is small next to the expert weights read.
"""

from __future__ import annotations

import torch

from brownout.parallel.info import expert_bounds


def united_owner(group_of: torch.Tensor, num_groups: int, world_size: int) -> torch.Tensor:
    """Rank of each united expert's slot -> [G] int64."""
    E = group_of.shape[0]
    bounds = expert_bounds(E, world_size)
    rank_of = torch.zeros(E, dtype=torch.int64, device="cpu")
    for r in range(world_size):
        rank_of[bounds[r]:bounds[r + 1]] = r
    members = torch.zeros(world_size, num_groups, dtype=torch.int64, device="cpu")  # [R, G]
    members.index_put_((rank_of, group_of.cpu().long()), torch.ones(E, dtype=torch.int64, device="cpu"),
                       accumulate=True)  # members of group g on rank r
    return members.argmax(dim=0)  # first maximum: the lower rank on ties


def slot_table(group_of: torch.Tensor, num_groups: int, num_slots: int,
               world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank [S], local slot [S]) of every global slot; -1 for slots holding nothing."""
    E = group_of.shape[0]
    bounds = expert_bounds(E, world_size)
    rank = torch.full((num_slots,), -1, dtype=torch.int64, device="cpu")
    local = torch.full((num_slots,), -1, dtype=torch.int64, device="cpu")
    for r in range(world_size):
        lo, hi = bounds[r], bounds[r + 1]
        rank[lo:hi] = r
        local[lo:hi] = torch.arange(hi - lo, device="cpu")
    owner = united_owner(group_of, num_groups, world_size)
    for r in range(world_size):
        mine = torch.nonzero(owner == r).flatten()  # [G_r] groups held by rank r
        rank[E + mine] = r
        local[E + mine] = bounds[r + 1] - bounds[r] + torch.arange(mine.numel(), device="cpu")
    return rank, local


def local_slots(rank_of_slot: torch.Tensor, local_of_slot: torch.Tensor, rank: int) -> torch.Tensor:
    """Global slot -> this rank's local slot, or -1 where another rank holds it -> [S]."""
    return torch.where(rank_of_slot == rank, local_of_slot, torch.full_like(local_of_slot, -1))


def localize(ids: torch.Tensor, local_of: torch.Tensor) -> torch.Tensor:
    """Global slot ids [T, k] (-1 = skip) -> local slot ids, -1 where not on this rank."""
    local = local_of[ids.long().clamp(min=0)]  # [T, k]
    return torch.where(ids < 0, torch.full_like(local, -1), local).to(ids.dtype)
