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
ASM = "inline_asm_elementwise"  # may touch memory: a helper running it is held to the write rule
PDL_CALLS = {"pdl_wait", "pdl_launch", "prefetch_l2"}
# what a kernel may read before its wait (rule 2): what the kernel two launches back wrote,
# or, for the gate/up GEMM under rule 4 (or direct mode's x_settled), its input x
PRE_WAIT_READS = {
    # the align's slots (align, gate/up, down), or in direct mode the ids (routing, gate/up, down)
    "_down_kernel": {"block_slot_ptr"},
    # the shared slots' programs: the MoE input and the weights (rule 4)
    "_gate_up_kernel": {"x_ptr", "w13_ptr"},
}
# what a kernel may ask L2 for before its wait: weights, which no kernel of a step writes
# (`_router_topk_kernel`: the router's weight, ahead of the GEMM it runs before its top-k)
PREFETCHED = {"_skinny_kernel": {"w_ptr"}, "_qkv_rope_kernel": {"w_ptr"}, "_down_kernel": {"w2_ptr"},
              "_router_topk_kernel": {"w_ptr"}}
# kernels that may signal before their wait (rule 4), and only under `if EARLY_LAUNCH:`: the
# aligns, when `fused_moe`'s caller vouches for the gate/up GEMM's reads before its wait
EARLY_SIGNAL = {"_align_kernel", "_align_small_kernel", "_align_sorted_kernel"}
EARLY_FLAG = "EARLY_LAUNCH"


def _functions(tree) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def _pdl_kernels():
    for path in sorted(KERNEL_DIR.glob("*.py")):
        functions = _functions(ast.parse(path.read_text()))
        for node in functions.values():
            if any(a.arg == "USE_PDL" for a in node.args.args) and node.name.startswith("_"):
                yield path.name, node, functions


def _name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")


def _calls(node, names):
    return [c for c in ast.walk(node) if isinstance(c, ast.Call) and _name(c) in names]


def _expr_roots(expr, roots: dict[str, set[str]], helpers: dict | None = None) -> set[str]:
    """The pointer arguments an expression's address can come from: names it uses that are
    pointers or copies of them, except inside a `load`, whose result is data, and inside a
    helper's arguments that none of its return values can point into."""
    out: set[str] = set()
    helpers = helpers or {}

    def visit(n) -> None:
        if isinstance(n, ast.Call) and _name(n) == "load":
            return
        if isinstance(n, ast.Call) and _name(n) in helpers:
            fn = helpers[_name(n)]
            kept = _returned_pointer_params(fn, helpers)
            params = [a.arg for a in fn.args.args]
            for i, arg in enumerate(n.args):
                if i < len(params) and params[i] in kept:
                    visit(arg)
            for kw in n.keywords:
                if kw.arg in kept:
                    visit(kw.value)
            return
        if isinstance(n, ast.Name) and n.id in roots:
            out.update(roots[n.id])
        for child in ast.iter_child_nodes(n):
            visit(child)
    visit(expr)
    return out


def _returned_pointer_params(fn: ast.FunctionDef, helpers: dict) -> set[str]:
    """The parameters of a helper that one of its return values can point into, whatever
    their names (a helper returning loaded data or indices returns none)."""
    roots = _pointer_roots(fn, {n: f for n, f in helpers.items() if n != fn.name}, every_arg=True)
    return {r for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None
            for r in _expr_roots(n.value, roots)}


def _pointer_roots(kernel: ast.FunctionDef, helpers: dict | None = None,
                   every_arg: bool = False) -> dict[str, set[str]]:
    """Each pointer argument (`*_ptr`) and each local assigned from one (`a_ptrs = x_ptr +
    ...`, `p = q`, `p += BLOCK`, or a helper's return that can point into one), mapped to
    the arguments it can point into. `every_arg`: every argument counts as a pointer (a
    helper's parameters need not be named `*_ptr`)."""
    roots = {a.arg: {a.arg} for a in kernel.args.args if every_arg or a.arg.endswith("_ptr")}
    changed = True
    while changed:  # to a fixed point: copies of copies
        changed = False
        for node in ast.walk(kernel):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AugAssign):
                targets, value = [node.target], node.value
            else:
                continue
            found = _expr_roots(value, roots, helpers)
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and not found <= roots.get(n.id, set()):
                        roots[n.id] = roots.get(n.id, set()) | found
                        changed = True
    return roots


