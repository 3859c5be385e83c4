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


# three sequences: a 19-token prefill step, then decode steps of 3 rows
ENGINE_PROMPTS = [[5, 17, 42, 9, 88, 120], list(range(30, 42)), [7]]


def engine_tokens_with_switch(model_dir, monkeypatch, switch, spied) -> tuple[dict, list]:
    """Greedy tokens of the engine on its Triton path (interpreted without CUDA) with the
    module attribute `switch` = (module, name) off and then on, and the row counts of the
    calls made to `spied` = (module, function name): ({False: tokens, True: tokens}, rows)."""
    from brownout.config import CacheConfig
    from brownout.engine.llm import LLM
    from brownout.types import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    calls: list = []
    module, name = spied
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    tokens = {}
    for on in (False, True):
        monkeypatch.setattr(*switch, on)
        llm = LLM(str(model_dir), device=DEVICE, dtype="float32", enforce_eager=True,
                  cache=CacheConfig(num_blocks=64))
        llm.engine.runner.use_kernels = True  # the CPU engine runs torch; here the kernels
        tokens[on] = [c.token_ids for c in llm.generate(ENGINE_PROMPTS, params)]
        assert bool(calls) == on
    return tokens, calls
