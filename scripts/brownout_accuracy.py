"""Perplexity of the demo model under brownout for every united-expert recipe.

Builds united experts for way {2, 4} x grouping {contiguous, similarity} x method
{average, frequency, distill} (calibration: the training part of three plain-text
sources), then scores at tau 1, 0.8, 0.6, 0.4, 0.2, 0 with serving-size steps of 2048
tokens (4 windows of 512):
  - WikiText-2 raw validation (the standard perplexity text; a prefix, see --wiki-tokens);
  - the held-out 5% of the same three sources (in-domain text the model never saw).
Writes benchmarks/results/accuracy/brownout_perplexity.json (raw) and .md (tables). CPU only.

  python scripts/brownout_accuracy.py [--work runs/united] [--wiki-tokens 65536]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from accuracy_report import write_markdown  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
SOURCES = ["tinyshakespeare.txt", "us_state_of_the_union_1945_2006.txt",
           "us_inaugural_addresses_1789_2021.txt"]
MODEL = ROOT / "brownout" / "assets" / "demo" / "model"
TAUS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
log = logging.getLogger("brownout_accuracy")


def held_out_text() -> str:
    """The last 5% of each plain training source, cut as in scripts/demo_data.py."""
    from demo_data import split_plain

    return "\n".join(split_plain((DATA / "text" / name).read_text(encoding="utf-8"))[1]
                     for name in SOURCES)


def _rel(path: Path) -> str:
    return os.path.relpath(path, ROOT)


def build(way: int, grouping: str, method: str, out: Path, seed: int) -> float | None:
    """Build once into `out`; returns the build time in seconds (None if not recorded)."""
    from brownout.cli import main

    timing = out / "build_seconds.json"
    if (out / "manifest.json").is_file():
        return json.loads(timing.read_text()) if timing.is_file() else None
    start = time.perf_counter()
    # paths relative to the repository root, so manifests name no machine-specific path
    argv = ["unite", "--model", _rel(MODEL), "--way", str(way), "--grouping", grouping,
            "--method", method, "--device", "cpu", "--seed", str(seed), "--out", str(out)]
    if grouping == "similarity" or method != "average":
        argv += ["--calibration", *[_rel(DATA / "text" / s) for s in SOURCES]]
    if main(argv) != 0:
        raise RuntimeError(f"unite failed for {out}")
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps(seconds))
    return seconds


def evaluate(united: Path, texts: dict[str, Path], tokens: dict[str, int]) -> dict:
    """Perplexity per text and tau; cached in the united directory (the sweep is long)."""
    from brownout.eval.perplexity import evaluate_perplexity, make_batches, tokenize_text
    from brownout.eval.scoring import load_eval_model

    key = {"tokens": tokens, "taus": TAUS, "manifest_date": json.loads(
        (united / "manifest.json").read_text())["date"]}
    cache = united / "eval.json"
    if cache.is_file() and json.loads(cache.read_text())["key"] == key:
        return json.loads(cache.read_text())["results"]
    em = load_eval_model(str(MODEL), str(united), device="cpu")
    out = {}
    for name, path in texts.items():
        ids = tokenize_text(em.tokenizer, path.read_text(encoding="utf-8"), tokens[name])
        batches = make_batches(ids, 512, 2048)
        out[name] = evaluate_perplexity(em.model, batches, TAUS, em.device)
        log.info("%s %s: %s", united.name, name,
                 " ".join(f"{r['tau']:g}:{r['perplexity']:.2f}" for r in out[name]))
    cache.write_text(json.dumps({"key": key, "results": out}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "united")
    p.add_argument("--wiki-tokens", type=int, default=65536)
    p.add_argument("--held-out-tokens", type=int, default=49152)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(ROOT)
    torch.set_num_threads(1)  # the 2-core box is shared: one thread avoids oversubscription
    tmp = Path(tempfile.mkdtemp())
    (tmp / "held_out.txt").write_text(held_out_text(), encoding="utf-8")
    texts = {"wikitext2_valid": DATA / "eval" / "wikitext2_raw_valid.txt",
             "held_out_in_domain": tmp / "held_out.txt"}
    tokens = {"wikitext2_valid": args.wiki_tokens, "held_out_in_domain": args.held_out_tokens}
    runs = []
    for way, grouping, method in itertools.product((2, 4), ("contiguous", "similarity"),
                                                   ("average", "frequency", "distill")):
        out = args.work / f"way{way}-{grouping}-{method}"
        build_s = build(way, grouping, method, out, args.seed)
        manifest = json.loads((out / "manifest.json").read_text())
        runs.append({"way": way, "grouping": grouping, "method": method, "build_s": build_s,
                     "fit_error": _mean_fit(manifest), "perplexity": evaluate(out, texts, tokens)})
        _write(args.results, runs, texts, tokens)


def _mean_fit(manifest: dict) -> dict:
    """Assignment-weighted mean fit error over all groups (None without calibration)."""
    groups = [g for layer in manifest["fit_error"].values() for g in layer if g.get("error_after") is not None]
    if not groups:
        return {"before": None, "after": None}
    total = sum(g["assignments"] for g in groups) or 1
    return {k: sum(g[f"error_{k}"] * g["assignments"] for g in groups) / total for k in ("before", "after")}


def _write(results: Path, runs: list, texts: dict, tokens: dict) -> None:
    report = {"model": str(MODEL.relative_to(ROOT)), "machine": f"{platform.node()} (CPU, "
              f"{torch.get_num_threads()} thread)", "torch": torch.__version__, "taus": TAUS,
              "window": 512, "step_tokens": 2048,
              "texts": {k: {"path": _rel(v) if k == "wikitext2_valid"
                            else "held-out 5% of " + ", ".join(SOURCES), "max_tokens": tokens[k]}
                        for k, v in texts.items()},
              "runs": runs}
    results.mkdir(parents=True, exist_ok=True)
    (results / "brownout_perplexity.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, results / "brownout_perplexity.md")


if __name__ == "__main__":
    main()
