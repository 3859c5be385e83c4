"""Kernels compiled for a Hopper GPU (sm_90) on any machine, without one.

Triton's CPU interpreter runs a kernel's Python as Python: it does not type the kernel the
way the compiler does, so a kernel can pass every interpreter test and still fail to
compile for a GPU (a name a branch rebinds to a tensor of another shape is one such case).
The triton wheel carries the compiler and ptxas, so these tests compile kernels to a cubin
for sm_90 here, in a fresh process that imports triton for compiled kernels:

- the launches the engine makes: a fresh process runs the tiny models' prefill and decode
  steps on the Triton path under the interpreter and records every launch's kernel,
  argument types and constants; each distinct one is then compiled, with PDL on and off;
- a few launches at a real model's shapes (the greedy kernel over 151,936 logits, the QKV
  launch with 128-wide heads, the skinny GEMM), with PDL on and off;
- launches of every kernel the kernel tests launch (among them those the CPU engine does not
  make: its norms, rotary, the skinny GEMM and the greedy kernel serve CUDA tensors only,
  brownout routing needs united experts), from `sm90_launches.json`: argument types and
  constants recorded, as the engine's are here, from those tests under the interpreter, as
  few launches a kernel as cover every value its tests give each branch-selecting constant
  (the compiler types only the branch a constant selects). A kernel whose arguments change
  fails with the names it lacks; `python tests/kernels/test_sm90_compile.py` records the
  file again.

Every kernel defined in `brownout/kernels` must be in one of these sets. The compiler here
sees plain 32-bit integers where a GPU launch may specialise an argument equal to 1 or
divisible by 16; those variants are not compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SM90 = ("cuda", 90, 32)  # an H100 / H200: the GPUs PDL's instructions need
ROOT = Path(__file__).resolve().parents[2]


def _qkv_case() -> dict:
    types = {p: "*bf16" for p in ("x_ptr", "w_ptr", "b_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")}
    types.update({"ws_ptr": "*fp32", "count_ptr": "*i32", "pos_ptr": "*i64", "cos_ptr": "*fp32",
                  "sin_ptr": "*fp32", "slot_ptr": "*i64"})
    for name in ("M", "K", "K_PER_SPLIT", "Hq", "Hkv", "stride_xm", "stride_wn", "stride_qt", "stride_qh",
                 "stride_c", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh"):
        types[name] = "i32"
    consts = {"HAS_BIAS": True, "SPLIT_K": 8, "BLOCK_M": 16, "HEAD_DIM": 128, "BLOCK_K": 32, "KV_BLOCK": 16,
              "DOT_F32": False, "PRECISION": None, "PF_LINES": 4, "PF_STEP": 64}
    return dict(module="brownout.kernels.skinny_gemm", kernel="_qkv_rope_kernel", types=types,
                consts=consts, options={"num_warps": 4, "num_stages": 3})


# launches at a real model's shapes: (module, kernel, argument types, constants, options);
# the skinny GEMM serves CUDA tensors only (`DecodeLinear`), so the CPU engine never launches it
REAL_SHAPES = [
    dict(module="brownout.kernels.skinny_gemm", kernel="_skinny_kernel",
         types={"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32",
                "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32",
                "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"},
         consts={"HAS_BIAS": False, "SPLIT_K": 4, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128,
                 "DOT_F32": False, "PRECISION": None, "PF_LINES": 4, "PF_STEP": 64},
         options={"num_warps": 4, "num_stages": 3}),
    dict(module="brownout.kernels.greedy", kernel="_argmax_kernel",
         types={"x_ptr": "*bf16", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "count_ptr": "*i32",
                "out_ptr": "*i64", "V": "i32", "stride_x": "i32"},
         consts={"CHUNK": 4096, "PIECES": 38, "PIECES_PAD": 64}, options={"num_warps": 4}),
    _qkv_case(),
]

# run in a fresh process under the interpreter: the tiny model's steps on the Triton path,
# every kernel launch recorded as its module, name, argument types, constants and options
RECORD = r"""
import inspect, json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from triton.runtime.interpreter import InterpretedFunction

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages")
seen = {}
real_run = InterpretedFunction.run

