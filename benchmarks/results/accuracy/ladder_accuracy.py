"""Accuracy price of expert shedding (k' < k) on the demo model, alone and beside brownout.

Scores the demo model (top-4 routing, way-4 united experts: --united, by default the
embedded set) at every k' in {4, 3, 2, 1} x tau in {1, 0} with serving-size steps of 2048
tokens (4 windows of 512), on text from four sources:
  - gsm8k: the held-out 5% of the problems as chat turns;
  - the three plain sources: the last TOKENS tokens of each file, which hold its held-out
    5% and, where that is shorter, the training text just before it.
A source is held out when the united set's calibration did not read its file (by sha256),
in distribution otherwise. The rung prices are the held-out sources' changes, so pass a set
fitted without gsm8k (the gsm8k fold of `scripts/accuracy_sources.py`) when the embedded
set's calibration read every source.
Writes ladder_price.json (raw) and ladder_price.md (tables) beside this script, and the
demo model's default rung prices, brownout/assets/demo/ladder-prices.json: the held-out
source's (prices are measured on text the calibration did not read). CPU only, one thread
(the machine is shared). `--render` rewrites the tables and prices from ladder_price.json.

  python benchmarks/results/accuracy/ladder_accuracy.py [--tokens 40960] [--data DIR] [--render]
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from demo_data import CHAT_SOURCE, HELD_OUT_FRACTION, PLAIN_SOURCES, chat_text  # noqa: E402

from brownout.eval.perplexity import evaluate_perplexity, make_batches, tokenize_text  # noqa: E402
from brownout.eval.prices import text_kind  # noqa: E402
from brownout.eval.scoring import load_eval_model  # noqa: E402
from brownout.unite.store import read_manifest  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "text"
MODEL = ROOT / "brownout" / "assets" / "demo" / "model"
UNITED = ROOT / "brownout" / "assets" / "demo" / "united-way4"
PRICE_TABLE = ROOT / "brownout" / "assets" / "demo" / "ladder-prices.json"
TOP_KS = [4, 3, 2, 1]
TAUS = [1.0, 0.0]
WINDOW, BATCH_TOKENS = 512, 2048  # the engine's default step budget
CHARS_PER_TOKEN = 8  # generous: the tail read from a plain file holds at least the tokens asked
log = logging.getLogger("ladder_accuracy")


def gsm8k_held_out(data: Path) -> str:
    rows = [json.loads(line) for line in (data / CHAT_SOURCE).read_text().splitlines() if line]
    cut = int(len(rows) * (1 - HELD_OUT_FRACTION))
    return "".join(chat_text(r["question"], r["answer"]) for r in rows[cut:])


def source_ids(tokenizer, data: Path, name: str, tokens: int) -> torch.Tensor:
    if name == CHAT_SOURCE:
        return tokenize_text(tokenizer, gsm8k_held_out(data), tokens)
    text = (data / name).read_text(encoding="utf-8")
    tail = text[text.find("\n", max(0, len(text) - tokens * CHARS_PER_TOKEN)) + 1:]
    ids = tokenize_text(tokenizer, tail)
    return ids[-tokens:]


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Price of expert shedding on the demo model", "",
             f"Perplexity at k' routed experts per token (of k = 4) and brownout tau (way-4 "
             f"united experts `{report['united']}`, calibration: "
             f"{', '.join(report.get('united_calibration', ['-']))}), steps of {BATCH_TOKENS} tokens; change vs k' = 4, "
             f"tau = 1 on the same text. Raw: `ladder_price.json`; script: `ladder_accuracy.py`.", ""]
    head = "| source | tokens | " + " | ".join(f"k'={k}, tau={t:g}" for k in TOP_KS for t in TAUS) + " |"
    half = [s["results"][TOP_KS.index(TOP_KS[0] // 2) * len(TAUS)]["perplexity"] / s["results"][0]["perplexity"] - 1
            for s in report["sources"]]
    lines += [f"Target k' = k/2 within +5% (tau 1): {'met' if max(half) <= 0.05 else 'missed'}; within on "
              f"{sum(h <= 0.05 for h in half)} of {len(half)} sources ({min(half):+.2%} to {max(half):+.2%}).",
              f"One CPU thread, {report['elapsed_s'] / 60:.0f} min in all.", ""]
    lines += [head, "|" + " --- |" * (2 + len(TOP_KS) * len(TAUS))]
    for src in report["sources"]:
        base = src["results"][0]["perplexity"]
        cells = [f"{r['perplexity']:.3f} ({r['perplexity'] / base - 1:+.1%})" for r in src["results"]]
        lines.append(f"| {src['name']} ({src['kind']}) | {src['tokens_scored']} | " + " | ".join(cells) + " |")
    lines += ["", "Prices: the held-out source's change (the controller's default table, "
              "`brownout/assets/demo/ladder-prices.json`) and the mean over the in-distribution "
              "sources:", "", "| k' | tau | held-out | in-distribution mean |", "| --- | --- | --- | --- |"]
    for p, q in zip(report["prices"], report["prices_in_distribution"]):
        lines.append(f"| {p['top_k']} | {p['tau']:g} | {p['ppl_increase']:+.1%} | {q['ppl_increase']:+.1%} |")
    path.write_text("\n".join(lines) + "\n")


def mean_prices(sources: list[dict]) -> list[dict]:
    prices = []
    for i, r in enumerate(sources[0]["results"]):
        rel = [s["results"][i]["perplexity"] / s["results"][0]["perplexity"] - 1 for s in sources]
        prices.append({"top_k": r["top_k"], "tau": r["tau"], "ppl_increase": sum(rel) / len(rel)})
    return prices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=40960, help="tokens read per source")
    ap.add_argument("--data", type=Path, default=DATA, help="the shared text directory")
    ap.add_argument("--render", action="store_true", help="only rewrite from ladder_price.json")
    ap.add_argument("--united", type=Path, default=UNITED, help="way-4 united experts scored")
    args = ap.parse_args()
    if args.render:
        finish(json.loads((HERE / "ladder_price.json").read_text()))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    start = time.perf_counter()
    united = args.united.resolve()
    em = load_eval_model(str(MODEL), str(united), "cpu", "float32")
    manifest = read_manifest(united)
    if manifest["way"] != 4:
        raise SystemExit(f"--united: a way-4 set is priced here, got way {manifest['way']}")
    sources = []
    for name in (CHAT_SOURCE,) + PLAIN_SOURCES:
        ids = source_ids(em.tokenizer, args.data, name, args.tokens)
        batches = make_batches(ids, WINDOW, BATCH_TOKENS)
        results = evaluate_perplexity(em.model, batches, TAUS, em.device, top_ks=TOP_KS)
        kind = text_kind(args.data / name, manifest).replace("_", "-")
        sources.append({"name": name, "kind": kind,
                        "tokens_read": int(ids.numel()), "tokens_scored": results[0]["tokens_scored"],
                        "results": results})
        log.info("%s done", name)
    if not any(s["kind"] == "held-out" for s in sources):
        raise SystemExit("--united: its calibration read every source, so no price is held out")
    report = {"model": str(MODEL.relative_to(ROOT)), "united": os.path.relpath(united, ROOT),
              "united_calibration": [Path(c["path"]).name for c in manifest["calibration"].get(
                  "sources", manifest["calibration"].get("files", []))],
              "window": WINDOW, "batch_tokens": BATCH_TOKENS, "dtype": "float32",
              "machine": platform.node(), "threads": 1, "elapsed_s": time.perf_counter() - start,
              "sources": sources, "prices": mean_prices(sources)}
    finish(report)
    return 0


def finish(report: dict) -> None:
    """Prices from the scored sources; the raw JSON, the tables and the demo price table."""
    report["prices"] = mean_prices([s for s in report["sources"] if s["kind"] == "held-out"])
    report["prices_in_distribution"] = mean_prices(
        [s for s in report["sources"] if s["kind"] == "in-distribution"])
    (HERE / "ladder_price.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, HERE / "ladder_price.md")
    table = {"model_top_k": TOP_KS[0], "source": "benchmarks/results/accuracy/ladder_price.json",
             "measured_on": [s["name"] for s in report["sources"] if s["kind"] == "held-out"],
             "prices": report["prices"]}
    PRICE_TABLE.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
