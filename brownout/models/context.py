"""What one forward pass needs besides the tokens (attention metadata, KV caches,
brownout) and what it gives back (hidden states, expert slots touched).

Built by the runner for every step (or captured once per CUDA-graph bucket with persistent
tensors). The model reads it; it never reaches back into the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch


@dataclass
class AttnMeta:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token, -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    query_start_loc: torch.Tensor  # [B+1] int32: row offsets of each sequence's tokens
    max_query_len: int
    # host copies, read only by the plain-torch path
    block_tables_list: list[list[int]] = field(default_factory=list)
    seq_lens_list: list[int] = field(default_factory=list)
    query_lens_list: list[int] = field(default_factory=list)


class SlotOutputs(NamedTuple):
    """A MoE layer's output before the sum over each token's assignments: y [T*k, D] (weighted
    expert outputs, rows of id < 0 unused), ids [T, k]. `total()` sums them; the next norm
    (`RMSNorm.add_forward`) sums them in its own launch."""

    y: torch.Tensor
    ids: torch.Tensor

    def total(self) -> torch.Tensor:
        from brownout.kernels.fused_moe import moe_sum  # lazy: triton; only the kernel path defers

        return moe_sum(self.y, self.ids)


@dataclass
class ForwardContext:
    attn: Optional[AttnMeta] = None  # None: plain causal attention over [B, L] (no cache)
    kv_caches: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # per layer
    tau: Optional[torch.Tensor] = None  # 0-d float32; None: brownout off
    # 0-d int32: routed experts kept per token (k' <= k, expert shedding); None: the model's k
    top_k: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None  # [T] bool: False on CUDA-graph padding rows
    # [T] bool: tokens that keep the model's top-k experts, unshed and not redirected, while
    # the step is dimmed or shed (a class exempt from dimming); None: none
    exempt: Optional[torch.Tensor] = None
    count_touched: bool = True  # MoE layers count the distinct expert slots they use
    # MoE layers may hand their per-assignment outputs on unsummed (`SlotOutputs`), for the
    # next norm to sum in its own launch; only the single-device CUDA step paths set it
    defer_moe_sum: bool = False
    use_kernels: bool = False  # Triton kernels (GPU) instead of the plain-torch path


class ForwardOutput(NamedTuple):
    hidden: torch.Tensor  # [T, D] (paged) or [B, L, D] (full): final hidden states
    # [M] int64, one per MoE layer: distinct expert slots its tokens went to; None when
    # the context does not count them or the model has no MoE layer
    experts_touched: Optional[torch.Tensor]
