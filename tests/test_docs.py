"""The documents quote the committed results: the README's results table is what
benchmarks/results_table.py computes from them, and every relative link resolves."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "notebook.md", ROOT / "docs" / "design.md", ROOT / "benchmarks" / "results" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _results_table():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_results_table_is_computed_from_the_committed_results():
    assert _results_table().table() in (ROOT / "README.md").read_text()


def test_relative_links_of_the_documents_resolve():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
