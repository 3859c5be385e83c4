"""`brownout eval`: perplexity and multiple-choice accuracy at fixed brownout thresholds.

Examples:
  brownout eval perplexity --model brownout/assets/demo/model \
      --united brownout/assets/demo/united-way4 --tau 1,0.8,0.6,0.4,0.2,0 --part tail \
      --text ../shared/data/text/gsm8k_train.jsonl ../shared/data/text/tinyshakespeare.txt \
      --max-tokens 32768 --out ppl.json --record
  brownout eval choice --model DIR --united DIR --tau 1,0 --data questions.jsonl

Perplexity prices every text and sorts each into in-distribution (its file is one of the
united set's calibration sources) or held-out (the calibration never saw it): both are
reported, and the held-out price is the one quoted (the JSON's "results"); `--record`
stores both in the united set's manifest.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from brownout.unite.sources import PARTS

DEFAULT_TAUS = "1,0.8,0.6,0.4,0.2,0"


def parse_taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau: expected comma-separated numbers, got {text!r}") from None
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise argparse.ArgumentTypeError(f"tau: each value must be in [0, 1], got {text!r}")
    return taus


def parse_top_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"top-k: expected comma-separated integers, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"top-k: each value must be >= 1, got {text!r}")
    return ks


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--united", default=None, help="united-expert directory (needed for tau < 1)")
    p.add_argument("--tau", type=parse_taus, default=parse_taus(DEFAULT_TAUS),
                   help=f"comma-separated thresholds (default {DEFAULT_TAUS})")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per step (engine default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    ppl = sub.add_parser("perplexity", help="perplexity of a text at each tau")
    _common(ppl)
    ppl.add_argument("--text", required=True, type=Path, nargs="+",
                     help="plain text or .jsonl/.json records (rendered as chats), one source each")
    ppl.add_argument("--part", choices=PARTS, default="all",
                     help="part of each text to score (tail: the last 5%%, which calibration leaves out)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only this many tokens per text")
    ppl.add_argument("--record", action="store_true",
                     help="store the prices (per kind of text and tau) in the united set's manifest")
    ppl.add_argument("--window", type=int, default=512, help="tokens per scored window")
    ppl.add_argument("--top-k", type=parse_top_ks, default=None,
                     help="comma-separated k' (routed experts kept per token, expert shedding); "
                          "each is scored at every tau (default: the model's k only)")
    choice = sub.add_parser("choice", help="multiple-choice accuracy by log-likelihood at each tau")
    _common(choice)
    choice.add_argument("--data", required=True, type=Path,
                        help='JSON lines: {"context": str, "choices": [str, ...], "label": int}')
    choice.add_argument("--max-len", type=int, default=1024, help="longest candidate (tokens)")


def run(args: argparse.Namespace) -> int:
    # lazy: the torch chain loads only when the command runs (`brownout --help` stays fast)
    from brownout.eval.scoring import check_taus, load_eval_model

    check_taus(args.tau, args.united is not None)
    start = time.perf_counter()
    em = load_eval_model(args.model, args.united, args.device, args.dtype)
    if args.eval_command == "perplexity":
        results, meta = _run_perplexity(args, em)
    else:
        results, meta = _run_choice(args, em)
    report = {"task": args.eval_command, "model": args.model, "united": args.united,
              "united_method": (em.united or {}).get("method"),
              "united_grouping": ((em.united or {}).get("grouping") or {}).get("kind"),
              "united_way": (em.united or {}).get("way"), "device": str(em.device),
              "dtype": args.dtype, "batch_tokens": args.batch_tokens, "machine": platform.node(),
              "elapsed_s": time.perf_counter() - start, **meta, "results": results}
    _print_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _run_perplexity(args, em):
    from tqdm import tqdm

    from brownout.eval.perplexity import evaluate_perplexity, make_batches, tokenize_text  # lazy: torch
    from brownout.eval.prices import by_kind, manifest_prices, quoted_kind, record_prices, text_kind
    from brownout.unite.sources import file_sha256, source_text

    top_ks = args.top_k or [None]
    texts = []
    for path in args.text:
        ids = tokenize_text(em.tokenizer, source_text(path, args.part, em.tokenizer), args.max_tokens)
        batches = make_batches(ids, args.window, args.batch_tokens)
        with tqdm(total=len(batches) * len(args.tau) * len(top_ks), unit="step", desc=path.name) as bar:
            results = evaluate_perplexity(em.model, batches, args.tau, em.device, bar, top_ks)
        texts.append({"path": str(path), "name": path.name, "sha256": file_sha256(path), "part": args.part,
                      "kind": text_kind(path, em.united), "tokens": int(ids.numel()), "results": results})
    kinds = by_kind(texts)
    if args.record and args.united is not None:
        record_prices(Path(args.united), manifest_prices(texts, args.window, args.batch_tokens))
    meta = {"text": str(args.text[0]) if len(args.text) == 1 else [str(t) for t in args.text],
            "part": args.part, "window": args.window, "texts": texts, "kinds": kinds,
            "quoted": quoted_kind(kinds)}
    return kinds[meta["quoted"]], meta


def _run_choice(args, em):
    from tqdm import tqdm

    from brownout.eval.choice import evaluate_choice, read_questions  # lazy: torch

    questions = read_questions(args.data)
    with tqdm(total=len(args.tau), unit="tau") as bar:
        results = evaluate_choice(em.model, em.tokenizer, questions, args.tau, args.batch_tokens,
                                  em.device, args.max_len, bar)
    return results, {"data": str(args.data)}


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    united = report["united"] or "none"
    table = Table(title=f"{report['task']} of {report['model']} (united: {united})")
    table.add_column("tau", justify="right")
    if report["task"] == "perplexity":
        kinds = report["kinds"]
        shed = any(r.get("top_k") is not None for r in report["results"])
        if shed:
            table.add_column("k'", justify="right")
        for kind in kinds:
            label = kind.replace("_", "-") + (" (quoted)" if kind == report["quoted"] else "")
            table.add_column(f"{label} ppl", justify="right")
            table.add_column("vs tau 1", justify="right")
        table.add_column("slots touched / layer", justify="right")
        for i, r in enumerate(report["results"]):
            cells = []
            for rows in kinds.values():
                inc = rows[i].get("increase")
                cells += [f"{rows[i]['perplexity']:.3f}", "-" if inc is None else f"{inc:+.1%}"]
            touched = r.get("mean_slots_touched") or []
            k_col = [str(r.get("top_k") or "k")] if shed else []
            table.add_row(f"{r['tau']:g}", *k_col, *cells, f"{sum(touched) / max(1, len(touched)):.1f}")
        Console().print("texts: " + "; ".join(f"{t['name']} ({t['part']}, {t['tokens']} tokens): "
                                               f"{t['kind'].replace('_', '-')}" for t in report["texts"]))
    else:
        table.add_column("acc", justify="right")
        table.add_column("acc_norm", justify="right")
        for r in report["results"]:
            table.add_row(f"{r['tau']:g}", f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}")
    Console().print(table)
