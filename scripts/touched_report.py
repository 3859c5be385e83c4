"""Markdown tables for `brownout_touched.json` (written by scripts/brownout_touched.py)."""

from __future__ import annotations

from pathlib import Path


def _avg(values) -> float:
    return sum(values) / len(values)


def _run_lines(run: dict, taus) -> list[str]:
    sizes = list(run["decode"])
    E, G = run["num_experts"], run["num_groups"]
    lines = [f"## way {run['way']} ({run['grouping']} grouping, {G} united slots), {run['text']}", "",
             f"Distinct slots per layer, mean over the {len(run['prefill_2048']['1.0']['exact'])} MoE "
             f"layers (of {E} experts + {G} united slots).", "",
             "| tau | " + " | ".join(f"decode T={s}" for s in sizes) +
             " | prefill 2048 (exact) | prefill 2048 (exact routing) |",
             "|" + "---|" * (len(sizes) + 3)]
    for tau in taus:
        key = str(tau)
        cells = [f"{_avg(run['decode'][s][key]['mean']):.1f}" for s in sizes]
        pre = run["prefill_2048"][key]
        lines.append(f"| {tau:g} | " + " | ".join(cells) +
                     f" | {_avg(pre['exact']):.1f} | {_avg(pre['from_exact_routing']):.1f} |")
    lines += ["", "Per layer, decode T=64:", "", "| tau | " +
              " | ".join(f"layer {i}" for i in range(len(run['decode']['64']['1.0']['mean']))) + " |",
              "|" + "---|" * (len(run['decode']['64']['1.0']['mean']) + 1)]
    for tau in taus:
        d = run["decode"]["64"][str(tau)]
        lines.append(f"| {tau:g} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(d["mean"], d["std"])) + " |")
    return lines + [""]


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Demo model: distinct expert slots touched per step vs tau", "",
             f"Measured on {report['machine']}, torch {report['torch']}, by "
             "`scripts/brownout_touched.py`; raw numbers (per layer, mean and std over "
             f"{report['repeats']} sampled steps) in `brownout_touched.json`. Model: "
             f"`{report['model']}`; text: the first {report['tokens_per_text']:,} tokens of each "
             "source. Decode steps of T tokens take the exact model's router choices at T random "
             "positions of the text and remap them with `brownout_route`; prefill steps of 2048 "
             "tokens run the model itself at each tau ('exact') and are also counted the decode "
             "way ('exact routing') to show what that approximation costs. A slot is a routed "
             "expert or a united expert; the weights a step reads are proportional to it.", ""]
    for run in report["runs"]:
        lines += _run_lines(run, report["taus"])
    path.write_text("\n".join(lines) + "\n")
