#!/usr/bin/env python3
"""Distillation of a layer's groups stacked together vs one group at a time, on random data.

Builds G random groups (unequal token counts, two calibration sources each), fits them with
`distill_groups` once all together and once group by group (what `brownout unite
--distill-group-batch 1` does), and prints the wall time of each and the largest weight
difference between the two. On the CPU this is a check that the stacked path runs and agrees,
not a measure of its speed on a GPU, where it is meant to pay off.

  python3 benchmarks/bench_distill_stack.py --groups 16 --dim 128 --inter 64 --steps 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from brownout.unite.distill import distill_groups, make_folds
from brownout.unite.methods import GroupData, expert_forward
from brownout.unite.options import DistillConfig


def make_layer(groups: int, dim: int, inter: int, min_rows: int, max_rows: int, device, seed: int):
    """Random starts and group data: each group's targets from a random expert, two sources."""
    gen = torch.Generator().manual_seed(seed)
    starts, datas = [], []
    for _ in range(groups):
        w13 = torch.randn(2 * inter, dim, generator=gen) / dim ** 0.5
        w2 = torch.randn(dim, inter, generator=gen) / inter ** 0.5
        t13, t2 = w13 + 0.3 * torch.randn_like(w13), w2 + 0.3 * torch.randn_like(w2)
        n = int(torch.randint(min_rows, max_rows + 1, (1,), generator=gen))
        x = torch.randn(n, dim, generator=gen)
        weight = torch.rand(n, generator=gen)
        target = weight[:, None] * expert_forward(t13, t2, x)
        source = (torch.arange(n) * 2 // n).long()
        starts.append((w13.to(device), w2.to(device)))
        datas.append(GroupData(x.to(device), target.to(device), weight.to(device), source.to(device)))
    return starts, datas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--inter", type=int, default=64)
    p.add_argument("--min-rows", type=int, default=600)
    p.add_argument("--max-rows", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = DistillConfig(max_steps=args.steps)
    starts, datas = make_layer(args.groups, args.dim, args.inter, args.min_rows, args.max_rows, device,
                               args.seed)
    seeds = list(range(args.groups))
    folds = [make_folds(d, cfg, s) for d, s in zip(datas, seeds)]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - t

    stacked, t_stacked = timed(lambda: distill_groups(starts, datas, folds, cfg, seeds))
    alone, t_alone = timed(lambda: [distill_groups([s], [d], [f], cfg, [seed])[0]
                                    for s, d, f, seed in zip(starts, datas, folds, seeds)])
    diff = max(float((a[i] - b[i]).abs().max()) for a, b in zip(stacked, alone) for i in (0, 1))
    print(json.dumps({"args": vars(args), "device": str(device), "torch": torch.__version__,
                      "stacked_s": round(t_stacked, 3), "one_group_at_a_time_s": round(t_alone, 3),
                      "max_abs_weight_diff": diff,
                      "steps": [r[2]["steps"] for r in stacked]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
