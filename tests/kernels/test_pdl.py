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
WRITES = {"store", "atomic_add", "atomic_cas", "atomic_xchg", "atomic_max", "atomic_min", "atomic_and",
          "atomic_or", "atomic_xor"}
MEMORY = WRITES | {"load", "inline_asm_elementwise"}  # what a helper called before the wait may not do
# what a kernel may read before its wait: what the kernel two launches back wrote (rule 2)
PRE_WAIT_READS = {"_down_kernel": {"block_slot_ptr"}}  # the align's slots (align, gate/up, down)
# what a kernel may ask L2 for before its wait: weights, which no kernel of a step writes
PREFETCHED = {"_skinny_kernel": {"w_ptr"}, "_down_kernel": {"w2_ptr"}}


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def _pdl_kernels():
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in _functions(path).values():
            if any(a.arg == "USE_PDL" for a in node.args.args) and node.name.startswith("_"):
                yield path.name, node


def _pointers(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id.endswith("_ptr")}


def _touches_memory(fn: ast.FunctionDef, functions: dict, seen: set) -> bool:
    """Whether a helper (or a helper it calls, in the same module) loads, stores or runs asm."""
    if fn.name in seen:
        return False
    seen.add(fn.name)
    for call in _calls(fn, set(functions) | MEMORY):
        name = call.func.id if isinstance(call.func, ast.Name) else call.func.attr
        if name in MEMORY or _touches_memory(functions[name], functions, seen):
            return True
    return False


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
    functions = _functions(KERNEL_DIR / where)
    helpers = set(functions) - {"pdl_wait", "pdl_launch", "prefetch_l2", kernel.name}
    for stmt in body[:first]:
        assert not _calls(stmt, WRITES), f"{where}:{kernel.name} writes before pdl_wait"
        assert not any(isinstance(n, ast.Return) for n in ast.walk(stmt)), \
            f"{where}:{kernel.name} can return before pdl_wait"
        for call in _calls(stmt, helpers):
            assert not _touches_memory(functions[call.func.id], functions, set()), \
                f"{where}:{kernel.name} calls {call.func.id}, which touches memory, before pdl_wait"
        for call in _calls(stmt, {"load"}):  # reads before the wait: the prefetch branch's (rule 2)
            assert _under_use_pdl(stmt), f"{where}:{kernel.name} reads outside `if USE_PDL:` before pdl_wait"
            assert _pointers(call.args[0]) <= PRE_WAIT_READS.get(kernel.name, set()), \
                f"{where}:{kernel.name} reads {_pointers(call.args[0])} before pdl_wait"
        for call in _calls(stmt, {"prefetch_l2"}):
            assert _pointers(call.args[0]) <= PREFETCHED.get(kernel.name, set()), \
                f"{where}:{kernel.name} prefetches {_pointers(call.args[0])}, not weights, before pdl_wait"
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_chained_kernels_under_pdl_match_ordinary_launches(monkeypatch):
    """Back-to-back fused MoE calls (the small, sorted and atomics aligns) and a QKV-wide
    skinny GEMM with split K, replayed in one CUDA graph, give bit-identical outputs with
    and without PDL: a kernel that reads before its wait, or a counter reset racing the next
    launch, would show here."""
    from brownout.kernels import fused_moe as fm
    from brownout.kernels import skinny_gemm as sk

    g = torch.Generator().manual_seed(0)
    D, inter, S, k = 2048, 1408, 94, 8
    w13 = (0.02 * torch.randn(S, 2 * inter, D, generator=g)).to("cuda", torch.bfloat16)
    w2 = (0.02 * torch.randn(S, D, inter, generator=g)).to("cuda", torch.bfloat16)
    wq = (0.02 * torch.randn(6144, D, generator=g)).to("cuda", torch.bfloat16)
    inputs = []
    for T in (4, 16, 128):
        ids = torch.randint(-1, S, (T, k), generator=g, dtype=torch.int32).cuda()
        inputs.append((torch.randn(T, D, generator=g).to("cuda", torch.bfloat16), ids,
                       torch.rand(T, k, generator=g).cuda()))
    xq = torch.randn(8, D, generator=g).to("cuda", torch.bfloat16)

    def step():
        outs = [fm.fused_moe(x, w13, w2, w, ids) for x, ids, w in inputs]
        return outs + [sk.skinny_linear(xq, wq), sk.skinny_linear(outs[0][:, :D].contiguous(), wq)]

    results = {}
    with torch.inference_mode():
        for on in (True, False):
            monkeypatch.setattr(pdl, "ENABLED", on)
            step()  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = step()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            results[on] = [o.clone() for o in outs]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)
