"""Install the demo model's embedded united experts and record their prices.

For each way: copy the set built by `accuracy_sources.py` on calibration `all` (the four
training sources) with the chosen recipe into brownout/assets/demo/united-way{W}, price it
with `brownout eval perplexity --record` on the tails of the four sources (in
distribution) and of AlpacaEval's answers (held out: a fifth kind of text), and record
the leave-one-source-out estimate (the same recipe fitted without one source, priced on
the tail of the one left out, averaged over the folds held_out_sources.json holds; the
folds not measured are named), which is the quoted price. The shipped recipe per way is
recorded in held_out_sources.json and its tables rewritten. The quoted way-4 prices also
become brownout/assets/demo/perplexity-way4.json, the eval table of the demo's bench report.
`--from-cache` records the prices accuracy_sources.py already measured on the same texts.

  python scripts/accuracy_ship.py --data ../shared/data --recipe contiguous-distill --ways 2,4,8
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from accuracy_sources import FIFTH, MODEL, SOURCES, STEP_TOKENS, TAUS, WINDOW  # noqa: E402
from accuracy_sources_report import write_markdown  # noqa: E402

ASSETS = ROOT / "brownout" / "assets" / "demo"
EVAL_TABLE_WAY = 4  # the demo serves the way-4 set
DATA_HOME = "../shared/data"  # where a checkout finds the shared data, relative to its root
log = logging.getLogger("accuracy_ship")


def loso_estimate(report: dict, way: int, recipe: str) -> dict:
    """Leave-one-source-out price of a recipe from the runs of held_out_sources.json: the
    mean over the folds measured (each fold: fitted without one source, priced on its tail);
    the folds not measured are named in "folds_missing"."""
    folds, missing = [], []
    for left_out in SOURCES:
        run = next((r for r in report["runs"] if (r["way"], r["recipe"], r["calibration"])
                    == (way, recipe, f"no-{left_out}")), None)
        if run is None:
            missing.append(left_out)
            continue
        ppl = run["perplexity"][left_out]
        folds.append({"left_out": left_out, "calibration": sorted(run["calibration_sources"]),
                      "perplexity": [ppl[str(t)] for t in TAUS],
                      "increase": [ppl[str(t)] / ppl["1.0"] - 1 for t in TAUS]})
    if not folds:
        raise SystemExit(f"no run of way {way} {recipe} leaving a source out: run accuracy_sources.py "
                         f"with --calibrations no-<{'|'.join(SOURCES)}>")
    return {"method": "leave-one-source-out", "recipe": recipe, "text_part": "tail",
            "folds": folds, "folds_missing": missing, "tau": TAUS,
            "perplexity": [math.exp(sum(math.log(f["perplexity"][i]) for f in folds) / len(folds))
                           for i in range(len(TAUS))],
            "increase": [sum(f["increase"][i] for f in folds) / len(folds) for i in range(len(TAUS))]}


def ship(args, way: int, report: dict) -> dict:
    from brownout.cli import main
    from brownout.eval.prices import record_prices

    built = args.work / "all" / f"way{way}-{args.recipe}"
    dest = ASSETS / f"united-way{way}"
    estimate = loso_estimate(report, way, args.recipe)  # before touching the asset
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "united.safetensors"):
        shutil.copyfile(built / name, dest / name)
    texts = [os.path.relpath(args.data / p, ROOT) for p in list(SOURCES.values()) + list(FIFTH.values())]
    if args.from_cache:
        record_prices(dest, _cached_prices(built, dest, args))
        prices = record_prices(dest, {"held_out_estimate": estimate})
        _name_data_home(dest / "manifest.json", os.path.relpath(args.data, ROOT))
        return prices
    out = args.work / f"ship-way{way}.json"
    argv = ["eval", "perplexity", "--model", os.path.relpath(MODEL, ROOT), "--united",
            os.path.relpath(dest, ROOT), "--tau", ",".join(f"{t:g}" for t in TAUS), "--part", "tail",
            "--text", *texts, "--max-tokens", str(args.max_tokens), "--device", "cpu", "--record",
            "--out", str(out)]
    if main(argv) != 0:
        raise RuntimeError(f"eval failed for {dest}")
    prices = record_prices(dest, {"held_out_estimate": estimate})
    _name_data_home(dest / "manifest.json", os.path.relpath(args.data, ROOT))
    return prices


def _cached_prices(built: Path, dest: Path, args) -> dict:
    """The "prices" entry `brownout eval perplexity --record` writes, from the evaluation that
    accuracy_sources.py cached beside the built set (the same scoring code, window, step
    and texts, so the same numbers); only the tokenizer runs here."""
    from transformers import AutoTokenizer

    from brownout.eval.perplexity import tokenize_text
    from brownout.eval.prices import manifest_prices, text_kind
    from brownout.unite.sources import file_sha256, source_text
    from brownout.unite.store import read_manifest

    cache = json.loads((built / "eval.json").read_text())
    if cache.get("max_tokens") != args.max_tokens:
        raise SystemExit(f"--from-cache: {built} was priced on {cache.get('max_tokens')} tokens per text, "
                         f"not --max-tokens {args.max_tokens}")
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    manifest = read_manifest(dest)
    texts = []
    for name, rel in list(SOURCES.items()) + list(FIFTH.items()):
        path, ppl = args.data / rel, cache["results"][name]
        ids = tokenize_text(tokenizer, source_text(path, "tail", tokenizer), args.max_tokens)
        results = [{"tau": t, "top_k": None, "perplexity": ppl[str(t)], "nll": math.log(ppl[str(t)]),
                    "tokens_scored": ppl["tokens"]} for t in TAUS]
        texts.append({"path": os.path.relpath(path, ROOT), "name": path.name, "sha256": file_sha256(path),
                      "part": "tail", "kind": text_kind(path, manifest), "tokens": int(ids.numel()),
                      "results": results})
    return manifest_prices(texts, WINDOW, STEP_TOKENS)


def _name_data_home(manifest_path: Path, data: str) -> None:
    """Name the shared data by where a checkout finds it (`DATA_HOME`), whatever --data was."""
    manifest = json.loads(manifest_path.read_text())
    entries = manifest["calibration"]["sources"] + manifest["prices"]["texts"]
    for entry in entries:
        if entry["path"].startswith(data + os.sep):
            entry["path"] = DATA_HOME + entry["path"][len(data):]
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


def main() -> None:
    import torch

    from brownout.eval.prices import quoted_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy")
    p.add_argument("--recipe", required=True)
    p.add_argument("--ways", default="2,4,8")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--from-cache", action="store_true",
                   help="record the prices accuracy_sources.py measured instead of pricing again")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(ROOT)
    torch.set_num_threads(1)  # the 2-core box is shared: one thread avoids oversubscription
    args.data = args.data.resolve()
    raw = args.results / "held_out_sources.json"
    report = json.loads(raw.read_text())
    for way in (int(w) for w in args.ways.split(",")):
        prices = ship(args, way, report)
        # the tables of held_out_sources.md mark the shipped recipe per way
        report.setdefault("shipped", {})[str(way)] = args.recipe
        raw.write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(report, args.results / "held_out_sources.md")
        log.info("way %d: quoted %s, tau 0 %+.1f%%", way, prices["quoted"],
                 100 * prices[prices["quoted"]]["increase"][-1])
        if way == EVAL_TABLE_WAY:
            manifest = json.loads((ASSETS / f"united-way{way}" / "manifest.json").read_text())
            table = {"united": os.path.relpath(ASSETS / f"united-way{way}", ROOT), **quoted_table(manifest)}
            (ASSETS / f"perplexity-way{way}.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
