"""Markdown tables for `held_out_sources.json` (written by scripts/accuracy_sources.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from accuracy_sources_notes import ABOUT, CHOICE, TRIED

TARGETS = {2: 0.08, 4: 0.20, 8: 0.40}  # held-out-source perplexity increase at tau 0, at most
DISTILL_VS_AVERAGE = 0.60  # distillation's increase at least this much below averaging's
BASELINE = "contiguous-average"  # the calibration-free recipe distillation is compared with


def increase(run: dict, text: str, tau: float) -> float:
    """Perplexity at `tau` relative to tau 1 on `text`, minus 1."""
    ppl = run["perplexity"][text]
    return ppl[str(float(tau))] / ppl["1.0"] - 1


def mean_increase(run: dict, texts: list[str], tau: float) -> Optional[float]:
    """Mean over the texts priced of the relative increase (each source counts once); None if
    none of them was priced."""
    priced = [t for t in texts if t in run["perplexity"]]
    return sum(increase(run, t, tau) for t in priced) / len(priced) if priced else None


def in_distribution(run: dict, report: dict) -> list[str]:
    """Tails of the calibration's own sources (all four for a calibration-free set)."""
    return [s for s in report["sources"] if s in run["calibration_sources"]] or list(report["sources"])


def held_out(run: dict, report: dict) -> list[str]:
    """The tail of the source the calibration left out, else the fifth kind of text."""
    if run["held_out_source"]:
        return [run["held_out_source"]]
    return [t for t in report["fifth"] if t in run["perplexity"]]


def find(report: dict, way: int, recipe: str, calibration: str) -> Optional[dict]:
    return next((r for r in report["runs"] if (r["way"], r["recipe"], r["calibration"])
                 == (way, recipe, calibration)), None)


def loso(report: dict, way: int, recipe: str, tau: float,
         sources: Optional[list[str]] = None) -> Optional[dict]:
    """Leave-one-source-out price over `sources` (default: every source): per left-out source,
    the set fitted without it priced on its tail (a calibration-free recipe: its one set on
    every tail); the mean over the folds measured, the others named in "missing"; None
    without any fold."""
    folds, missing = {}, []
    for source in sources or report["sources"]:
        run = find(report, way, recipe, f"no-{source}")
        if run is None and recipe == BASELINE:
            run = find(report, way, recipe, "all")
        if run is None or source not in run["perplexity"]:
            missing.append(source)
            continue
        folds[source] = increase(run, source, tau)
    if not folds:
        return None
    return {"mean": sum(folds.values()) / len(folds), "folds": folds, "missing": missing}


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def _recipe_table(report: dict, runs: list[dict]) -> list[str]:
    taus = [t for t in report["taus"] if t < 1]
    head = ("| recipe | calibration | held out | fit error before / after | "
            + " | ".join(f"in-dist {t:g}" for t in taus) + " | "
            + " | ".join(f"held-out {t:g}" for t in taus) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(taus))]
    for run in runs:
        fit = run["fit_error"]
        fit_s = f"{fit['before']:.3f} / {fit['after']:.3f}" if "after" in fit else "-"
        ind, held = in_distribution(run, report), held_out(run, report)
        if run["recipe"] == BASELINE:  # calibration-free: every text priced is unseen by it
            ind, held = [], [t for t in [*report["sources"], *report["fifth"]] if t in run["perplexity"]]
        cells = [_pct(mean_increase(run, ind, t)) for t in taus] + \
            [_pct(mean_increase(run, held, t)) if held else "-" for t in taus]
        lines.append(f"| {run['recipe']} | {run['calibration']} | {', '.join(held) or '-'} | {fit_s} | "
                     + " | ".join(cells) + " |")
    return lines


