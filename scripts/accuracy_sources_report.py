"""Markdown tables for `held_out_sources.json` (written by scripts/accuracy_sources.py)."""

from __future__ import annotations

from pathlib import Path


def increase(run: dict, text: str, tau: float) -> float:
    """Perplexity at `tau` relative to tau 1 on `text`, minus 1."""
    ppl = run["perplexity"][text]
    return ppl[str(tau)] / ppl["1.0"] - 1


def in_distribution(run: dict, report: dict) -> list[str]:
    return [s for s in report["sources"] if s in run["calibration_sources"]]


def mean_increase(run: dict, texts: list[str], tau: float) -> float:
    """Mean over texts of the relative increase (each source counts once)."""
    return sum(increase(run, t, tau) for t in texts) / len(texts)


def _pct(v: float) -> str:
    return f"{100 * v:+.1f}%"


def _table(report: dict, runs: list[dict]) -> list[str]:
    taus = [t for t in report["taus"] if t < 1]
    head = ("| way | recipe | calibration | fit error before / after | "
            + " | ".join(f"in-dist tau {t:g}" for t in taus) + " | "
            + " | ".join(f"held-out tau {t:g}" for t in taus) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(taus))]
    for run in runs:
        fit = run["fit_error"]
        fit_s = f"{fit['before']:.3f} / {fit['after']:.3f}" if "after" in fit else "-"
        ind = in_distribution(run, report) or list(report["sources"])
        held = [run["held_out_source"]] if run["held_out_source"] else list(report["fifth"])
        cells = [_pct(mean_increase(run, ind, t)) for t in taus] + \
            [_pct(mean_increase(run, held, t)) for t in taus]
        lines.append(f"| {run['way']} | {run['recipe']} | {run['calibration']} | {fit_s} | "
                     + " | ".join(cells) + " |")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# United experts priced on sources their calibration did not include", "",
             f"Measured on {report['machine']}, torch {report['torch']}, by "
             "`scripts/accuracy_sources.py`; raw numbers in `held_out_sources.json`. Each cell is "
             "the perplexity increase over tau 1, averaged over the texts of its kind (each "
             "source's tail counts once). In-dist: the tails of the calibration's own sources; "
             "held-out: the tail of the source the calibration left out, or, for calibration "
             "`all`, AlpacaEval answers (a fifth kind of text).", ""]
    for way in sorted({r["way"] for r in report["runs"]}):
        lines += [f"## way {way}", ""] + _table(report, [r for r in report["runs"] if r["way"] == way]) + [""]
    path.write_text("\n".join(lines) + "\n")
