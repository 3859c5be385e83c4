"""Prices of united experts on sources their calibration did not include (CPU, demo model).

Calibrations: `all` (the fit part of the four training sources of the demo model,
balanced by tokens: Shakespeare, State of the Union, inaugural addresses, gsm8k chats)
and `no-<source>` (leave one of the four out). Every set is priced at every tau on the
tail (last 5%) of each of the four sources, which neither the model nor any calibration
saw: on the tails of the calibration's own sources (in distribution) and on the tail of
the source it left out (held out). Sets fitted on all four sources are also priced on a
fifth kind of text, the tail of AlpacaEval's GPT-4 answers as chats, which the model never saw.

Builds and evaluations are cached under --work; results accumulate in
benchmarks/results/accuracy/held_out_sources.json (raw) and .md (tables, written by
scripts/accuracy_sources_report.py).

  python scripts/accuracy_sources.py --ways 2,4 --calibrations all,no-gsm8k \
      --recipes contiguous-average,contiguous-distill
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from accuracy_sources_report import write_markdown  # noqa: E402

DATA = ROOT.parent / "shared" / "data"  # a checkout's ../shared/data (see --data)
SOURCES = {"shakespeare": "text/tinyshakespeare.txt",
           "sotu": "text/us_state_of_the_union_1945_2006.txt",
           "inaugural": "text/us_inaugural_addresses_1789_2021.txt",
           "gsm8k": "text/gsm8k_train.jsonl"}  # the demo model's four training sources
FIFTH = {"alpaca": "prompts/alpaca_eval_gpt4_outputs.json"}  # text the model never saw
MODEL = ROOT / "brownout" / "assets" / "demo" / "model"
TAUS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
WINDOW, STEP_TOKENS = 512, 2048  # 4 windows per step: the engine's default step budget
# recipe name -> `brownout unite` arguments beyond way, calibration and output
RECIPES = {
    "contiguous-average": ["--grouping", "contiguous", "--method", "average"],
    "similarity-average": ["--grouping", "similarity", "--method", "average"],
    "contiguous-frequency": ["--grouping", "contiguous", "--method", "frequency"],
    "similarity-frequency": ["--grouping", "similarity", "--method", "frequency"],
    "contiguous-distill-random": ["--grouping", "contiguous", "--method", "distill",
                                  "--distill-validation", "random"],
    "contiguous-distill": ["--grouping", "contiguous", "--method", "distill"],
    # a shorter fit, for when the machine cannot afford 1000 steps per group
    "contiguous-distill-300": ["--grouping", "contiguous", "--method", "distill", "--distill-steps", "300"],
    "similarity-distill": ["--grouping", "similarity", "--method", "distill"],
    "contiguous-distill-tau0": ["--grouping", "contiguous", "--method", "distill", "--capture-tau", "0"],
    "similarity-distill-tau0": ["--grouping", "similarity", "--method", "distill", "--capture-tau", "0"],
}
log = logging.getLogger("accuracy_sources")


def _rel(path: Path) -> str:
    return os.path.relpath(path, ROOT)


def calibration_sources(name: str) -> list[str]:
    if name == "all":
        return list(SOURCES)
    left_out = name.removeprefix("no-")
    if not name.startswith("no-") or left_out not in SOURCES:
        raise ValueError(f"calibration: 'all' or 'no-<{'|'.join(SOURCES)}>', got {name!r}")
    return [s for s in SOURCES if s != left_out]


def build(recipe: str, way: int, calibration: str, data: Path, tokens: int, out: Path,
          seed: int) -> float | None:
    """Build once into `out`; returns the build time in seconds (None if not recorded)."""
    from brownout.cli import main

    timing = out / "build_seconds.json"
    if (out / "manifest.json").is_file():
        return json.loads(timing.read_text()) if timing.is_file() else None
    start = time.perf_counter()
    # paths relative to the repository root, so manifests name no machine-specific path
    argv = ["unite", "--model", _rel(MODEL), "--way", str(way), *RECIPES[recipe], "--device", "cpu",
            "--seed", str(seed), "--out", str(out), "--calibration-tokens", str(tokens),
            "--calibration", *[_rel(data / SOURCES[s]) for s in calibration_sources(calibration)]]
    if main(argv) != 0:
        raise RuntimeError(f"unite failed for {out}")
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps(seconds))
    return seconds


def texts_for(calibration: str, data: Path) -> dict[str, tuple[Path, str]]:
    """Texts a set is priced on: (file, part) per name."""
    texts = {name: (data / path, "tail") for name, path in SOURCES.items()}
    if calibration in ("all", "before"):
        texts.update({name: (data / path, "tail") for name, path in FIFTH.items()})
    return texts


def evaluate(united: Path, texts: dict[str, tuple[Path, str]], max_tokens: int, taus) -> dict:
    """Perplexity per text and tau, cached in the united directory."""
    from brownout.eval.perplexity import evaluate_perplexity, make_batches, tokenize_text
    from brownout.eval.scoring import load_eval_model
    from brownout.unite.sources import source_text

    cache = united / "eval.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    date = json.loads((united / "manifest.json").read_text())["date"]
    if done.get("manifest_date") != date or done.get("max_tokens") != max_tokens:
        done = {"manifest_date": date, "max_tokens": max_tokens, "results": {}}
    todo = {k: v for k, v in texts.items()
            if not all(str(t) in done["results"].get(k, {}) for t in taus)}
    if todo:
        em = load_eval_model(str(MODEL), str(united), device="cpu")
        for name, (path, part) in todo.items():
            ids = tokenize_text(em.tokenizer, source_text(path, part, em.tokenizer), max_tokens)
            batches = make_batches(ids, WINDOW, STEP_TOKENS)
            res = evaluate_perplexity(em.model, batches, taus, em.device)
            done["results"][name] = {str(r["tau"]): r["perplexity"] for r in res}
            done["results"][name]["tokens"] = res[0]["tokens_scored"]
            log.info("%s %s: %s", united, name, " ".join(f"{r['tau']:g}:{r['perplexity']:.2f}" for r in res))
            cache.write_text(json.dumps(done))
    return {k: done["results"][k] for k in texts}


def fit_summary(manifest: dict) -> dict:
    """Assignment-weighted mean fit errors over all groups (None without calibration)."""
    groups = [g for layer in manifest["fit_error"].values() for g in layer if g.get("error_after") is not None]
    if not groups:
        return {}
    total = sum(g["assignments"] for g in groups) or 1
    out = {k: sum(g[f"error_{k}"] * g["assignments"] for g in groups) / total
           for k in ("before", "after", "in_sample") if all(f"error_{k}" in g for g in groups)}
    steps = [g["best_step"] for g in groups if "best_step" in g]
    if steps:
        out["mean_best_step"] = sum(steps) / len(steps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="the shared data directory")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy")
    p.add_argument("--ways", default="4,2,8")
    p.add_argument("--calibrations", default="all,no-gsm8k")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--calibration-tokens", type=int, default=131072)
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens priced per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", default=None,
                   help="price only these texts (comma-separated: shakespeare, sotu, inaugural, gsm8k, alpaca)")
    p.add_argument("--before", default=None, metavar="REV",
                   help="also price the embedded sets of this git revision (calibration 'before')")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = p.parse_args()
    args.data = args.data.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(ROOT)
    torch.set_num_threads(1)  # the 2-core box is shared: one thread avoids oversubscription
    raw = args.results / "held_out_sources.json"
    report = json.loads(raw.read_text()) if raw.is_file() else {"runs": []}
    for run in measure_before(args) if args.before else []:
        report["runs"] = [r for r in report["runs"] if _key(r) != _key(run)] + [run]
        _write(args, report)
    for way in (int(w) for w in args.ways.split(",")) if args.recipes else []:
        for recipe in args.recipes.split(","):
            for calibration in args.calibrations.split(","):
                run = measure(args, way, calibration, recipe)
                report["runs"] = [r for r in report["runs"] if _key(r) != _key(run)] + [run]
                _write(args, report)


def measure(args, way: int, calibration: str, recipe: str) -> dict:
    out = args.work / calibration / f"way{way}-{recipe}"
    build_s = build(recipe, way, calibration, args.data, args.calibration_tokens, out, args.seed)
    return describe(args, out, way, calibration, recipe, build_s)


def describe(args, out: Path, way: int, calibration: str, recipe: str, build_s=None) -> dict:
    """A run's record: which sources its calibration took (by sha256) and its prices."""
    from brownout.unite.sources import file_sha256

    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest.get("calibration") or {}
    entries = cal.get("sources", cal.get("files", []))
    digests = {file_sha256(args.data / path): name for name, path in SOURCES.items()}
    used = {digests[e["sha256"]]: e.get("tokens") for e in entries if e["sha256"] in digests}
    left_out = [s for s in SOURCES if s not in used]
    return {"way": way, "recipe": recipe, "calibration": calibration, "calibration_sources": used,
            "held_out_source": left_out[0] if len(left_out) == 1 else None,
            "build_s": build_s, "fit_error": fit_summary(manifest),
            "perplexity": evaluate(out, _chosen(texts_for(calibration, args.data), args.texts),
                                   args.max_tokens, TAUS)}


