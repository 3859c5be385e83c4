"""Plain-torch attention over a paged KV cache: the CPU path and the kernels' reference.

The cache of one layer is a pair of tensors [num_blocks, block_size, Hkv, Dh]. A token at
position p of a sequence lives in block `block_table[p // block_size]` at offset
`p % block_size`; `slot = block * block_size + offset` flattens that (slot -1: padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_ref(
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [N, B, Hkv, Dh]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = padding
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, Dh] all sequences' new tokens, concatenated
    k_cache: torch.Tensor,  # [N, B, Hkv, Dh]
    v_cache: torch.Tensor,
    block_tables: list[list[int]],  # per sequence
    seq_lens: list[int],  # per sequence: context length including this step's tokens
    query_lens: list[int],  # per sequence: tokens of this step
    scale: float,
) -> torch.Tensor:  # [T, Hq, Dh]
    if all(n == 1 for n in query_lens) and len(query_lens) > 1:
        return _decode_batched(q, k_cache, v_cache, block_tables, seq_lens, scale)
    block_size = k_cache.shape[1]
    hq, hkv = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens):
        n_blocks = -(-seq_len // block_size)
        blocks = torch.tensor(table[:n_blocks], dtype=torch.long, device=q.device)
        keys = k_cache[blocks].reshape(-1, hkv, k_cache.shape[-1])[:seq_len]  # [S, Hkv, Dh]
        vals = v_cache[blocks].reshape(-1, hkv, v_cache.shape[-1])[:seq_len]
        if hq != hkv:
            keys = keys.repeat_interleave(hq // hkv, dim=1)
            vals = vals.repeat_interleave(hq // hkv, dim=1)
        qs = q[start:start + q_len].transpose(0, 1)  # [Hq, q_len, Dh]
        # query i sits at position seq_len - q_len + i and sees keys up to that position
        pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= pos_q  # [q_len, S]
        o = F.scaled_dot_product_attention(
            qs, keys.transpose(0, 1).to(q.dtype), vals.transpose(0, 1).to(q.dtype),
            attn_mask=mask, scale=scale)
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def _decode_batched(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """One token per sequence: gather every context padded to the longest and run one
    masked attention, instead of a handful of ops per sequence (the CPU's decode steps
    are otherwise dominated by per-op overhead)."""
    B, block_size, hq, hkv = len(seq_lens), k_cache.shape[1], q.shape[1], k_cache.shape[2]
    n_blocks = -(-max(seq_lens) // block_size)
    table = torch.tensor([t[:n_blocks] + [0] * (n_blocks - min(len(t), n_blocks)) for t in block_tables],
                         dtype=torch.long, device=q.device)  # [B, nb]
    keys = k_cache[table].flatten(1, 2)  # [B, S, Hkv, Dh], S = nb * block_size
    vals = v_cache[table].flatten(1, 2)
    lens = torch.tensor(seq_lens, device=q.device)
    mask = torch.arange(keys.shape[1], device=q.device).unsqueeze(0) < lens.unsqueeze(1)  # [B, S]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2).to(q.dtype),  # [B, Hq, 1, Dh]
        keys.transpose(1, 2).to(q.dtype), vals.transpose(1, 2).to(q.dtype),  # [B, Hkv, S, Dh]
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=hq != hkv)
    return o.squeeze(2)  # [B, Hq, Dh]
