"""The `brownout` command line: a thin dispatcher over the subcommands.

Each subcommand lives beside the code it drives and exposes `add_arguments(parser)` and
`run(args) -> int`; they are imported only when chosen, so `brownout bench` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "generate": ("brownout.engine.generate_cli", "generate text offline with the engine"),
    "serve": ("brownout.replicas.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "unite": ("brownout.unite.cli", "build united experts for a checkpoint (offline)"),
    "eval": ("brownout.eval.cli", "perplexity / multiple-choice accuracy at fixed tau"),
    "bench": ("brownout.bench.cli", "bursty-load benchmark against an OpenAI-compatible server"),
    "simulate": ("brownout.sim.cli", "simulate a bench run on a virtual clock from a GPU step-cost profile"),
    "demo": ("brownout.bench.demo", "the main job: start a server, burst it, compare policies"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brownout", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
