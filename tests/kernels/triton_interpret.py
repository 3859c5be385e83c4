"""Running Triton kernel tests on a CPU through triton's interpreter.

Triton decorates its own library for the interpreter only if TRITON_INTERPRET is set
before triton is first imported, so `import_kernels` sets it around that import and
restores it after, leaving other modules' view of the environment alone. When triton was
already imported for compiled kernels it returns None, and the test file reruns itself in
a fresh process with `rerun_in_fresh_process`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def import_kernels(name: str):
    """Import a kernel module; without CUDA, under triton's CPU interpreter."""
    if CUDA or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        return importlib.import_module(name)
    tr = sys.modules.get("triton")
    if tr is not None and isinstance(tr.language.zeros, tr.runtime.JITFunction):
        return None  # triton's library was decorated for compiled kernels
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        mod = importlib.import_module(name)
        return mod if mod._kernels_interpreted() else importlib.reload(mod)
    finally:
        del os.environ["TRITON_INTERPRET"]


def rerun_in_fresh_process(path: str) -> None:
    """Triton was imported before a test file could select its interpreter: rerun it apart."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "not gpu", path], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
