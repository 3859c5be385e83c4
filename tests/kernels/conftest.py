import pytest
from triton_interpret import CUDA


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Triton's interpreter also reads the variable while kernels run (lazy imports)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
