"""Every option of every subcommand has a help line stating its default and, where it is a
time, rate or size, its unit; one concept has one flag name across the subcommands."""

from __future__ import annotations

import argparse
import re

import pytest

from brownout.cli import SUBCOMMANDS, build_parser
from brownout.cliutil import HelpFormatter

# an option whose name says it holds a time, a rate or a size
MEASURED = re.compile(r"timeout|interval|window|duration|_s$|slo_|tokens|_len$|bytes|memory|rate|"
                      r"factor|load$")
# words that state a unit (or that the value is a plain fraction or multiplier)
UNITS = re.compile(r"\bseconds?\b|\bms\b|\btokens?\b|\bbytes\b|requests/s|fraction|multiplier|"
                   r"\bthis many\b|\bof 1\b")


def _parsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of `parser` and of every subparser under it."""
    yield prefix or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prefix} {name}".strip())


def _options():
    parser = build_parser([], commands=list(SUBCOMMANDS))
    for name, p in _parsers(parser):
        formatter = HelpFormatter(p.prog)
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:  # a hidden former name or a test seam
                continue
            yield name, action, formatter


OPTIONS = list(_options())


def test_every_subcommand_is_walked():
    walked = {name.split()[0] for name, _, _ in OPTIONS}
    assert set(SUBCOMMANDS) <= walked
    assert len(OPTIONS) > 150


@pytest.mark.parametrize("name,action,formatter", OPTIONS,
                         ids=[f"{n}:{a.dest}" for n, a, _ in OPTIONS])
def test_option_has_help_with_default_and_unit(name, action, formatter):
    text = action.help or ""
    assert text.strip(), f"{name} {action.option_strings or action.dest}: no help line"
    shown = formatter._get_help_string(action) % {"default": action.default}
    takes_value = action.nargs != 0
    optional = action.option_strings and not action.required
    if takes_value and optional:  # a value with a default (or required by a mode): the help says so
        assert re.search(r"default|required", shown, re.I), \
            f"{name} {action.option_strings}: no default in {shown!r}"
    if takes_value and MEASURED.search(action.dest) and action.choices is None:
        assert UNITS.search(shown), f"{name} {action.option_strings}: no unit in {shown!r}"


def test_one_flag_name_per_concept():
    """United experts are --united-experts wherever a subcommand takes them (--united is a
    hidden former name of eval's), and the model is --model."""
    by_command = {}
    for name, action, _ in OPTIONS:
        by_command.setdefault(name, set()).update(action.option_strings)
    flags = set().union(*by_command.values())
    assert "--united" not in flags  # hidden
    for name in ("serve", "generate", "eval perplexity", "eval choice", "demo"):
        assert {"--model", "--united-experts"} <= by_command[name], name
    assert "--model" in by_command["unite"]
    for name in ("serve", "simulate", "bench", "demo"):  # one policy or a comma-separated list
        assert "--slo-policy" in by_command[name] and not {"--policy", "--policies"} & by_command[name]
    for name in ("serve", "simulate", "generate"):
        assert "--fixed-tau" in by_command[name] and "--tau" not in by_command[name]
    for name in ("serve", "generate", "unite", "eval perplexity", "eval choice", "bench", "simulate", "demo"):
        assert "--out" in by_command[name] or name in ("serve", "generate"), name


@pytest.mark.parametrize("argv,dest,value", [
    (["eval", "perplexity", "--text", __file__, "--united", "D"], "united", "D"),
    (["simulate", "--workload", "W", "--out", "O", "--policy", "off"], "policy", "off"),
    (["demo", "--policies", "off"], "policies", "off"),
    (["bench", "--out", "O", "--policy", "aimd"], "policy", "aimd"),
    (["generate", "x", "--tau", "0.5"], "tau", 0.5),
])
def test_former_names_still_parse(argv, dest, value):
    assert getattr(build_parser(argv).parse_args(argv), dest) == value


def test_help_states_the_default_once():
    assert HelpFormatter("x")._get_help_string(
        argparse.Action(["--a"], "a", default=3, help="things (default 3)")) == "things (default 3)"
    assert HelpFormatter("x")._get_help_string(
        argparse.Action(["--a"], "a", default=3, help="things")) == "things (default: %(default)s)"
    assert HelpFormatter("x")._get_help_string(
        argparse.Action(["--a"], "a", default=None, help="things")) == "things"