def _chosen(texts: dict, names) -> dict:
    if names is None:
        return texts
    unknown = set(names.split(",")) - set(SOURCES) - set(FIFTH)
    if unknown:
        raise SystemExit(f"--texts: {', '.join(sorted(unknown))} not among {', '.join([*SOURCES, *FIFTH])}")
    return {k: v for k, v in texts.items() if k in names.split(",")}


def measure_before(args) -> list[dict]:
    """The embedded sets of an earlier commit (`--before REV`), priced the same way."""
    import subprocess

    runs = []
    for way in (2, 4):
        out = args.work / "before" / f"way{way}"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("manifest.json", "united.safetensors"):
            blob = subprocess.run(["git", "show", f"{args.before}:brownout/assets/demo/united-way{way}/{name}"],
                                  cwd=ROOT, check=True, capture_output=True).stdout
            if not (out / name).is_file() or (out / name).read_bytes() != blob:
                (out / name).write_bytes(blob)
        manifest = json.loads((out / "manifest.json").read_text())
        recipe = f"shipped before ({manifest['grouping']['kind']}-{manifest['method']})"
        runs.append(describe(args, out, way, "before", recipe))
    return runs


def _key(run: dict) -> tuple:
    return run["way"], run["recipe"], run["calibration"]


def _write(args, report: dict) -> None:
    report.update({"model": _rel(MODEL), "machine": f"{platform.node()} (CPU, 1 thread)",
                   "torch": torch.__version__, "taus": TAUS, "window": WINDOW, "step_tokens": STEP_TOKENS,
                   "max_tokens_per_text": args.max_tokens, "calibration_tokens": args.calibration_tokens,
                   "sources": SOURCES, "fifth": FIFTH, "recipes": RECIPES})
    report["runs"].sort(key=lambda r: (r["way"], r["calibration"] != "all", r["calibration"], r["recipe"]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "held_out_sources.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.results / "held_out_sources.md")


if __name__ == "__main__":
    main()