def _targets(report: dict, shipped: dict) -> list[str]:
    lines = ["| way | recipe shipped | quoted: leave-one-source-out mean, tau 0 | target | met | "
             "left-out gsm8k | left-out plain sources | in-dist (all four) | AlpacaEval (never seen) | "
             f"{BASELINE}, leave-one-source-out | distill below average | met (>= 60%) |",
             "|" + "---|" * 12]
    for way, recipe in sorted((int(w), r) for w, r in shipped.items()):
        est, run = loso(report, way, recipe, 0.0), find(report, way, recipe, "all")
        if est is None or run is None:
            lines.append(f"| {way} | {recipe} | (folds missing) |" + " |" * 9)
            continue
        folds_s = "" if not est["missing"] else f" ({', '.join(est['folds'])} left out)"
        plain = [v for k, v in est["folds"].items() if k != "gsm8k"]
        # distillation against the baseline on the folds both were priced on
        base = loso(report, way, BASELINE, 0.0, list(est["folds"]))
        below = None if base is None else \
            1 - sum(est["folds"][k] for k in base["folds"]) / len(base["folds"]) / base["mean"]
        base_s = "-" if base is None else _pct(base["mean"]) + (
            f" (on {', '.join(base['folds'])})" if base["missing"] else "")
        lines.append(
            f"| {way} | {recipe} | **{_pct(est['mean'])}**{folds_s} | {_pct(TARGETS.get(way))} | "
            f"{'yes' if est['mean'] <= TARGETS.get(way, 0) else 'no'} | {_pct(est['folds'].get('gsm8k'))} | "
            f"{_pct(sum(plain) / len(plain) if plain else None)} | {_pct(mean_increase(run, in_distribution(run, report), 0.0))} | "
            f"{_pct(mean_increase(run, held_out(run, report), 0.0))} | {base_s} | "
            f"{'-' if below is None else f'{100 * below:.0f}%'} | "
            f"{'-' if below is None else ('yes' if below >= DISTILL_VS_AVERAGE else 'no')} |")
    return lines


def _fold_table(report: dict, way: int, recipes: list[str]) -> list[str]:
    taus = [t for t in report["taus"] if t < 1]
    lines = ["| recipe | left out | " + " | ".join(f"tau {t:g}" for t in taus) + " |",
             "|" + "---|" * (2 + len(taus))]
    for recipe in recipes:
        rows = [loso(report, way, recipe, t) for t in taus]
        if rows[0] is None:
            continue
        for source in rows[0]["folds"]:
            lines.append(f"| {recipe} | {source} | " + " | ".join(_pct(r["folds"][source]) for r in rows) + " |")
        lines.append(f"| {recipe} | **mean** | " + " | ".join(f"**{_pct(r['mean'])}**" for r in rows) + " |")
    return lines


def _attempts(report: dict, way: int) -> list[str]:
    """Per attempt at `way`: its price at tau 0 on the hardest source's tail (gsm8k) and on the
    three plain sources' tails, whether each was in its calibration, and its build time."""
    hard = "gsm8k"
    plain = [s for s in report["sources"] if s != hard]
    lines = ["| attempt (recipe, calibration) | gsm8k tail | gsm8k seen in calibration | "
             "plain tails (mean) | plain seen | build |", "|" + "---|" * 6]
    for run in [r for r in report["runs"] if r["way"] == way]:
        if hard not in run["perplexity"]:
            continue
        seen = run["calibration_sources"] if run["recipe"] != BASELINE else {}
        build = "-" if run.get("build_s") is None else f"{run['build_s'] / 60:.1f} min"
        lines.append(f"| {run['recipe']}, {run['calibration']} | {_pct(increase(run, hard, 0.0))} | "
                     f"{'yes' if hard in seen else 'no'} | {_pct(mean_increase(run, plain, 0.0))} | "
                     f"{'yes' if all(s in seen for s in plain) else 'no'} | {build} |")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    shipped = report.get("shipped", {})
    lines = ["# United experts priced on sources their calibration did not include", "",
             f"Measured on {report['machine']}, torch {report['torch']}, by `scripts/accuracy_sources.py` "
             "(sets built by `brownout unite`, priced with the code of `brownout eval perplexity`); raw "
             "numbers in `held_out_sources.json`.", "",
             ABOUT.format(max_tokens=report["max_tokens_per_text"], calibration_tokens=report["calibration_tokens"]), "", "## Which held-out text is quoted", "",
             CHOICE, ""]
    if shipped:
        lines += ["## Shipped sets against the targets (tau 0)", ""] + _targets(report, shipped) + [""]
    lines += ["## What was tried", "", TRIED, ""]
    if report.get("time_taken"):
        lines += [f"Time taken: {report['time_taken']}", ""]
    for way in sorted({r["way"] for r in report["runs"]}):
        lines += [f"### way {way}: what each attempt bought (tau 0)", ""] + _attempts(report, way) + [""]
    for way in sorted({r["way"] for r in report["runs"]}):
        runs = [r for r in report["runs"] if r["way"] == way]
        lines += [f"## way {way}: every recipe", ""] + _recipe_table(report, runs) + [""]
        recipes = sorted({r["recipe"] for r in runs})
        folds = _fold_table(report, way, recipes)
        if len(folds) > 2:
            lines += [f"### way {way}: leave-one-source-out, held-out tail of the left-out source", ""] + folds + [""]
    path.write_text("\n".join(lines) + "\n")
