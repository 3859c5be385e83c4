"""What every `brownout` subcommand shares: a parser whose errors are one line, a help
formatter that states defaults, argument types with their allowed ranges, the embedded model
and united experts as defaults, and progress bars.

A user error is one line, `brownout CMD: error: --flag: what is expected`, and exit code 2
(argparse's convention): parse-time errors come from `Parser.error`, errors found while a
command runs are `ValidationError(flag, message)`, which `brownout.cli.main` prints. Torch-free,
so `brownout --help` and the torch-free commands (bench, simulate) stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from brownout.defaults import ASSETS, default_model_dir, default_united_dir
from brownout.types import ValidationError

# the way of the embedded united experts a command uses by default: the set the demo and the
# published prices use
DEFAULT_WAY = 4
# the --united-experts value that asks for no united experts (overriding the embedded default)
NO_UNITED = "none"
# seconds between progress lines when stderr is not a terminal (CI logs): one line now and then
# shows a long command is alive without flooding the log
LOG_PROGRESS_INTERVAL_S = 30.0
# seconds between redraws of a progress bar on a terminal
TTY_PROGRESS_INTERVAL_S = 0.5


# a key inside a SPEC string names the flag that takes the SPEC: a trace is a kind of workload
SPEC_FLAGS = {"trace": "workload"}


def flag_name(field: str) -> str:
    """`--united-experts` for "united_experts" (a name already starting with "-" is kept); a
    key inside a SPEC string, "workload.rate", is `--workload: rate`."""
    if field.startswith("-"):
        return field
    head, dot, rest = field.partition(".")
    if dot:
        return f"{flag_name(SPEC_FLAGS.get(head, head))}: {rest if head not in SPEC_FLAGS else field}"
    return "--" + field.replace("_", "-")


# ---- the parser ---------------------------------------------------------------------------
# a help text that already states its default: "(default X)", "...; default X", "default: X"
STATED_DEFAULT = re.compile(r"\(default\b|;\s*default\b|^default\b|\bdefault:", re.I)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default,
    or the default says nothing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or STATED_DEFAULT.search(text)
                or default is None or default is False or default is argparse.SUPPRESS):
            return text
        if default is True:
            return f"{text} (default: on)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the flag, and whose help states
    defaults. Subparsers made from it are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's hook for every parse error
        self.exit(2, f"{self.prog}: error: {self._one_line(message)}\n")

    def _one_line(self, message: str) -> str:
        missing = re.match(r"the following arguments are required: (.*)", message)
        if missing:
            names = [n.strip() for n in missing.group(1).split(",")]
            return "; ".join(f"{n}: required ({self._what(n)})" if self._what(n) else f"{n}: required"
                             for n in names)
        named = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if named:  # "argument --a/-b: msg" -> "--a: msg"
            message = f"{named.group(1).split('/')[0]}: {named.group(2)}"
        return " ".join(message.split())

    def _what(self, name: str) -> str:
        for action in self._actions:
            if name in action.option_strings or name in (action.dest, action.metavar):
                return (action.help or "").split(";")[0].strip() if action.help != argparse.SUPPRESS else ""
        return ""


# ---- argument types (argparse `type=`): each names what it expects ------------------------
def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def float_in(lo: float, hi: Optional[float] = None, lo_open: bool = False) -> Callable[[str], float]:
    what = (f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None
            else f"a number {'>' if lo_open else '>='} {lo:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what
    return parse


def readable_file(text: str) -> Path:
    """A file that exists and can be read."""
    path = Path(text)
    if not path.is_file():
        why = "a directory" if path.is_dir() else "no such file"
        raise argparse.ArgumentTypeError(f"expected a readable file, got {text} ({why})")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"expected a readable file, got {text} ({exc.strerror})") from None
    return path


def check_output_dir(flag: str, path: Path) -> Path:
    """`path` is, or can become, a directory: no file stands at it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValidationError(flag, f"expected a directory to write to, got {path} (a file)")
    return path


