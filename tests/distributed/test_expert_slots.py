"""Expert-parallel slot placement and per-rank tensor shards, in one process."""

import torch

from brownout.parallel.experts import local_slots, localize, slot_table, united_owner
from brownout.parallel.info import ParallelInfo, expert_bounds
from brownout.parallel.sharding import local_part, shard_gate_up
from brownout.kernels.brownout_routing import contiguous_groups


def test_expert_bounds_are_contiguous_and_balanced():
    assert expert_bounds(60, 2) == [0, 30, 60]
    assert expert_bounds(10, 4) == [0, 2, 5, 7, 10]
    assert ParallelInfo(rank=2, world_size=4, expert_parallel=True).expert_range(10) == (5, 2)
    assert ParallelInfo(rank=1, world_size=4).expert_range(10) == (0, 10)  # no EP: all


def test_contiguous_groups_stay_with_their_members():
    group_of = contiguous_groups(8, 2)  # ranks hold 0-3 and 4-7: groups 0, 1 and 2, 3
    rank, local = slot_table(group_of, 4, 12, 2)
    assert rank.tolist() == [0] * 4 + [1] * 4 + [0, 0, 1, 1]
    assert local.tolist() == [0, 1, 2, 3] * 2 + [4, 5, 4, 5]


def test_group_across_ranks_goes_to_the_majority_then_lower_rank():
    # 6 experts over 2 ranks (0-2, 3-5); groups: {0,1,3} -> rank 0, {2,4,5} -> rank 1,
    # {} unused -> rank 0 (tie), slots past G hold nothing
    group_of = torch.tensor([0, 0, 1, 0, 1, 1])
    assert united_owner(group_of, 3, 2).tolist() == [0, 1, 0]
    rank, local = slot_table(group_of, 3, 10, 2)
    assert rank.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 0, -1]
    assert local.tolist() == [0, 1, 2, 0, 1, 2, 3, 3, 4, -1]
    # every used global slot lives on exactly one rank, at a distinct local slot
    for r in range(2):
        mine = local_slots(rank, local, r)
        held = mine[mine >= 0].tolist()
        assert sorted(held) == list(range(len(held)))


def test_localize_masks_other_ranks_and_keeps_skips():
    group_of = contiguous_groups(8, 2)
    rank, local = slot_table(group_of, 4, 12, 2)
    ids = torch.tensor([[0, 5], [9, -1], [8, 11]], dtype=torch.int32)
    assert localize(ids, local_slots(rank, local, 0)).tolist() == [[0, -1], [5, -1], [4, -1]]
    assert localize(ids, local_slots(rank, local, 1)).tolist() == [[-1, 1], [-1, -1], [-1, 5]]
    assert localize(ids, local_slots(rank, local, 1)).dtype == torch.int32


class _Spec:
    num_heads, num_kv_heads, head_dim, num_experts = 4, 2, 3, 4
    q_size, kv_size = 12, 6


def _ranks(ws, ep=False):
    return [ParallelInfo(rank=r, world_size=ws, expert_parallel=ep) for r in range(ws)]


def test_qkv_and_o_proj_shards_are_the_heads_of_each_rank():
    s = _Spec()
    full = torch.arange(24.0).unsqueeze(1)  # rows: q heads 0-3, k heads 0-1, v heads 0-1
    parts = [local_part("layers.0.self_attn.qkv_proj.weight", full, s, p) for p in _ranks(2)]
    assert parts[0].flatten().tolist() == list(range(0, 6)) + list(range(12, 15)) + list(range(18, 21))
    assert parts[1].flatten().tolist() == list(range(6, 12)) + list(range(15, 18)) + list(range(21, 24))
    o = torch.arange(12.0).unsqueeze(0)  # [D=1, q]
    assert torch.cat([local_part("layers.0.self_attn.o_proj.weight", o, s, p) for p in _ranks(2)], 1).equal(o)


def test_kv_heads_replicate_when_ranks_outnumber_them():
    shards = [p.attention_heads(4, 2) for p in _ranks(4)]
    assert [(h.q_head0, h.num_heads, h.kv_head0, h.num_kv_heads) for h in shards] == \
        [(0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 1, 1), (3, 1, 1, 1)]


def test_gate_up_and_expert_shards_reassemble():
    s = _Spec()
    w13 = torch.randn(6, 8, 2)  # [S, 2I, D], I = 4
    w2 = torch.randn(6, 2, 4)
    parts = [local_part("layers.0.mlp.w13", w13, s, p) for p in _ranks(2)]
    assert parts[0].shape == (6, 4, 2)
    assert torch.cat([parts[0][:, :2], parts[1][:, :2], parts[0][:, 2:], parts[1][:, 2:]], 1).equal(w13)
    assert torch.cat([local_part("layers.0.mlp.w2", w2, s, p) for p in _ranks(2)], 2).equal(w2)
    ep = [local_part("layers.0.mlp.w13", w13, s, p) for p in _ranks(2, ep=True)]
    assert ep[0].equal(w13[:2]) and ep[1].equal(w13[2:4])  # routed experts only
    dense = torch.randn(8, 2)
    assert shard_gate_up(dense, _ranks(2)[1], 4, 0).equal(torch.cat([dense[2:4], dense[6:8]]))
