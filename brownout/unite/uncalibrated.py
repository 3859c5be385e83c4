"""United experts built at load time without calibration data: contiguous groups, uniform
average (the cheapest method of SPEC 1.2). Selected with `--united-experts average:WAY`.

Useful for checkpoints nobody has run `brownout unite` on yet, and for benchmarks on dummy
weights, where calibration would be meaningless; a calibrated build is more accurate.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from brownout.unite.grouping import groups_from_map, make_groups
from brownout.unite.methods import average

_SPEC = re.compile(r"^average:(\d+)$")


def parse_uncalibrated(spec: str) -> Optional[int]:
    """The way of an `average:WAY` spec, or None when `spec` is a directory."""
    m = _SPEC.match(spec.strip())
    if not m:
        return None
    way = int(m.group(1))
    if way not in (2, 4, 8):
        raise ValueError(f"united_experts: way in 'average:WAY' must be 2, 4 or 8, got {way}")
    return way


@torch.no_grad()
def install_uncalibrated(model, way: int) -> None:
    for moe in model.moe_layers():
        E = moe.num_experts
        group_of = make_groups("contiguous", E, way)
        united = [average(moe.w13[:E], moe.w2[:E], members) for members in groups_from_map(group_of)]
        moe.install_united(torch.stack([u[0] for u in united]), torch.stack([u[1] for u in united]),
                           group_of)
