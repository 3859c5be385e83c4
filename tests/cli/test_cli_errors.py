"""A user error of any subcommand is one line, `brownout CMD: error: --flag: what is expected`,
and exit code 2, with no traceback; defaults resolve to the embedded model and its united
experts. In-process (`main(argv)`) except where the real entry point is the point."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from brownout.cli import build_parser, main
from brownout.cliutil import flag_name, progress, resolve_model, resolve_united
from brownout.defaults import ASSETS, default_model_dir, default_united_dir
from brownout.types import ValidationError

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, non-empty stderr lines) of `brownout ARGV`."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def _one_line(argv: list[str], capsys, prog: str, flag: str) -> str:
    rc, lines = _run(argv, capsys)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: {flag}: "), lines[0]
    return lines[0]


@pytest.fixture
def other_model(tmp_path) -> Path:
    """A checkpoint directory that is not the embedded model (its config only: the errors
    under test come before any weight is read)."""
    model = tmp_path / "other"
    model.mkdir()
    shutil.copy(Path(default_model_dir()) / "config.json", model / "config.json")
    return model


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "t.txt"
    path.write_text("Once upon a time. " * 50)
    return path


# ---- the cases ------------------------------------------------------------------
def test_eval_without_text_names_the_flag(capsys):
    line = _one_line(["eval", "perplexity"], capsys, "brownout eval perplexity", "--text")
    assert "required" in line


def test_eval_model_that_is_no_checkpoint(tmp_path, text, capsys):
    line = _one_line(["eval", "perplexity", "--text", str(text), "--model", str(tmp_path / "nowhere")],
                     capsys, "brownout eval perplexity", "--model")
    assert "config.json" in line and "brownout/assets/demo/model" in line


def test_eval_below_tau_one_without_united_experts(other_model, text, capsys):
    line = _one_line(["eval", "perplexity", "--text", str(text), "--model", str(other_model),
                      "--tau", "1,0.5"], capsys, "brownout eval perplexity", "--united-experts")
    assert "tau below 1" in line


def test_eval_bad_ranges_and_files(tmp_path, text, capsys):
    _one_line(["eval", "perplexity", "--text", str(text), "--tau", "2"], capsys,
              "brownout eval perplexity", "--tau")
    _one_line(["eval", "perplexity", "--text", str(text), "--window", "0"], capsys,
              "brownout eval perplexity", "--window")
    _one_line(["eval", "perplexity", "--text", str(text), "--top-k", "0"], capsys,
              "brownout eval perplexity", "--top-k")
    _one_line(["eval", "perplexity", "--text", str(tmp_path)], capsys, "brownout eval perplexity", "--text")
    _one_line(["eval", "choice", "--data", str(tmp_path / "none.jsonl")], capsys,
              "brownout eval choice", "--data")
    _one_line(["eval", "perplexity", "--text", str(text), "--out", str(tmp_path)], capsys,
              "brownout eval perplexity", "--out")
    _one_line(["eval", "perplexity", "--text", str(text), "--record"], capsys,  # not the package's set
              "brownout eval perplexity", "--record")


def test_eval_text_too_short_names_the_flag(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    line = _one_line(["eval", "perplexity", "--text", str(short), "--device", "cpu", "--tau", "1"],
                     capsys, "brownout eval perplexity", "--text")
    assert "lower --window or --batch-tokens" in line


def test_unite_errors(tmp_path, capsys):
    _one_line(["unite", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "u")], capsys,
              "brownout unite", "--model")
    _one_line(["unite"], capsys, "brownout unite", "--out")
    _one_line(["unite", "--way", "1", "--out", str(tmp_path / "u")], capsys, "brownout unite", "--way")
    _one_line(["unite", "--method", "distill", "--out", str(tmp_path / "u")], capsys,
              "brownout unite", "--calibration")
    _one_line(["unite", "--method", "frequency", "--calibration", str(tmp_path / "none.txt"),
               "--out", str(tmp_path / "u")], capsys, "brownout unite", "--calibration")


def test_serve_and_generate_errors(tmp_path, other_model, capsys):
    _one_line(["serve", "--model", str(tmp_path / "nowhere")], capsys, "brownout serve", "--model")
    _one_line(["serve", "--united-experts", str(tmp_path)], capsys, "brownout serve", "--united-experts")
    _one_line(["serve", "--slo-shrink-factor", "1.5"], capsys, "brownout serve", "--slo-shrink-factor")
    _one_line(["generate", "hi", "--model", str(other_model), "--tau", "0.5"], capsys,
              "brownout generate", "--united-experts")
    _one_line(["generate", "hi", "--max-tokens", "0"], capsys, "brownout generate", "--max-tokens")


def test_bench_and_simulate_errors(tmp_path, capsys):
    _one_line(["bench", "--out", str(tmp_path)], capsys, "brownout bench", "--url")
    _one_line(["bench", "--url", "http://x", "--workload", "poisson:rate=-1,duration=1", "--out",
               str(tmp_path)], capsys, "brownout bench", "--workload")
    _one_line(["simulate", "--workload", "poisson:rate=1,duration=1", "--out", str(tmp_path),
               "--slo-ttft", "0"], capsys, "brownout simulate", "--slo-ttft")
    _one_line(["simulate", "--workload", "poisson:rate=1,duration=1", "--out", str(tmp_path),
               "--profile", "nowhere"], capsys, "brownout simulate", "--profile")
    _one_line(["bench", "compare", "--runs", str(tmp_path / "none"), "--out", str(tmp_path)], capsys,
              "brownout bench", "--runs")


def test_parse_errors_are_one_line(capsys):
    _one_line(["serve", "--device", "tpu"], capsys, "brownout serve", "--device")
    _one_line(["serve", "--port", "x"], capsys, "brownout serve", "--port")
    rc, lines = _run([], capsys)
    assert rc == 2 and lines == ["brownout: error: COMMAND: required"]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValidationError):
        main(["--debug", "serve", "--model", str(tmp_path / "nowhere")])


def test_the_entry_point_prints_one_line():
    """Through the real process: the one line on stderr, exit code 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "brownout.cli", "eval", "perplexity", "--text", "F"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "brownout eval perplexity: error: --text: expected a readable file, got F (no such file)"]


