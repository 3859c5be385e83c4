"""Kernels: Triton on CUDA (and under its CPU interpreter in tests), torch references elsewhere."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Optional


@functools.cache
def triton_module(name: str) -> Optional[ModuleType]:
    """brownout.kernels.`name` (a Triton module), or None without triton. Callers ask on
    their first CUDA call only, so CPU-only processes never import triton through them."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"brownout.kernels.{name}")
