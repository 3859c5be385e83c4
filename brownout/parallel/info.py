"""Rank and world of one process of a parallel engine, how each layer is split, and the
collectives the model needs.

The model code reads only a `ParallelInfo`; with the default `SINGLE` (one process) every
split is the whole and every collective is a no-op, so the single-process path is unchanged.

What is replicated and what is sharded over `world_size` ranks (tensor parallel size N):
- replicated: token embedding, final norm, lm_head, all RMSNorms, rotary tables, the MoE
  router and the shared-expert gate (each rank holds the full tensor);
- attention: q heads split by rank, kv heads split too (or, when N is a multiple of the kv
  head count, each kv head replicated on the N / kv_heads ranks that share it); qkv_proj is
  column parallel, o_proj row parallel; each rank's KV cache holds only its kv heads;
- dense SwiGLU (dense layers and the shared expert): gate/up column parallel and down row
  parallel along the intermediate dimension;
- routed experts: without expert parallelism, split along the intermediate dimension like a
  dense SwiGLU; with it, whole experts are split by rank in contiguous ranges of ids (see
  `brownout.parallel.experts`).
Each sharded sublayer returns this rank's partial sum; the decoder layer all-reduces it
once after attention and once after the MLP / MoE block, so hidden states are replicated
(bit-identical on every rank) between sublayers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


def expert_bounds(num_experts: int, world_size: int) -> list[int]:
    """Rank r holds routed experts [bounds[r], bounds[r + 1]): contiguous, sizes differ by <= 1."""
    return [num_experts * r // world_size for r in range(world_size + 1)]


@dataclass(frozen=True)
class AttentionShard:
    """This rank's heads: q heads [q_head0, q_head0 + num_heads), kv likewise."""

    q_head0: int
    num_heads: int
    kv_head0: int
    num_kv_heads: int


@dataclass(frozen=True)
class ParallelInfo:
    rank: int = 0
    world_size: int = 1  # tensor parallel size
    expert_parallel: bool = False  # whole routed experts split by rank (only with world_size > 1)
    group: Optional[Any] = None  # process group of the model's collectives (None: the default)
    cpu_group: Optional[Any] = None  # gloo group for host-side values (control messages, ints)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def ep(self) -> bool:
        return self.expert_parallel and self.world_size > 1

    def split(self, n: int, what: str) -> tuple[int, int]:
        """(start, size) of this rank's equal share of a dimension of length n."""
        if n % self.world_size:
            raise ValueError(f"tensor_parallel_size: {self.world_size} must divide the {what} ({n})")
        size = n // self.world_size
        return self.rank * size, size

    def attention_heads(self, num_heads: int, num_kv_heads: int) -> AttentionShard:
        ws = self.world_size
        q0, nq = self.split(num_heads, "number of attention heads")
        if num_kv_heads % ws == 0:
            nkv = num_kv_heads // ws
            return AttentionShard(q0, nq, self.rank * nkv, nkv)
        if ws % num_kv_heads == 0:  # fewer kv heads than ranks: each is replicated
            return AttentionShard(q0, nq, self.rank // (ws // num_kv_heads), 1)
        raise ValueError(f"tensor_parallel_size: {ws} must divide the number of kv heads "
                         f"({num_kv_heads}) or be a multiple of it")

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """(first id, count) of the routed experts this rank holds under expert parallelism."""
        if not self.ep:
            return 0, num_experts
        if num_experts < self.world_size:
            raise ValueError(f"tensor_parallel_size: {self.world_size} ranks need at least as many "
                             f"routed experts, the model has {num_experts}")
        bounds = expert_bounds(num_experts, self.world_size)
        return bounds[self.rank], bounds[self.rank + 1] - bounds[self.rank]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over ranks, in place (identity in one process)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def min_over_ranks(self, value: int) -> int:
        """Smallest of an integer over ranks (e.g. KV blocks that fit every rank's memory)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


SINGLE = ParallelInfo()


def check_split(spec, parallel: ParallelInfo) -> None:
    """Raise ValueError naming tensor_parallel_size when `spec` cannot be split this way."""
    parallel.attention_heads(spec.num_heads, spec.num_kv_heads)
    widths = [(spec.shared_expert_intermediate_size, "shared expert intermediate size"),
              (spec.dense_intermediate_size if spec.dense_layers else 0, "MLP intermediate size")]
    if not parallel.ep:
        widths.append((spec.moe_intermediate_size, "expert intermediate size"))
    for n, what in widths:
        if n:
            parallel.split(n, what)
    parallel.expert_range(spec.num_experts)
