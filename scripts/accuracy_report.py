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
            line = (f"- way {way}, {grouping}: tau 0 perplexity {pa:.2f} (average) vs {pd:.2f} "
                    f"(distill): {100 * (1 - pd / pa):.1f}% lower")
            if pa > base and pd >= base:
                line += (f"; the increase over tau 1 ({base:.2f}) shrinks from "
                         f"{100 * (pa / base - 1):.1f}% to {100 * (pd / base - 1):.1f}%")
            lines.append(line)
    return lines


def _mean_below_one(report: dict, run: dict, text: str = "held_out_in_domain") -> float:
    below = [t for t in report["taus"] if t < 1]
    return sum(_ppl(run, text, t) for t in below) / len(below)


NOTE_WIKITEXT = ("The demo model never saw encyclopedic text (perplexity ~860 at tau 1), so on "
                 "WikiText brownout acts like noise on an already poor prediction and can even "
                 "lower perplexity; read accuracy costs from the in-domain table below.")


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
        if text == "wikitext2_valid":
            lines += [NOTE_WIKITEXT, ""]
        lines += _table(report, text)
        lines += ["", "Distill vs average at tau = 0:", ""] + _distill_vs_average(report, text) + [""]
    if "held_out_in_domain" in report["texts"]:
        lines += ["## Best recipe per way", "",
                  "Lowest mean in-domain perplexity over tau 0.8 ... 0 (the embedded sets in "
                  "`brownout/assets/demo/united-way{2,4}` name their recipe in their manifest):", ""]
        for way in sorted({r["way"] for r in report["runs"]}):
            runs = sorted((r for r in report["runs"] if r["way"] == way),
                          key=lambda r: _mean_below_one(report, r))
            lines.append("- way {}: {}".format(way, "; ".join(
                f"{r['grouping']} {r['method']} {_mean_below_one(report, r):.2f}" for r in runs[:2])))
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
