import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_checkpoint(f, root / f) for f in ("qwen2_moe", "mixtral", "qwen3_moe")}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (only present in the development checkout)")
    return SHARED_DATA
