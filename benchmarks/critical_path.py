"""Each kernel's share of a profiled step's critical path, from `bench_engine.py`'s profile
timelines (profile_<tag>.json[.gz] with `timeline.kernels` of name, start_us, dur_us).

Under PDL kernels overlap, so their durations add up to more than the step: a kernel's
duration includes the time it sat at its wait. Its share here is the time by which it moved
the end of the chain (its end past the latest end before it), and the gaps where nothing
ran are summed apart. Per layer: the share divided by the kernel's calls per step.
Usage: python benchmarks/critical_path.py PROFILE.json[.gz] [--top 16]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

NAME_CHARS = 40  # kernel names are cut here: template arguments make them unreadable


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def shares(kernels: list[dict]) -> tuple[dict, dict, float]:
    """(share us per kernel name, calls per name, idle us) over one profile's kernels."""
    share: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    idle = 0.0
    ordered = sorted(kernels, key=lambda k: k["start_us"])
    end = ordered[0]["start_us"] if ordered else 0.0
    for k in ordered:
        name = k["name"][:NAME_CHARS]
        stop = k["start_us"] + k["dur_us"]
        idle += max(0.0, k["start_us"] - end)
        share[name] += max(0.0, stop - max(end, k["start_us"]))
        calls[name] += 1
        end = max(end, stop)
    return share, calls, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    data = load(args.profile)
    share, calls, idle = shares(data["timeline"]["kernels"])
    total = sum(share.values()) + idle
    print(f"{args.profile.name}: {total:.1f} us from first kernel to last, {idle:.1f} us with none running")
    print(f"{'kernel':{NAME_CHARS}s}  share us  calls  share / call us")
    for name, us in share.most_common(args.top):
        print(f"{name:{NAME_CHARS}s}  {us:8.1f}  {calls[name]:5d}  {us / calls[name]:8.2f}")


if __name__ == "__main__":
    main()