def _writes(fn: ast.FunctionDef, functions: dict, seen: set) -> bool:
    """Whether a helper (or a helper it calls, in the same module) stores, runs atomics or
    inline asm."""
    if fn.name in seen:
        return False
    seen.add(fn.name)
    return any(_name(c) in WRITES | {ASM} or (_name(c) in functions and _writes(functions[_name(c)], functions, seen))
               for c in _calls(fn, WRITES | {ASM} | set(functions)))


def violations(kernel: ast.FunctionDef, functions: dict) -> list[str]:
    """The PDL rules broken on some path through `kernel`: a write, a return, a signal, or a
    read of memory other than PRE_WAIT_READS / PREFETCHED (through the pointer or any copy
    of it) before that path's `pdl_wait`, or a path that never waits. Each `if` is followed
    down both branches; a wait inside a loop does not count (the loop may not run)."""
    found: list[str] = []
    name = kernel.name
    helpers = {n: f for n, f in functions.items() if n not in PDL_CALLS and n != name}
    may_read = PRE_WAIT_READS.get(name, set())
    roots = _pointer_roots(kernel, helpers)

    def before_wait(node, early_ok: bool = False) -> None:
        for call in _calls(node, WRITES | {ASM}):
            found.append(f"{name} writes ({_name(call)}) before pdl_wait, line {call.lineno}")
        if any(isinstance(n, ast.Return) for n in ast.walk(node)):
            found.append(f"{name} can return before pdl_wait, line {node.lineno}")
        for call in _calls(node, {"pdl_launch"}) if not early_ok else []:
            found.append(f"{name} signals before pdl_wait, line {call.lineno}")
        for call in _calls(node, {"load"}):
            if not _expr_roots(call.args[0], roots) <= may_read:
                found.append(f"{name} reads {sorted(_expr_roots(call.args[0], roots))} before pdl_wait, "
                             f"line {call.lineno}")
        for call in _calls(node, {"prefetch_l2"}):
            if not _expr_roots(call.args[0], roots) <= PREFETCHED.get(name, set()):
                found.append(f"{name} prefetches {sorted(_expr_roots(call.args[0], roots))}, not weights, "
                             "before pdl_wait")
        for call in _calls(node, set(helpers)):
            if _writes(helpers[_name(call)], helpers, set()):
                found.append(f"{name} calls {_name(call)}, which writes, before pdl_wait")
            handed = set().union(*(_expr_roots(a, roots, helpers) for a in [*call.args, *(k.value for k in call.keywords)]))
            if not handed <= may_read:
                found.append(f"{name} hands {sorted(handed)} to {_name(call)} before pdl_wait")

    def walk(stmts, waited: bool) -> bool:
        for st in stmts:
            if isinstance(st, ast.If):
                early = name in EARLY_SIGNAL and isinstance(st.test, ast.Name) and st.test.id == EARLY_FLAG
                if not waited:
                    before_wait(st.test)
                    if early:  # rule 4's signal, and nothing else the rules forbid
                        for inner in st.body:
                            before_wait(inner, early_ok=True)
                        continue
                waited = walk(st.body, waited) & walk(st.orelse, waited)
            elif isinstance(st, (ast.For, ast.While)):
                if not waited:
                    before_wait(st.iter if isinstance(st, ast.For) else st.test)
                walk(st.body, waited)
            elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and _name(st.value) == "pdl_wait":
                waited = True
            elif not waited:
                before_wait(st)
        return waited

    if not walk(kernel.body, False):
        found.append(f"{name}: some path never calls pdl_wait")
    return found


KERNELS = list(_pdl_kernels())


def test_every_step_kernel_takes_pdl():
    names = {n.name for _, n, _ in KERNELS}
    for name in ("_skinny_kernel", "_qkv_rope_kernel", "_gate_up_kernel", "_down_kernel", "_attn_kernel", "_merge_kernel",
                 "_rope_write_kv_kernel", "_add_rms_norm_kernel", "_add_slots_rms_norm_kernel",
                 "_topk_kernel", "_router_topk_kernel", "_align_small_kernel", "_plan_kernel",
                 "_route_regs_kernel"):
        assert name in names


