"""This rank's part of each model tensor, from the full (single-process) tensor.

The layout is described in `brownout.parallel.info`. `local_part` maps a whole
parameter by name (dummy weights, checkpoint tensors that map onto one parameter); the
`*_piece` helpers map checkpoint tensors that fill part of a packed parameter (q/k/v into
qkv_proj, one expert's gate/up/down into w13/w2, gate and up into gate_up_proj).
With one process every function returns its input unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from brownout.parallel.info import ParallelInfo


def shard_dim(t: torch.Tensor, parallel: ParallelInfo, dim: int, what: str) -> torch.Tensor:
    """This rank's equal slice of `t` along `dim`."""
    if not parallel.active:
        return t
    lo, n = parallel.split(t.shape[dim], what)
    return t.narrow(dim, lo, n)


def shard_gate_up(t: torch.Tensor, parallel: ParallelInfo, inter: int, dim: int) -> torch.Tensor:
    """This rank's rows of a packed gate-then-up tensor ([.., 2I, ..] along `dim`)."""
    if not parallel.active:
        return t
    lo, n = parallel.split(inter, "intermediate size")
    return torch.cat([t.narrow(dim, lo, n), t.narrow(dim, inter + lo, n)], dim=dim)


def qkv_piece(proj: str, t: torch.Tensor, spec, parallel: ParallelInfo) -> tuple[int, torch.Tensor]:
    """(row offset in this rank's qkv_proj, this rank's rows) of a q/k/v_proj weight or bias."""
    h = parallel.attention_heads(spec.num_heads, spec.num_kv_heads)
    dh = spec.head_dim
    if proj == "q_proj":
        return 0, t[h.q_head0 * dh:(h.q_head0 + h.num_heads) * dh]
    rows = t[h.kv_head0 * dh:(h.kv_head0 + h.num_kv_heads) * dh]
    q_size, kv_size = h.num_heads * dh, h.num_kv_heads * dh
    return (q_size if proj == "k_proj" else q_size + kv_size), rows


def _qkv_full(full: torch.Tensor, spec, parallel: ParallelInfo) -> torch.Tensor:
    q, k, v = full.split([spec.q_size, spec.kv_size, spec.kv_size], dim=0)
    return torch.cat([qkv_piece(p, x, spec, parallel)[1] for p, x in
                      (("q_proj", q), ("k_proj", k), ("v_proj", v))], dim=0)


def expert_slot(e: int, spec, parallel: ParallelInfo) -> Optional[int]:
    """Local slot of routed expert e, or None when another rank holds it (expert parallel)."""
    lo, n = parallel.expert_range(spec.num_experts)
    return e - lo if lo <= e < lo + n else None


def expert_piece(proj: str, t: torch.Tensor, parallel: ParallelInfo) -> torch.Tensor:
    """One expert's gate/up [I, D] or down [D, I], split along I unless expert parallel."""
    if parallel.ep:
        return t
    return shard_dim(t, parallel, 1 if proj == "down_proj" else 0, "expert intermediate size")


def local_part(name: str, full: torch.Tensor, spec, parallel: ParallelInfo) -> torch.Tensor:
    """This rank's part of the full parameter `name` (a name of `MoEForCausalLM`)."""
    if not parallel.active:
        return full
    if name.endswith(("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias")):
        return _qkv_full(full, spec, parallel)
    if name.endswith("self_attn.o_proj.weight"):
        h = parallel.attention_heads(spec.num_heads, spec.num_kv_heads)
        return full[:, h.q_head0 * spec.head_dim:(h.q_head0 + h.num_heads) * spec.head_dim]
    if name.endswith("gate_up_proj.weight"):  # dense MLP and shared expert, [2I, D]
        return shard_gate_up(full, parallel, full.shape[0] // 2, dim=0)
    if name.endswith("down_proj.weight"):  # [D, I]
        return shard_dim(full, parallel, 1, "MLP intermediate size")
    if name.endswith((".w13", ".w2")):
        if parallel.ep:  # routed experts of this rank (united slots come at install)
            lo, n = parallel.expert_range(spec.num_experts)
            return full[lo:lo + n]
        if name.endswith(".w13"):  # [S, 2I, D]
            return shard_gate_up(full, parallel, full.shape[1] // 2, dim=1)
        return shard_dim(full, parallel, 2, "expert intermediate size")  # [S, D, I]
    return full  # replicated
