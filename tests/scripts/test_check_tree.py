"""scripts/check_tree.py: large tracked files fail the check outside brownout/assets/."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_tree.py"
BIG = 3 * 1024 * 1024  # over the 2 MiB limit


def _module():
    spec = importlib.util.spec_from_file_location("check_tree", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _repo(root: Path, files: dict[str, int]) -> Path:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    return root


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@needs_git
def test_a_large_tracked_file_outside_the_assets_fails(tmp_path, capsys):
    root = _repo(tmp_path, {"README.md": 10, "benchmarks/results/raw/run.tgz": BIG,
                            "brownout/assets/demo/model.safetensors": BIG})
    assert _module().main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "benchmarks/results/raw/run.tgz" in err and "model.safetensors" not in err


@needs_git
def test_large_files_in_the_assets_and_untracked_files_pass(tmp_path):
    root = _repo(tmp_path, {"README.md": 10, "brownout/assets/demo/model.safetensors": BIG})
    (root / "demo-out.tgz").write_bytes(b"x" * BIG)  # untracked: not the repository's concern
    assert _module().main(["--root", str(root)]) == 0


def test_outside_a_git_checkout_the_check_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above
    (tmp_path / "big.bin").write_bytes(b"x" * BIG)
    assert _module().main(["--root", str(tmp_path)]) == 0
    assert "not a git checkout" in capsys.readouterr().out
