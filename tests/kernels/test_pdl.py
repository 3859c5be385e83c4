"""Programmatic dependent launch: the rules of `brownout.kernels.pdl`, checked on the kernels'
source, and the launch options where PDL cannot apply.

A kernel launched with PDL starts while the previous kernel still runs, so a kernel that
reads an earlier kernel's output or writes anything before its `pdl_wait` races with it. The
race only shows on a GPU, and then rarely; the source check catches it on every machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from brownout.kernels import pdl

KERNEL_DIR = Path(pdl.__file__).parent
WRITES = {"store", "atomic_add", "atomic_cas", "atomic_xchg", "atomic_max", "atomic_min"}


def _pdl_kernels():
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(a.arg == "USE_PDL" for a in node.args.args) \
                    and node.name.startswith("_"):
                yield path.name, node


def _calls(node, names):
    return [c for c in ast.walk(node) if isinstance(c, ast.Call)
            and ((isinstance(c.func, ast.Name) and c.func.id in names)
                 or (isinstance(c.func, ast.Attribute) and c.func.attr in names))]


def _under_use_pdl(stmt) -> bool:
    return isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Name) and stmt.test.id == "USE_PDL"


KERNELS = list(_pdl_kernels())


def test_every_step_kernel_takes_pdl():
    names = {n.name for _, n in KERNELS}
    for name in ("_skinny_kernel", "_gate_up_kernel", "_down_kernel", "_attn_kernel", "_merge_kernel",
                 "_rope_write_kv_kernel", "_add_rms_norm_kernel", "_add_slots_rms_norm_kernel",
                 "_topk_kernel", "_align_small_kernel", "_plan_kernel"):
        assert name in names


@pytest.mark.parametrize("where,kernel", KERNELS, ids=[n.name for _, n in KERNELS])
def test_the_wait_comes_before_any_write_return_or_unguarded_read(where, kernel):
    body = kernel.body
    waits = [i for i, s in enumerate(body) if _calls(s, {"pdl_wait"})]
    assert waits, f"{where}:{kernel.name} never calls pdl_wait"
    first = waits[0]
    assert isinstance(body[first], ast.Expr), f"{where}:{kernel.name}: pdl_wait must be a top-level statement"
    for stmt in body[:first]:
        assert not _calls(stmt, WRITES), f"{where}:{kernel.name} writes before pdl_wait"
        assert not any(isinstance(n, ast.Return) for n in ast.walk(stmt)), \
            f"{where}:{kernel.name} can return before pdl_wait"
        if _calls(stmt, {"load"}):  # reads before the wait: only the prefetch branch (rule 2)
            assert _under_use_pdl(stmt), f"{where}:{kernel.name} reads outside `if USE_PDL:` before pdl_wait"
    launches = [c.lineno for c in _calls(kernel, {"pdl_launch"})]
    wait_line = body[first].lineno
    assert launches and min(launches) > wait_line, f"{where}:{kernel.name}: pdl_launch must follow pdl_wait"


def test_no_pdl_off_the_gpu():
    assert pdl.launch_opts(torch.zeros(1)) == {"USE_PDL": False}
    assert not pdl.active(torch.zeros(1))


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", False)
    t = torch.zeros(1, device="cuda") if torch.cuda.is_available() else torch.zeros(1)
    assert pdl.launch_opts(t) == {"USE_PDL": False}