@pytest.mark.parametrize("where,kernel,functions", KERNELS, ids=[n.name for _, n, _ in KERNELS])
def test_the_wait_comes_before_any_write_return_signal_or_unlisted_read(where, kernel, functions):
    assert violations(kernel, functions) == [], where


BROKEN = {  # one broken rule each, on one path only
    "reads the previous kernel's output": """
def _k(ids_ptr, out_ptr, USE_PDL: tl.constexpr):
    e = tl.load(ids_ptr)
    pdl_wait(USE_PDL)
    tl.store(out_ptr, e)
""",
    "writes in one branch": """
def _k(out_ptr, n, USE_PDL: tl.constexpr):
    if n > 0:
        tl.store(out_ptr, n)
        pdl_wait(USE_PDL)
    else:
        pdl_wait(USE_PDL)
""",
    "never waits on one branch": """
def _k(out_ptr, n, USE_PDL: tl.constexpr):
    if n > 0:
        pdl_wait(USE_PDL)
    tl.store(out_ptr, n)
""",
    "waits only inside a loop": """
def _k(out_ptr, n, USE_PDL: tl.constexpr):
    for i in range(0, n):
        pdl_wait(USE_PDL)
    tl.store(out_ptr, n)
""",
    "signals first": """
def _k(out_ptr, n, USE_PDL: tl.constexpr):
    pdl_launch(USE_PDL)
    pdl_wait(USE_PDL)
""",
    "returns early": """
def _k(out_ptr, n, USE_PDL: tl.constexpr):
    if n > 0:
        return
    pdl_wait(USE_PDL)
""",
    "hands an output to a reading helper": """
def _read(p):
    return tl.load(p)

def _gate_up_kernel(x_ptr, h_ptr, USE_PDL: tl.constexpr):
    v = _read(h_ptr)
    pdl_wait(USE_PDL)
""",
    "calls a writing helper": """
def _put(p, v):
    tl.store(p, v)

def _gate_up_kernel(x_ptr, USE_PDL: tl.constexpr):
    _put(x_ptr, 1)
    pdl_wait(USE_PDL)
""",
    "reads through a copy of a pointer": """
def _k(ids_ptr, out_ptr, USE_PDL: tl.constexpr):
    p = ids_ptr + 4
    q = p
    e = tl.load(q)
    pdl_wait(USE_PDL)
""",
    "hands a copy of an output pointer to a helper": """
def _read(p):
    return tl.load(p)

def _gate_up_kernel(x_ptr, h_ptr, USE_PDL: tl.constexpr):
    hp = h_ptr
    hp += 16
    v = _read(hp)
    pdl_wait(USE_PDL)
""",
    "an align signals early without its flag": """
def _align_small_kernel(ids_ptr, EARLY_LAUNCH: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_launch(USE_PDL)
    pdl_wait(USE_PDL)
""",
    "an align reads under its early flag": """
def _align_small_kernel(ids_ptr, EARLY_LAUNCH: tl.constexpr, USE_PDL: tl.constexpr):
    if EARLY_LAUNCH:
        pdl_launch(USE_PDL)
        e = tl.load(ids_ptr)
    pdl_wait(USE_PDL)
""",
    "calls a helper that runs inline asm": """
def _asm(p):
    return tl.inline_asm_elementwise("st.global.u32 [$1], 0;", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)

def _k(out_ptr, USE_PDL: tl.constexpr):
    _asm(out_ptr)
    pdl_wait(USE_PDL)
""",
    "reads through a pointer a helper returns": """
def _row(p, i):
    return p + i * 16

def _gate_up_kernel(x_ptr, h_ptr, n, USE_PDL: tl.constexpr):
    if n > 0:
        pdl_wait(USE_PDL)
        q = _row(h_ptr, 2)
    else:
        q = x_ptr
    v = tl.load(q)
    pdl_wait(USE_PDL)
""",
    "prefetches an activation": """
def _skinny_kernel(x_ptr, w_ptr, USE_PDL: tl.constexpr):
    prefetch_l2(x_ptr, USE_PDL)
    pdl_wait(USE_PDL)
""",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_the_check_catches_a_broken_rule(case):
    functions = _functions(ast.parse(BROKEN[case]))
    kernel = [f for f in functions.values() if any(a.arg == "USE_PDL" for a in f.args.args)][0]
    assert violations(kernel, functions), case


def test_the_check_passes_an_align_that_signals_under_its_flag():
    src = """
def _align_small_kernel(ids_ptr, out_ptr, EARLY_LAUNCH: tl.constexpr, USE_PDL: tl.constexpr):
    if EARLY_LAUNCH:
        pdl_launch(USE_PDL)
    pdl_wait(USE_PDL)
    if not EARLY_LAUNCH:
        pdl_launch(USE_PDL)
    tl.store(out_ptr, tl.load(ids_ptr))
"""
    functions = _functions(ast.parse(src))
    assert violations(functions["_align_small_kernel"], functions) == []


def test_the_check_passes_data_a_helper_loaded_after_the_wait_on_another_path():
    """A helper's loaded values are data, not pointers: a value from it on the waited path
    may feed a helper that streams on the other, unwaited path."""
    src = """
def _rows(ids_ptr, i):
    return tl.load(ids_ptr + i), i + 1

def _tile(x_ptr, w13_ptr, r):
    return tl.load(x_ptr + r) * tl.load(w13_ptr)

def _gate_up_kernel(x_ptr, w13_ptr, ids_ptr, h_ptr, n, USE_PDL: tl.constexpr):
    if n > 0:
        r = 0
    else:
        pdl_wait(USE_PDL)
        e, r = _rows(ids_ptr, n)
    h = _tile(x_ptr, w13_ptr, r)
    pdl_wait(USE_PDL)
    tl.store(h_ptr, h)
"""
    functions = _functions(ast.parse(src))
    assert violations(functions["_gate_up_kernel"], functions) == []


def test_the_check_passes_a_kernel_that_streams_before_its_wait():
    src = """
def _tile(x_ptr, w13_ptr):
    return tl.load(x_ptr) * tl.load(w13_ptr)

def _gate_up_kernel(x_ptr, w13_ptr, h_ptr, slot_ptr, n, USE_PDL: tl.constexpr):
    if n > 0:
        h = _tile(x_ptr, w13_ptr)
        pdl_wait(USE_PDL)
    else:
        pdl_wait(USE_PDL)
        h = tl.load(slot_ptr)
    pdl_launch(USE_PDL)
    tl.store(h_ptr, h)
"""
    functions = _functions(ast.parse(src))
    assert violations(functions["_gate_up_kernel"], functions) == []


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
    """Back-to-back fused MoE calls (the small and sorted aligns), a QKV-wide skinny GEMM
    with split K, and a MoE layer's chain (input GEMM, router GEMM, top-k with the folded
    shared expert's columns, the fused MoE with fixed shared blocks, in direct mode at 1 and
    4 rows and with the align signalling early at 8; each also with the router GEMM and top-k
    as one launch; touched counts too), replayed in one CUDA graph, give bit-identical
    outputs with and without PDL: a kernel that reads before its wait, or a counter reset
    racing the next launch, would show here."""
    from brownout.kernels import fused_moe as fm
    from brownout.kernels import skinny_gemm as sk
    from brownout.kernels.routing import SharedSlots
    from brownout.kernels.routing_triton import router_topk, select_experts_triton

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
    wx = (0.02 * torch.randn(D, D, generator=g)).to("cuda", torch.bfloat16)
    wr = torch.randn(61, D, generator=g).to("cuda", torch.bfloat16)  # 60 experts and the shared gate
    shared = SharedSlots(first=S - 4, count=4, gated=True)

    def layer(rows, fused=False):
        x = sk.skinny_linear(xq[:rows], wx)  # the MoE input, written inside the graph
        if fused:  # the router GEMM and the top-k in one launch
            w, ids, _ = router_topk(x, wr, 4, False, num_experts=60, shared=shared)
        else:
            w, ids = select_experts_triton(sk.skinny_linear(x, wr), 4, False, num_experts=60, shared=shared)
        touched = torch.empty((), dtype=torch.int64, device="cuda")
        out = fm.fused_moe(x, w13, w2, w, ids, shared_slots=(shared.first, shared.count), x_settled=True,
                           touched_out=touched, count_slots=shared.first)
        return [out, touched]

    def step():
        outs = [fm.fused_moe(x, w13, w2, w, ids) for x, ids, w in inputs]
        return outs + [sk.skinny_linear(xq, wq), sk.skinny_linear(outs[0][:, :D].contiguous(), wq),
                       *(o for rows in (1, 4, 8) for fused in (False, True) for o in layer(rows, fused))]

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