def run(self, *args, grid, warmup, **kwargs):
    fn = self.fn
    names = list(self.arg_names)
    bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()  # a parameter left at its default is recorded at that default
    values = dict(bound.arguments)
    anns = getattr(fn, "__annotations__", {})
    types, consts = {}, {}
    for name in names:
        v = values.get(name)
        if "constexpr" in str(anns.get(name, "")):
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            if v.dtype not in DTYPES:  # a dtype the step's launches never pass: not recorded
                return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
            types[name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            types[name] = "i1"
        elif isinstance(v, int):
            types[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            types[name] = "fp32"
        else:
            consts[name] = v  # None: an unused optional argument, a constant to the compiler
    rec = dict(module=fn.__module__, kernel=fn.__name__, types=types, consts=consts,
               options={k: kwargs[k] for k in OPTIONS if k in kwargs})
    seen.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)
    return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

InterpretedFunction.run = run
from brownout.config import CacheConfig
from brownout.engine.llm import LLM
from brownout.types import SamplingParams

for model in sys.argv[2:]:
    llm = LLM(model, device="cpu", dtype="bfloat16", enforce_eager=True, cache=CacheConfig(num_blocks=64),
              fold_shared_expert=True)
    llm.engine.runner.use_kernels = True
    llm.generate([[5, 17, 42, 9, 88, 120], list(range(30, 42)), [7]],
                 SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
if os.environ.get("RECORD_TESTS"):  # kernel test files whose launches to record as well
    import pytest
    pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow", *os.environ["RECORD_TESTS"].split()])
json.dump(list(seen.values()), open(sys.argv[1], "w"), default=str)
"""

COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

cases, target = json.load(open(sys.argv[1])), tuple(json.loads(sys.argv[2]))
failed, built, wanted = [], 0, 0
for case in cases:
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    for use_pdl in ((False, True) if "USE_PDL" in fn.arg_names else (None,)):
        consts = dict(case["consts"])
        if use_pdl is not None:
            consts["USE_PDL"] = use_pdl
        signature = {name: case["types"].get(name, "constexpr") for name in fn.arg_names}
        wanted += 1
        try:
            missing = [n for n in fn.arg_names if n not in case["types"] and n not in consts]
            assert not missing, f"no type or constant for {missing}"
            out = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                 target=GPUTarget(*target), options=case["options"])
            assert out.asm["cubin"], "no cubin"
            built += 1
        except Exception as e:
            failed.append(f"{case['kernel']} (PDL {use_pdl}, {case['consts']}): {type(e).__name__}: {str(e)[-1500:]}")
print(built, wanted)
if failed:
    sys.exit("\n\n".join(failed))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the compiler's default, named to silence its warning
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


SUBPROCESS_S = 900  # a fresh process's limit: compiles run a few seconds each on two cores
LAUNCHES = Path(__file__).parent / "sm90_launches.json"


def _compile(cases: list[dict], tmp_path: Path) -> int:
    """Compile every case (with PDL on and off where the kernel takes it) -> cubins built,
    which the subprocess also checks against those it was asked for."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    res = subprocess.run([sys.executable, "-c", COMPILE, str(path), json.dumps(SM90)], env=_env(),
                         capture_output=True, text=True, timeout=SUBPROCESS_S)
    assert res.returncode == 0, res.stderr[-6000:]
    built, wanted = map(int, res.stdout.split()[-2:])
    assert built == wanted >= len(cases)
    return built


def _defined_kernels() -> set[str]:
    """Every `_..._kernel` triton function in brownout/kernels."""
    import ast

    names = set()
    for path in (ROOT / "brownout" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


def test_real_shape_and_recorded_launches_compile_for_sm90(tmp_path):
    recorded = json.loads(LAUNCHES.read_text())
    assert _compile(REAL_SHAPES + recorded, tmp_path) >= len(REAL_SHAPES) + len(recorded)


def test_every_kernel_the_engine_launches_compiles_for_sm90(tiny_models, tmp_path):
    """The tiny models' steps (a folded shared expert with the qkv bias, and none) launch the
    step's kernels; each distinct launch compiles for sm_90 with PDL off and on."""
    record = tmp_path / "launches.json"
    env = dict(_env(), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", RECORD, str(record), str(tiny_models["qwen2_moe"]),
                          str(tiny_models["mixtral"])], env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_S)
    assert res.returncode == 0, res.stderr[-6000:]
    cases = json.loads(record.read_text())
    kernels = {c["kernel"] for c in cases}
    for name in ("_qkv_rope_kernel", "_attn_kernel", "_gate_up_kernel", "_down_kernel"):
        assert name in kernels, sorted(kernels)
    assert _compile(cases, tmp_path) >= len(cases)
    # every kernel of the package is compiled by this test or the one above
    covered = kernels | {c["kernel"] for c in REAL_SHAPES + json.loads(LAUNCHES.read_text())}
    assert _defined_kernels() <= covered, sorted(_defined_kernels() - covered)


# the kernel test files whose launches `sm90_launches.json` records
RECORDED_FROM = ["tests/kernels/test_norm_rope.py", "tests/kernels/test_greedy.py", "tests/kernels/test_paged_attention.py",
                 "tests/kernels/test_brownout_routing_triton.py", "tests/kernels/test_routing_triton.py",
                 "tests/kernels/test_fused_moe.py", "tests/kernels/test_router_topk.py", "tests/kernels/test_skinny_gemm.py"]


def _branch_values(case: dict) -> set:
    """The (constant, value) pairs of a launch that select branches: booleans, None, and
    whether an integer constant is zero."""
    out = set()
    for name, value in case["consts"].items():
        if isinstance(value, bool) or value is None:
            out.add((name, value))
        elif isinstance(value, int):
            out.add((name, value == 0))
    return out


def cover(cases: list[dict]) -> list[dict]:
    """Per kernel, as few of its launches as give every branch value its launches give (greedy
    set cover; ties to the launch with the most bf16 tensors)."""
    by_kernel: dict[str, list[dict]] = {}
    for case in cases:
        by_kernel.setdefault(case["kernel"], []).append(case)
    picked = []
    for kernel in sorted(by_kernel):
        todo = set().union(*(_branch_values(c) for c in by_kernel[kernel]))
        while True:
            best = max(by_kernel[kernel], key=lambda c: (len(_branch_values(c) & todo),
                                                          sum(t == "*bf16" for t in c["types"].values())))
            picked.append(best)
            todo -= _branch_values(best)
            if not todo:
                break
    return sorted(picked, key=lambda c: (c["module"], c["kernel"], json.dumps(c, sort_keys=True)))


def record_launches(out: Path) -> None:
    """Write `sm90_launches.json`: the `cover` of the launches the kernel tests make."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        everything = Path(tmp) / "all.json"
        env = dict(_env(), TRITON_INTERPRET="1", RECORD_TESTS=" ".join(RECORDED_FROM))
        subprocess.run([sys.executable, "-c", RECORD, str(everything)], env=env, check=True, cwd=ROOT)
        cases = cover(json.loads(everything.read_text()))
    out.write_text("[\n" + ",\n".join(json.dumps(c, sort_keys=True) for c in cases) + "\n]\n")


if __name__ == "__main__":
    record_launches(LAUNCHES)
