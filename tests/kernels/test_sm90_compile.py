"""Kernels compiled for a Hopper GPU (sm_90) on any machine, without one.

Triton's CPU interpreter runs a kernel's Python as Python: it does not type the kernel the
way the compiler does, so a kernel can pass every interpreter test and still fail to
compile for a GPU (a name a branch rebinds to a tensor of another shape is one such case).
The triton wheel carries the compiler and ptxas, so this test compiles the kernels to a
cubin for sm_90 here, in a fresh process that imports triton for compiled kernels, with the
argument types and constants of the launches the engine makes: with PDL on and off, and on
every branch a constant selects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SM90 = ("cuda", 90, 32)  # an H100 / H200: the GPUs PDL's instructions need

# (module, kernel, argument types, constants): each is compiled once per entry; the types
# are those of a bf16 model's decode launch (pointers "*dtype", scalars "i32" / "fp32")
CASES = [
    ("greedy", "_argmax_kernel",
     {"x_ptr": "*bf16", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "count_ptr": "*i32",
      "out_ptr": "*i64", "V": "i32", "stride_x": "i32"},
     {"CHUNK": 4096, "PIECES": 38, "PIECES_PAD": 64}),
]


def _qkv_case(norm_in: bool) -> tuple:
    ptrs = ["x_ptr", "w_ptr", "b_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr", "y_ptr", "nw_ptr", "h_ptr", "sum_ptr"]
    types = {p: "*bf16" for p in ptrs}
    types.update({"ws_ptr": "*fp32", "count_ptr": "*i32", "pos_ptr": "*i64", "cos_ptr": "*fp32",
                  "sin_ptr": "*fp32", "slot_ptr": "*i64", "ids_ptr": "*i32", "eps": "fp32"})
    for name in ("M", "K", "K_PER_SPLIT", "Hq", "Hkv", "stride_xm", "stride_wn", "stride_qt", "stride_qh",
                 "stride_c", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh"):
        types[name] = "i32"
    consts = {"HAS_BIAS": True, "SPLIT_K": 8, "BLOCK_M": 16, "HEAD_DIM": 128, "BLOCK_K": 32, "KV_BLOCK": 16,
              "DOT_F32": False, "PRECISION": None, "PF_LINES": 4, "PF_STEP": 64, "NORM_IN": norm_in,
              "TOP_K": 8 if norm_in else 1, "NORM_ROWS": 4 if norm_in else 1, "BLOCK_D": 2048 if norm_in else 16}
    return ("skinny_gemm", "_qkv_rope_kernel", types, consts)


CASES += [_qkv_case(False), _qkv_case(True)]

SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, kernel, types, consts, target, use_pdl = json.loads(sys.argv[1])
fn = getattr(importlib.import_module("brownout.kernels." + module), kernel)
consts = dict(consts, USE_PDL=use_pdl)
signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
missing = [n for n in fn.arg_names if n not in types and n not in consts]
if missing:
    sys.exit(f"no type or constant for {missing}")
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                          target=GPUTarget(*target), options={"num_warps": 4})
assert compiled.asm["cubin"], "no cubin"
"""


@pytest.mark.parametrize("use_pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[3].items() if k == 'NORM_IN')}")
def test_kernel_compiles_for_sm90(case, use_pdl):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the compiler's default, named to silence its warning
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([*case, SM90, use_pdl])], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
