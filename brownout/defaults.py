"""Where the embedded demo model and its united experts live (torch-free, importable anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL_NAME = "brownout-demo"


def default_model_dir() -> str:
    """The embedded demo model shipped inside the package."""
    return str(ASSETS / "demo" / "model")


def default_united_dir(way: int = 4) -> Optional[str]:
    """The demo model's united experts for `way`, if shipped."""
    path = ASSETS / "demo" / f"united-way{way}"
    return str(path) if (path / "manifest.json").is_file() else None