def check_output_file(flag: str, path: Path) -> Path:
    """`path` is not a directory, and its parent is, or can become, a directory."""
    path = Path(path)
    if path.is_dir():
        raise ValidationError(flag, f"expected a file path to write to, got {path} (a directory)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValidationError(flag, f"expected a file path to write to, got {path} ({parent} is a file)")
            break
    return path


# ---- the embedded model and united experts as defaults --------------------------------------
def add_model_arguments(g) -> None:
    """--model and --united-experts as the commands that run the engine (serve, generate) take them."""
    g.add_argument("--model", default=None,
                   help="checkpoint directory, or a directory holding one in model/ (default: the "
                        "embedded demo model); a preset name with --load-format dummy")
    g.add_argument("--united-experts", default=None,
                   help="directory written by `brownout unite`, average:WAY (uncalibrated, built at "
                        "load), or none (default: the embedded way-4 set with the embedded model, else none)")


def resolve_model(value: Optional[str], flag: str = "--model", dummy: bool = False) -> str:
    """The checkpoint directory `value` names: None is the embedded demo model; a directory
    holding a `model/` checkpoint (as `brownout/assets/demo` does) means that checkpoint. With
    `dummy` (--load-format dummy) a preset name passes as it is."""
    if value is None:
        return default_model_dir()
    path = Path(value)
    if (path / "config.json").is_file():
        return value
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    if dummy:
        return value
    why = "no such directory" if not path.exists() else "no config.json in it"
    raise ValidationError(flag, f"expected a checkpoint directory holding config.json (the embedded one: "
                                f"{shown_path(default_model_dir())}), got {value} ({why})")


def is_embedded_model(model_dir: str) -> bool:
    return Path(model_dir).resolve() == Path(default_model_dir()).resolve()


def resolve_united(value: Optional[str], model_dir: str, flag: str = "--united-experts",
                   allow_average: bool = True) -> Optional[str]:
    """The united experts `value` names: None is the embedded way-4 set when the model is the
    embedded one (else None: no united experts); `average:WAY` passes where the command builds
    them at load time; a directory must hold a `brownout unite` manifest.json; `none` is no
    united experts."""
    if value is None:
        return default_united_dir(DEFAULT_WAY) if is_embedded_model(model_dir) else None
    if value == NO_UNITED:
        return None
    if allow_average and value.startswith("average:"):
        return value
    if (Path(value) / "manifest.json").is_file():
        return value
    expected = "a directory written by `brownout unite` (holding manifest.json)"
    expected += ", average:WAY or none" if allow_average else " or none"
    why = "no such directory" if not Path(value).exists() else "no manifest.json in it"
    raise ValidationError(flag, f"expected {expected}, got {value} ({why})")


def united_summary(united: Optional[str]) -> str:
    """One phrase naming a united-expert set: its path, way, grouping and method."""
    if united is None:
        return "none"
    if united.startswith("average:"):
        return f"{united} (way {united.partition(':')[2]}, uncalibrated averages built at load)"
    try:
        manifest = json.loads((Path(united) / "manifest.json").read_text())
    except (OSError, ValueError):
        return united
    grouping = (manifest.get("grouping") or {}).get("kind", "?")
    return f"{shown_path(united)} (way {manifest.get('way', '?')}, {grouping} grouping, {manifest.get('method', '?')})"


def shown_path(path: str) -> str:
    """A package asset's path relative to the package's parent (as the README names it)."""
    try:
        return str(Path(path).resolve().relative_to(ASSETS.parent.parent))
    except ValueError:
        return path


@contextlib.contextmanager
def user_errors(flags: Mapping[str, str]) -> Iterator[None]:
    """Turn a `ValueError("field: message")` whose field is in `flags` into the ValidationError
    of that field's flag; any other error passes unchanged (it is not the user's)."""
    try:
        yield
    except ValidationError:
        raise
    except ValueError as exc:
        field, sep, message = str(exc).partition(": ")
        if sep and field in flags:
            raise ValidationError(flags[field], message) from exc
        raise


# ---- progress bars ---------------------------------------------------------------------------
class _Lines:
    """A stream for tqdm off a terminal: each redraw becomes one log line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: Optional[str] = None, unit: str = "it"):
    """A tqdm bar on stderr whose time estimate is steady: the rate is the mean since the start
    (smoothing 0), not the last few updates. Off a terminal it writes a plain line every
    LOG_PROGRESS_INTERVAL_S seconds."""
    from tqdm import tqdm  # lazy: only the long commands draw bars

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, smoothing=0.0, dynamic_ncols=tty,
                file=sys.stderr if tty else _Lines(sys.stderr),
                mininterval=TTY_PROGRESS_INTERVAL_S if tty else LOG_PROGRESS_INTERVAL_S)
