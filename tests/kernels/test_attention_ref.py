"""The CPU attention's batched decode path equals its per-sequence path."""

import torch

from brownout.kernels.attention_ref import paged_attention_ref


def test_batched_decode_equals_per_sequence_loop():
    g = torch.Generator().manual_seed(0)
    n_blocks, bs, hq, hkv, dh = 40, 4, 8, 2, 16
    k_cache = torch.randn(n_blocks, bs, hkv, dh, generator=g, dtype=torch.float64)
    v_cache = torch.randn(n_blocks, bs, hkv, dh, generator=g, dtype=torch.float64)
    seq_lens = [1, 7, 13, 4, 16]
    perm = torch.randperm(n_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in seq_lens:
        nb = -(-n // bs)
        tables.append(perm[used:used + nb])
        used += nb
    q = torch.randn(len(seq_lens), hq, dh, generator=g, dtype=torch.float64)
    batched = paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, [1] * len(seq_lens), 0.25)
    looped = torch.cat([paged_attention_ref(q[i:i + 1], k_cache, v_cache, [t], [n], [1], 0.25)
                        for i, (t, n) in enumerate(zip(tables, seq_lens))])
    assert torch.allclose(batched, looped, atol=1e-12)
