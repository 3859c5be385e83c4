"""`brownout eval`: perplexity and multiple-choice accuracy at fixed brownout thresholds.

Examples:
  brownout eval perplexity --text wiki.txt     # the embedded model and its way-4 united experts
  brownout eval perplexity --model brownout/assets/demo/model \
      --united-experts brownout/assets/demo/united-way4 --tau 1,0.8,0.6,0.4,0.2,0 --part tail \
      --text ../shared/data/text/gsm8k_train.jsonl ../shared/data/text/tinyshakespeare.txt \
      --max-tokens 32768 --out ppl.json --record
  brownout eval choice --model DIR --united-experts DIR --tau 1,0 --data questions.jsonl

Perplexity prices every text and sorts each into in-distribution (its file is one of the
united set's calibration sources) or held-out (the calibration never saw it): both are
reported, and the held-out price is the one quoted (the JSON's "results"); `--record`
stores both in the united set's manifest. Without united experts (a model other than the
embedded one and no --united-experts) only tau 1 is priced, unless --tau asks for less, which
is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

from brownout.cliutil import (check_output_file, int_at_least, progress, readable_file, resolve_model,
                              resolve_united)
from brownout.types import ValidationError
from brownout.unite.sources import PARTS

log = logging.getLogger(__name__)

DEFAULT_TAUS = "1,0.8,0.6,0.4,0.2,0"


def parse_taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return taus


def parse_top_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return ks


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or a directory holding one in model/ "
                        "(default: the embedded demo model)")
    p.add_argument("--united-experts", dest="united", default=None,
                   help="directory written by `brownout unite`, needed for tau < 1, or none (default: "
                        "the embedded way-4 set with the embedded model, else none: tau 1 only)")
    p.add_argument("--united", dest="united", default=None, help=argparse.SUPPRESS)  # former name
    p.add_argument("--tau", type=parse_taus, default=None,
                   help=f"comma-separated brownout thresholds in [0, 1] (default {DEFAULT_TAUS}; "
                        "1 alone without united experts)")
    p.add_argument("--batch-tokens", type=int_at_least(1), default=2048,
                   help="tokens per forward step, as the engine's step budget")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the weights and activations")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file "
                                                          "(default: print the table only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    ppl = sub.add_parser("perplexity", help="perplexity of a text at each tau")
    ppl.set_defaults(_prog=ppl.prog)  # errors found while running name the task
    _common(ppl)
    ppl.add_argument("--text", required=True, type=readable_file, nargs="+", metavar="FILE",
                     help="plain text or .jsonl/.json records (rendered as chats), one source each")
    ppl.add_argument("--part", choices=PARTS, default="all",
                     help="part of each text to score (tail: the last 5%%, which calibration leaves out)")
    ppl.add_argument("--max-tokens", type=int_at_least(2), default=None,
                     help="score only the first this many tokens of each text (default: all of it)")
    ppl.add_argument("--record", action="store_true",
                     help="store the prices (per kind of text and tau) in the united set's manifest")
    ppl.add_argument("--window", type=int_at_least(2), default=512, help="tokens per scored window")
    ppl.add_argument("--top-k", type=parse_top_ks, default=None,
                     help="comma-separated k' (routed experts kept per token, expert shedding); "
                          "each is scored at every tau (default: the model's k only)")
    choice = sub.add_parser("choice", help="multiple-choice accuracy by log-likelihood at each tau")
    choice.set_defaults(_prog=choice.prog)
    _common(choice)
    choice.add_argument("--data", required=True, type=readable_file, metavar="FILE",
                        help='JSON lines: {"context": str, "choices": [str, ...], "label": int}')
    choice.add_argument("--max-len", type=int_at_least(2), default=1024,
                        help="longest context + candidate scored, in tokens")


def run(args: argparse.Namespace) -> int:
    resolve_args(args)  # before torch loads: an input error is reported at once
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


def resolve_args(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on each other (model, united experts, taus) and check
    them and the output path, each error naming its flag."""
    args.model = resolve_model(args.model)
    named = args.united is not None
    args.united = resolve_united(args.united, args.model, allow_average=False)
    if getattr(args, "record", False) and (not named or args.united is None):  # only into a named set
        raise ValidationError("--record", "needs the united experts to record into named: --united-experts DIR")
    if args.united is None:
        if args.tau is not None and any(t < 1.0 for t in args.tau):
            raise ValidationError("--united-experts", "tau below 1 needs united experts: expected a "
                                  "directory written by `brownout unite` (or --tau 1 for the exact model)")
        if args.tau is None:
            log.warning("no united experts (--united-experts DIR): pricing tau 1 only")
        args.tau = [1.0]
    elif args.tau is None:
        args.tau = parse_taus(DEFAULT_TAUS)
    if args.out is not None:
        check_output_file("--out", args.out)


def _prepared(path: Path, args, em) -> tuple:
    """(token ids, batches) of one --text file; a file that cannot be read as text or records,
    or that is too short, is an error of --text."""
    from brownout.eval.perplexity import make_batches, tokenize_text  # lazy: torch
    from brownout.unite.sources import source_text

    try:
        ids = tokenize_text(em.tokenizer, source_text(path, args.part, em.tokenizer), args.max_tokens)
        return ids, make_batches(ids, args.window, args.batch_tokens)
    except UnicodeDecodeError:
        raise ValidationError("--text", f"expected UTF-8 text or .jsonl/.json records, got {path} "
                                        "(not UTF-8)") from None
    except ValueError as exc:  # the file's content: bad records, too few tokens
        message = str(exc).removeprefix("text: ")
        raise ValidationError("--text", f"{path}: {message}") from None


def _run_perplexity(args, em):
    from brownout.eval.perplexity import evaluate_perplexity  # lazy: torch
    from brownout.eval.prices import by_kind, manifest_prices, quoted_kind, record_prices, text_kind
    from brownout.unite.sources import file_sha256

    top_ks = args.top_k or [None]
    prepared = [(path, *_prepared(path, args, em)) for path in args.text]
    texts = []
    # one bar over every text, tau and k': its rate, and so its time estimate, is the mean so far
    steps = sum(len(batches) for _, _, batches in prepared) * len(args.tau) * len(top_ks)
    with progress(steps, desc="perplexity", unit="step") as bar:
        for path, ids, batches in prepared:
            bar.set_postfix_str(path.name)
            results = evaluate_perplexity(em.model, batches, args.tau, em.device, bar, top_ks)
            texts.append({"path": str(path), "name": path.name, "sha256": file_sha256(path), "part": args.part,
                          "kind": text_kind(path, em.united), "tokens": int(ids.numel()),
                          "results": results})
    kinds = by_kind(texts)
    if args.record and args.united is not None:
        record_prices(Path(args.united), manifest_prices(texts, args.window, args.batch_tokens))
    meta = {"text": str(args.text[0]) if len(args.text) == 1 else [str(t) for t in args.text],
            "part": args.part, "window": args.window, "texts": texts, "kinds": kinds,
            "quoted": quoted_kind(kinds)}
    return kinds[meta["quoted"]], meta


def _run_choice(args, em):
    from brownout.eval.choice import evaluate_choice, read_questions  # lazy: torch

    try:
        questions = read_questions(args.data)
    except UnicodeDecodeError:
        raise ValidationError("--data", f"expected UTF-8 JSON lines, got {args.data} (not UTF-8)") from None
    except ValueError as exc:  # the file's content
        raise ValidationError("--data", str(exc)) from None
    with progress(len(args.tau), desc="choice", unit="tau") as bar:
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
