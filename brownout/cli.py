"""The `brownout` command line: a thin dispatcher over the subcommands.

Each subcommand lives beside the code it drives and exposes `add_arguments(parser)` and
`run(args) -> int`; they are imported only when chosen, so `brownout bench` never loads torch.
A user error, found while parsing or while running, is one line naming the flag and exit
code 2 (see brownout.cliutil); any other error shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from brownout.cliutil import Parser, flag_name
from brownout.types import ValidationError

SUBCOMMANDS = {
    "generate": ("brownout.engine.generate_cli", "generate text offline with the engine"),
    "serve": ("brownout.replicas.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "unite": ("brownout.unite.cli", "build united experts for a checkpoint (offline)"),
    "eval": ("brownout.eval.cli", "perplexity / multiple-choice accuracy at fixed tau"),
    "bench": ("brownout.bench.cli", "bursty-load benchmark against an OpenAI-compatible server"),
    "simulate": ("brownout.sim.cli", "simulate a bench run on a virtual clock from a GPU step-cost profile"),
    "demo": ("brownout.bench.demo", "the main job: start a server, burst it, compare policies"),
}


def build_parser(argv: Sequence[str], commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of the subcommands in `commands` (default: the one
    `argv` chooses, so only its module is imported)."""
    parser = Parser(prog="brownout", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error too, not only its one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if commands is None:
        commands = [next((a for a in argv if a in SUBCOMMANDS), None)]
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in commands:  # import only the modules that will run
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run, _prog=p.prog, _flag_of=getattr(module, "flag_of", flag_name))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)  # a usage error exits 2 with one line
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except ValidationError as exc:  # the user's input, found while running: one line, no traceback
        if args.debug:
            raise
        print(f"{args._prog}: error: {args._flag_of(exc.field)}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
