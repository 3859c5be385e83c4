"""benchmarks/bench_unite_full.py end to end on the CPU with a tiny model: every phase timed,
the full model's figures extrapolated from a truncated run, the united experts loadable."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_unite_full.py"
PHASES = ("write", "unite", "unite.load", "unite.calibration_mix", "unite.save", "eval",
          "eval.load", "eval.score")


def _module():
    spec = importlib.util.spec_from_file_location("bench_unite_full", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from tiny import CORPUS

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(CORPUS * 12)
    return path


def test_bench_unite_full_on_cpu(tiny_models, text_file, tmp_path):
    from brownout.eval.scoring import load_eval_model

    bench = _module()
    tiny = tiny_models["qwen3_moe"]  # 2 layers, 8 experts, top-2
    out = tmp_path / "unite.json"
    rc = bench.main(["--config", str(tiny / "config.json"), "--tokenizer", str(tiny), "--layers", "1",
                     "--calibration", str(text_file), "--calibration-tokens", "512", "--seq-len", "64",
                     "--distill-steps", "5", "--eval-tokens", "256", "--eval-window", "32",
                     "--eval-batch-tokens", "64", "--device", "cpu", "--workdir", str(tmp_path / "work"),
                     "--keep", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    for name in PHASES:
        assert report["phases"][name]["seconds"] > 0, name
        assert report["phases"][name]["rss_peak_bytes"] > 0, name
    assert report["truncated"] and report["layers_run"] == 1 and report["layers_full"] == 2
    assert [e["layer"] for e in report["layers"]] == [0]
    assert report["layers"][0]["capture"]["seconds"] > 0 and report["layers"][0]["build"]["seconds"] > 0
    assert report["checkpoint"]["shards"] == 2  # embedding and head, one decoder layer
    assert [r["tau"] for r in report["eval"]["results"]] == [1.0, 0.0]
    full = report["full_model"]
    assert full["extrapolated"]
    assert full["unite_parts_s"]["build"] == pytest.approx(2 * report["layers"][0]["build"]["seconds"])
    # one layer run per layer's capture: the measured layer's capture time, twice
    assert full["unite_parts_s"]["capture"] == pytest.approx(2 * report["layers"][0]["capture"]["seconds"])
    assert report["weights"]["checkpoint_full_bytes"] > report["weights"]["checkpoint_run_bytes"]
    # the command's defaults (more calibration tokens, more steps) only add time
    assert full["unite_s_at_cli_defaults"] > full["unite_s"]
    assert report["layers"][0]["distill_steps"] > 0

    # the checkpoint and united experts it wrote load as `brownout eval` loads them
    em = load_eval_model(report["model_dir"], report["united_dir"], device="cpu")
    assert em.united["method"] == "distill" and em.loaded.spec.num_layers == 1
    assert all(moe.brownout_ready for moe in em.model.moe_layers())

    md = tmp_path / "table.md"
    assert bench.main(["--render", str(out), "--out", str(md)]) == 0
    text = md.read_text()
    assert "EXTRAPOLATION" in text and "Weights are random (dummy)" in text and "Machine: " in text


def test_capture_extrapolation_is_the_mean_layer_times_the_layers():
    bench = _module()
    phase = {"seconds": 1.0, "gpu_peak_bytes": 0}
    report = {"phases": {k: dict(phase) for k in ("write", "unite", "unite.load", "unite.calibration_mix",
                                                  "unite.save", "eval", "eval.load", "eval.score")},
              "layers": [{"capture": {"seconds": s}, "build": {"seconds": 1.0}} for s in (1.0, 2.0, 6.0)],
              "layers_run": 3, "layers_full": 12, "groups_per_layer": 2, "gpu_peak_bytes": None,
              "weights": {"checkpoint_full_bytes": 4, "checkpoint_run_bytes": 1},
              "cli_defaults": {"calibration_tokens": 1024, "distill_steps": 10},
              "params": {"calibration_tokens": 512}}
    full = bench.extrapolate(report)
    assert full["capture_per_layer_s"] == pytest.approx(3.0)
    assert full["unite_parts_s"]["capture"] == pytest.approx(36.0)  # 3 s x 12 layers
    report["layers_full"] = 3  # whole: the measured sum
    assert bench.extrapolate(report)["unite_parts_s"]["capture"] == pytest.approx(9.0)


def test_stopped_run_keeps_its_phases(tiny_models, text_file, tmp_path, monkeypatch):
    """A run stopped part way (a time limit) still writes the phases it measured."""
    bench = _module()
    tiny = tiny_models["qwen2_moe"]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_eval", stop)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--config", str(tiny / "config.json"), "--tokenizer", str(tiny), "--calibration",
                    str(text_file), "--calibration-tokens", "256", "--seq-len", "64", "--distill-steps", "2",
                    "--device", "cpu", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and "KeyboardInterrupt" in report["stopped_by"]
    assert {"write", "unite", "unite.load"} <= set(report["phases"]) and "eval" not in report["phases"]
    assert [e["layer"] for e in report["layers"]] == [0, 1]
    for name in ("model", "united"):  # removed all the same
        assert not (tmp_path / "work" / name).exists()
    md = tmp_path / "partial.md"
    assert bench.main(["--render", str(out), "--out", str(md)]) == 0
    assert "Stopped before the end" in md.read_text()
