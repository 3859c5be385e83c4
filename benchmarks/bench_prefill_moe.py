"""Where a prefill-sized MoE layer spends its time with and without brownout (GPU).

One MoE layer of dummy Qwen1.5-MoE-A2.7B (bf16, 60 experts + 30 united slots, way 4
uniform-average united experts), eager as in a serving prefill step, T tokens in
{512, 2048}: the whole layer at tau = None / 1 / 0, and its parts (router top-k, brownout
routing, fused experts on plain and on remapped ids). Writes prefill_moe.json under --out,
committed as benchmarks/results/kernels/prefill_moe_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gpu_timing import cuda_time_ms

from brownout.config import ModelLoadConfig
from brownout.kernels.brownout_routing import brownout_route
from brownout.kernels.fused_moe import fused_moe
from brownout.kernels.routing import select_experts
from brownout.models.context import ForwardContext
from brownout.runner.loader import load_model
from brownout.unite.uncalibrated import install_uncalibrated




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from brownout.models import registry
    registry.PRESETS["qwen1.5-moe-a2.7b-short"] = dict(registry.PRESETS["qwen1.5-moe-a2.7b"],
                                                        num_hidden_layers=args.layers)
    loaded = load_model(ModelLoadConfig(model="qwen1.5-moe-a2.7b-short", load_format="dummy",
                                        device="cuda", dtype="bfloat16", extra_expert_slots=30,
                                        # the shared expert timed apart, as a module of its own
                                        fold_shared_expert=False))
    install_uncalibrated(loaded.model, 4)
    moe = loaded.model.moe_layers()[0]
    E, D = moe.num_experts, loaded.spec.hidden_size
    rows = []
    for T in (512, 2048):
        x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda") * 0.5
        weights, ids = select_experts(moe.gate(x), moe.top_k, moe.renormalize)
        row = dict(tokens=T)
        for tau in (None, 1.0, 0.5, 0.0):
            tau_t = None if tau is None else torch.tensor(tau, device="cuda")
            ctx = ForwardContext(tau=tau_t, count_touched=False, use_kernels=True)
            row[f"layer_tau_{tau}"] = cuda_time_ms(lambda: moe(x, ctx))
        row["router_topk"] = cuda_time_ms(lambda: select_experts(moe.gate(x), moe.top_k, moe.renormalize))
        tau0 = torch.tensor(0.0, device="cuda")
        row["brownout_route"] = cuda_time_ms(lambda: brownout_route(ids, weights, tau0, moe.group_of, E))
        rid, rw = brownout_route(ids, weights, tau0, moe.group_of, E)
        row["slots_tau0"] = int(torch.unique(rid[rid >= 0]).numel())
        row["fused_plain_ids"] = cuda_time_ms(lambda: fused_moe(x, moe.w13, moe.w2, weights, ids))
        row["fused_remapped_ids"] = cuda_time_ms(lambda: fused_moe(x, moe.w13, moe.w2, rw, rid))
        row["fused_remapped_ids_busy_slots"] = cuda_time_ms(
            lambda: fused_moe(x, moe.w13, moe.w2, rw, rid, busy_slots=moe.num_groups))
        no_dup = torch.where(rid < 0, torch.full_like(rid, E), rid)
        row["fused_remapped_no_minus1"] = cuda_time_ms(lambda: fused_moe(x, moe.w13, moe.w2, rw, no_dup))
        if moe.shared_expert is not None:
            row["shared_expert"] = cuda_time_ms(lambda: moe.shared_expert(x))
        rows.append(row)
        print(json.dumps(row))
    (args.out / "prefill_moe.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                 rows=rows), indent=1))


if __name__ == "__main__":
    main()