# ---- defaults ---------------------------------------------------------------------------
def test_model_defaults_to_the_embedded_one():
    embedded = default_model_dir()
    assert resolve_model(None) == embedded
    assert Path(resolve_model(str(ASSETS / "demo"))) == Path(embedded)  # the README's path
    assert resolve_model("cpu-moe", dummy=True) == "cpu-moe"
    assert resolve_united(None, embedded) == default_united_dir(4)
    assert resolve_united("average:2", embedded) == "average:2"
    assert resolve_united("none", embedded) is None


def test_eval_defaults(other_model, text):
    from brownout.eval.cli import DEFAULT_TAUS, parse_taus, resolve_args

    def resolved(*argv):
        args = build_parser(["eval"]).parse_args(["eval", "perplexity", "--text", str(text), *argv])
        resolve_args(args)
        return args

    args = resolved()
    assert args.model == default_model_dir() and args.united == default_united_dir(4)
    assert args.tau == parse_taus(DEFAULT_TAUS)
    assert resolved("--model", str(ASSETS / "demo")).united == default_united_dir(4)
    assert resolved("--model", str(other_model)).tau == [1.0]  # no united experts: tau 1 only
    former = resolved("--model", str(other_model), "--united", default_united_dir(2), "--tau", "0")
    assert former.united == default_united_dir(2) and former.tau == [0.0]


def test_serve_defaults_and_startup_line(other_model):
    from brownout.api.launch import brownout_summary, build_configs

    def summary(*argv):
        args = build_parser(["serve"]).parse_args(["serve", *argv])
        engine, _ = build_configs(args, {})
        return engine, brownout_summary(engine)

    engine, line = summary()
    assert engine.brownout.united_experts == default_united_dir(4)
    assert line.startswith("brownout is off") and "united-way4 (way 4" in line
    assert "--slo-policy predictive" in line
    engine, line = summary("--slo-policy", "aimd")
    assert line.startswith("brownout on: policy aimd") and "way 4" in line
    assert summary("--fixed-tau", "0.5")[1].startswith("brownout on: fixed tau 0.5")
    engine, line = summary("--model", str(other_model))
    assert engine.brownout.united_experts is None and "--united-experts DIR" in line
    assert summary("--model", str(other_model), "--slo-policy", "predictive")[1].startswith(
        "brownout stays off")
    assert summary("--load-format", "dummy", "--model", "cpu-moe")[0].brownout.united_experts is None


def test_flag_names():
    assert flag_name("united_experts") == "--united-experts"
    assert flag_name("--model") == "--model"
    assert flag_name("workload.rate") == "--workload: rate"


# ---- LLM.chat and progress --------------------------------------------------------------
def test_chat_runs_to_the_context_by_default():
    from brownout.config import ServerConfig
    from brownout.engine.llm import LLM

    seen = {}
    llm = LLM.__new__(LLM)  # no model: only the defaulting of max_tokens is under test
    llm.generate = lambda prompts, params: seen.setdefault("params", params)
    for context, expected in ((100, 90), (100_000, ServerConfig().max_tokens_limit)):
        llm.engine = SimpleNamespace(apply_chat_template=lambda conv: [1] * 10, max_model_len=context)
        seen.clear()
        llm.chat([{"role": "user", "content": "Hello"}])
        assert [p.max_tokens for p in seen["params"]] == [expected]


def test_progress_off_a_terminal_writes_lines(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress(3, desc="unite", unit="group") as bar:
        assert bar.smoothing == 0  # the rate is the mean since the start: a steady estimate
        bar.update(3)
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert lines and all("\r" not in line for line in lines) and "3/3" in lines[-1]


def test_manifest_summary_names_way_and_method():
    from brownout.cliutil import united_summary

    manifest = json.loads((Path(default_united_dir(4)) / "manifest.json").read_text())
    text = united_summary(default_united_dir(4))
    assert f"way {manifest['way']}" in text and manifest["method"] in text
    assert united_summary(None) == "none"


def test_replicas_without_ray_installed_is_one_line(capsys, monkeypatch):
    """Ray Serve is an optional extra: without it, --replicas says how to install it."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    line = _one_line(["serve", "--replicas", "2"], capsys, "brownout serve", "--replicas")
    assert "brownout-serve[replicas]" in line


def test_serve_rung_prices_flag(tmp_path):
    from brownout.api.launch import build_configs

    def configs(*argv):
        return build_configs(build_parser(["serve"]).parse_args(["serve", *argv]), {})[0]

    prices = ASSETS / "demo" / "ladder-prices.json"
    assert configs("--rung-prices", str(prices)).brownout.rung_prices == str(prices.resolve())
    bad = tmp_path / "bad.json"
    bad.write_text("{\"prices\": []}")
    with pytest.raises(ValidationError, match="rung_prices: .*is not a price table"):
        configs("--rung-prices", str(bad))
    assert configs().brownout.rung_prices is None
    with pytest.raises(ValidationError, match="rung_prices: expected a price table file"):
        configs("--rung-prices", str(tmp_path / "missing.json"))
