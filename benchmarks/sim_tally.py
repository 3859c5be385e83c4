"""Within-target counts of simulated vs measured figures, per profile, over validation files.

Reads the JSON files `benchmarks/sim_validate.py` wrote and counts, per profile, the summary
rows (policy x figure, over the runs of a file) whose simulated mean is within target;
figures without a target (P90 TTFT) are not counted. Every simulated figure it counts is a
simulation.

  python benchmarks/sim_tally.py benchmarks/results/sim/all_runs/validation_h200_*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sim_validate import FIGURES


def tally(paths: list[Path]) -> dict[str, dict[str, tuple[int, int]]]:
    """profile -> validation file stem -> (rows within target, rows with a target)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        rows = [r for r in result["summary"] if r["figure"] in FIGURES]
        out.setdefault(result["profile"]["name"], {})[path.stem] = (
            sum(bool(r["within_target"]) for r in rows), len(rows))
    return out


def markdown(counts: dict[str, dict[str, tuple[int, int]]]) -> str:
    lines = ["| profile | file: within target / figures | all files |", "|---|---|---|"]
    for profile, files in counts.items():
        within = sum(a for a, _ in files.values())
        total = sum(b for _, b in files.values())
        per = ", ".join(f"{stem} {a}/{b}" for stem, (a, b) in sorted(files.items()))
        lines.append(f"| `{profile}` | {per} | {within} of {total} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    text = markdown(tally(args.files))
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
