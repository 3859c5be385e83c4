"""Tables of several `bench_engine.py` runs of one device call, each a variant of the engine
(an environment switch), against the first: decode steps pipelined as the engine's loop
runs them, the graph replayed alone, the engine loop's period, and brownout at tau 0.

Every variant ran in its own process of the same call, one after the other, and each process
timed its own copy bandwidth; the rooflines here all divide by the highest of those rates
(the conservative roofline), so the ratios compare like with like.

Run: python benchmarks/variant_tables.py LABEL=RAW_DIR [LABEL=RAW_DIR ...] --out FILE.md
     [--title T] [--note TEXT]   (the first variant is the baseline)
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
from pathlib import Path

TAU0_WAYS = (4, 8)  # brownout ways shown at tau 0
TAU0_BATCHES = (8, 64)  # decode batches shown at tau 0


def _load(path: Path):
    """A JSON file, or its gzipped form (compacted raw folders gzip the larger files)."""
    if path.exists():
        return json.loads(path.read_text())
    gz = Path(f"{path}.gz")
    return json.loads(gzip.open(gz, "rt").read()) if gz.exists() else None


def _variant(arg: str) -> tuple[str, Path]:
    label, _, raw = arg.partition("=")
    if not raw:
        raise argparse.ArgumentTypeError(f"expected LABEL=RAW_DIR, got {arg!r}")
    return label, Path(raw)


def render(variants: list[tuple[str, Path]], title: str, note: str = "") -> str:
    runs = {label: {name: _load(raw / f"{name}.json") for name in ("meta", "decode", "loop", "brownout")}
            for label, raw in variants}
    labels = [label for label, _ in variants]
    base = labels[0]
    bw = {label: runs[label]["meta"]["copy_bandwidth_Bps"] for label in labels}
    common = max(bw.values())

    def roof(label: str, row: dict, key: str = "roofline_ms") -> float:
        return row[key] * bw[label] / common  # the same bytes over the common bandwidth

    meta = runs[base]["meta"]
    lines = [f"# {title}", "",
             f"{meta['device']}, torch {meta['torch']}, {meta['weights']} ({meta['preset']}). "
             f"Made by `python benchmarks/variant_tables.py "
             + " ".join(shlex.quote(f"{label}={raw}") for label, raw in variants) + " --out ...`. "
             f"Copy bandwidth per process: "
             + ", ".join(f"{label} {bw[label] / 1e12:.2f}" for label in labels)
             + f" TB/s; rooflines divide by {common / 1e12:.2f} TB/s.", ""]
    if note:
        lines += [note, ""]

    decode = {label: {(r["batch"], r["ctx"]): r for r in runs[label]["decode"] or []
                      if r.get("cuda_graph") and r.get("pipelined_ms") and r.get("replay_ms")}
              for label in labels}
    keys = [k for k in decode[base] if all(k in decode[label] for label in labels)]
    if keys:  # runs of the brownout stage alone have no decode table
        lines += ["## CUDA-graphed decode steps, pipelined (ms; / roofline)", "",
                  "Each step launched before the previous one is collected, as the engine's loop runs "
                  "with async scheduling; `replay`: the step's graph replayed alone.", "",
                  "| batch, context | " + " | ".join(f"{label} ms | / roofline | replay ms" for label in labels)
                  + " | " + " | ".join(f"{label} / {base}" for label in labels[1:]) + " |",
                  "|---|" + "---|---|---|" * len(labels) + "---|" * (len(labels) - 1)]
    for k in keys:
        cells = []
        for label in labels:
            r = decode[label][k]
            cells.append(f"{r['pipelined_ms']:.3f} | {r['pipelined_ms'] / roof(label, r):.2f}x | {r['replay_ms']:.3f}")
        ratios = [f"{decode[label][k]['pipelined_ms'] / decode[base][k]['pipelined_ms']:.3f}" for label in labels[1:]]
        lines.append(f"| {k[0]}, {k[1]} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

    loops = {label: [r for r in (runs[label]["loop"] or []) if r.get("async_scheduling") and "batch" in r
                     and r.get("period_ms") and r.get("roofline_ms")]
             for label in labels}
    # the variants whose loop stage finished (a process cut by its time limit has none),
    # against the first of them
    have = [label for label in labels if loops[label]]
    if len(have) > 1 or have == labels:
        lbase = have[0]
        missing = [label for label in labels if label not in have]
        lines += ["", "## The engine's loop with async scheduling (period ms; / roofline)", ""]
        if missing:
            lines += [f"No loop stage in {', '.join(missing)}: the ratios are against {lbase}.", ""]
        lines += ["| batch | " + " | ".join(f"{label} ms | / roofline" for label in have) + " | "
                  + " | ".join(f"{label} / {lbase}" for label in have[1:]) + " |",
                  "|---|" + "---|---|" * len(have) + "---|" * (len(have) - 1)]
        for r0 in loops[lbase]:
            match = {label: next((r for r in loops[label] if r["batch"] == r0["batch"]), None) for label in have}
            if any(v is None for v in match.values()):
                continue
            cells = [f"{match[label]['period_ms']:.3f} | {match[label]['period_ms'] / roof(label, match[label]):.2f}x"
                     for label in have]
            ratios = [f"{match[label]['period_ms'] / r0['period_ms']:.3f}" for label in have[1:]]
            lines.append(f"| {r0['batch']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

    if all(runs[label]["brownout"] for label in labels):
        lines += ["", "## Brownout at tau 0, pipelined (context 512, uncalibrated united experts)", "",
                  "`vs tau 1`: the same step at tau 1 in the same process.", "",
                  "| way | batch | " + " | ".join(f"{label} ms | vs tau 1 | / roofline" for label in labels) + " |",
                  "|---|---|" + "---|---|---|" * len(labels)]
        tau0 = {label: {(r["way"], r["batch"]): r for r in runs[label]["brownout"]["decode"]
                        if r["tau"] == 0.0 and r.get("pipelined_ms") and r.get("pipelined_vs_tau1")}
                for label in labels}
        for way in TAU0_WAYS:
            for batch in TAU0_BATCHES:
                if not all((way, batch) in tau0[label] for label in labels):
                    continue
                cells = []
                for label in labels:
                    r = tau0[label][(way, batch)]
                    cells.append(f"{r['pipelined_ms']:.3f} | {r['pipelined_vs_tau1']:.3f} | "
                                 f"{r['pipelined_ms'] / roof(label, r):.2f}x")
                lines.append(f"| {way} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", type=_variant, nargs="+", help="LABEL=RAW_DIR, the baseline first")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Engine variants in one device call")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    args.out.write_text(render(args.variants, args.title, args.note))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
