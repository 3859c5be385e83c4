"""Shared fixtures of the simulator tests."""

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def fit_script():
    """benchmarks/fit_profile.py as a module (the benchmark scripts import each other, so
    their folder goes on sys.path)."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("fit_profile", bench / "fit_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
