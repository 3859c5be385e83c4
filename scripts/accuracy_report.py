"""Markdown tables for `brownout_perplexity.json` (written by scripts/brownout_accuracy.py)."""

from __future__ import annotations

from pathlib import Path


def _ppl(run: dict, text: str, tau: float) -> float:
    return next(r["perplexity"] for r in run["perplexity"][text] if r["tau"] == tau)


def _find(runs, way, grouping, method):
    return next((r for r in runs if (r["way"], r["grouping"], r["method"]) == (way, grouping, method)), None)


def _table(report: dict, text: str) -> list[str]:
    taus = report["taus"]
    head = "| way | grouping | method | fit error before / after | " + \
        " | ".join(f"tau {t:g}" for t in taus) + " | tau 0 vs tau 1 |"
    lines = [head, "|" + "---|" * (len(taus) + 5)]
    for run in report["runs"]:
        fit = run["fit_error"]
        fit_s = "-" if fit["after"] is None else f"{fit['before']:.3f} / {fit['after']:.3f}"
        base, zero = _ppl(run, text, 1.0), _ppl(run, text, 0.0)
        cells = " | ".join(f"{_ppl(run, text, t):.2f}" for t in taus)
        lines.append(f"| {run['way']} | {run['grouping']} | {run['method']} | {fit_s} | {cells} | "
                     f"{100 * (zero / base - 1):+.1f}% |")
    return lines


def _distill_vs_average(report: dict, text: str) -> list[str]:
    lines = []
    for way in (2, 4):
        for grouping in ("contiguous", "similarity"):
            avg, dist = _find(report["runs"], way, grouping, "average"), _find(report["runs"], way, grouping, "distill")
            if avg is None or dist is None:
                continue
            base = _ppl(avg, text, 1.0)
            pa, pd = _ppl(avg, text, 0.0), _ppl(dist, text, 0.0)
            cut = (pa - pd) / (pa - base) if pa != base else float("nan")
            lines.append(f"- way {way}, {grouping}: tau 0 perplexity {pa:.2f} (average) vs {pd:.2f} "
                         f"(distill): {100 * (1 - pd / pa):.1f}% lower; the increase over tau 1 "
                         f"({base:.2f}) shrinks by {100 * cut:.0f}%")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Demo model: perplexity under brownout", "",
             f"Measured on {report['machine']}, torch {report['torch']}, by "
             "`scripts/brownout_accuracy.py`; raw numbers in `brownout_perplexity.json`. Model: "
             f"`{report['model']}` (7.5M parameters, 32 experts, top-4). Text is cut into windows "
             f"of {report['window']} tokens, 4 windows per step ({report['step_tokens']} tokens, "
             "the engine's default step budget), so the keep set of each step is computed over "
             "2048 tokens as in serving. Fit error: assignment-weighted mean over all groups of "
             "the relative squared error of the united expert on held-out calibration tokens "
             "(before = average/frequency starting point, after = final). tau = 1 is the exact "
             "model for every recipe. Calibration (frequency, distill, similarity grouping): "
             "32,768 tokens from the start of the three plain training sources (Shakespeare, "
             "State of the Union, inaugural addresses); similarity grouping pairs experts by "
             "output distance on the states routed to them, weighted by their load "
             "(`brownout/unite/grouping.py`).", ""]
    for text, meta in report["texts"].items():
        lines += [f"## {text}", "", f"Text: {meta['path']}, first {meta['max_tokens']:,} tokens "
                  "(a prefix: the CPU box is slow).", ""]
        lines += _table(report, text)
        lines += ["", "Distill vs average at tau = 0:", ""] + _distill_vs_average(report, text) + [""]
    path.write_text("\n".join(lines) + "\n")
