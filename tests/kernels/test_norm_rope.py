"""Triton RMSNorm and rotary against the torch layers they replace on the GPU.

Without CUDA the kernels run under triton's CPU interpreter; the reference is the torch
code of `RMSNorm` / `Rotary` (which the layers run on the CPU), and a float64 evaluation.
"""

from __future__ import annotations

import pytest
import torch

from brownout.models.layers.common import RMSNorm, Rotary

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process

nr = import_kernels("brownout.kernels.norm_rope")
needs_kernels = pytest.mark.skipif(nr is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(nr is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def torch_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,D", [(1, 64), (7, 100), (33, 256)])
def test_rms_norm_matches_the_layer(dtype, rows, D):
    g = torch.Generator().manual_seed(rows * D)
    norm = RMSNorm(D, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    x = (torch.randn(rows, D, generator=g) * 3).to(DEVICE, dtype)
    ref = torch_rms_norm(norm, x)
    out = nr.rms_norm(x, norm.weight.detach(), norm.eps)
    assert out.dtype == x.dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding step apart at most
        torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1e-2)
    x64 = x.double()
    exact = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps)
    assert (out.double() - exact).abs().max() <= (2e-5 if dtype == torch.float32 else 5e-2)


@needs_kernels
def test_rms_norm_of_a_strided_view_and_empty_input():
    x = torch.randn(5, 3, 64).to(DEVICE)[:, 1]  # rows 192 apart
    w = torch.rand(64).to(DEVICE)
    torch.testing.assert_close(nr.rms_norm(x, w, 1e-5), torch_rms_norm(_norm(w, 1e-5), x))
    assert nr.rms_norm(torch.empty(0, 64, device=DEVICE), w, 1e-5).shape == (0, 64)
    with pytest.raises(ValueError, match="last dim"):
        nr.rms_norm(x, torch.ones(32, device=DEVICE), 1e-5)


def _norm(w: torch.Tensor, eps: float) -> RMSNorm:
    norm = RMSNorm(w.numel(), eps).to(w.device)
    with torch.no_grad():
        norm.weight.copy_(w)
    return norm


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,Hq,Hk,Dh", [(1, 4, 4, 64), (9, 16, 2, 128), (40, 3, 1, 32)])
def test_rotary_in_place_matches_the_layer(dtype, T, Hq, Hk, Dh):
    g = torch.Generator().manual_seed(T * Hq + Dh)
    rot = Rotary(Dh, 4096, 10000.0).to(DEVICE)
    # q and k as views into one fused projection output, as the attention layer has them
    qkv = torch.randn(T, (Hq + 2 * Hk) * Dh, generator=g).to(DEVICE, dtype)
    q = qkv[:, : Hq * Dh].unflatten(-1, (Hq, Dh))
    k = qkv[:, Hq * Dh: (Hq + Hk) * Dh].unflatten(-1, (Hk, Dh))
    v_before = qkv[:, (Hq + Hk) * Dh:].clone()
    positions = torch.randint(0, 4096, (T,), generator=g).to(DEVICE)
    ref_q, ref_k = rot(q.clone(), positions), rot(k.clone(), positions)
    nr.rotary_(q, positions, rot.cos, rot.sin)
    nr.rotary_(k, positions, rot.cos, rot.sin)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(q.float(), ref_q.float(), **tol)
    torch.testing.assert_close(k.float(), ref_k.float(), **tol)
    assert torch.equal(qkv[:, (Hq + Hk) * Dh:], v_before)  # v untouched


@needs_kernels
@pytest.mark.parametrize("T,Hq,Hk,Dh", [(1, 4, 4, 64), (9, 16, 2, 128)])
def test_rotary_of_q_and_k_in_one_launch_over_the_qkv_split(T, Hq, Hk, Dh):
    """q's heads then k's, adjacent in the qkv output, rotate as one [T, Hq + Hk, Dh] view;
    tensors that are not adjacent get no such view."""
    from brownout.models.layers.common import _adjacent_heads

    g = torch.Generator().manual_seed(T + Hk)
    rot = Rotary(Dh, 4096, 10000.0).to(DEVICE)
    qkv = torch.randn(T, (Hq + 2 * Hk) * Dh, generator=g).to(DEVICE)
    q, k, v = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
    q, k = q.unflatten(-1, (Hq, Dh)), k.unflatten(-1, (Hk, Dh))
    v_before = v.clone()
    positions = torch.randint(0, 4096, (T,), generator=g).to(DEVICE)
    ref_q, ref_k = rot(q.clone(), positions), rot(k.clone(), positions)
    both = _adjacent_heads(q, k)
    assert both is not None and both.shape == (T, Hq + Hk, Dh)
    nr.rotary_(both, positions, rot.cos, rot.sin)
    torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v_before)
    assert _adjacent_heads(q.clone(), k.clone()) is None  # separate storage
    assert _adjacent_heads(k, q) is None  # wrong order


@needs_kernels
def test_rotary_refuses_shapes_it_does_not_serve():
    rot = Rotary(96, 16, 10000.0)
    x = torch.randn(2, 2, 96).to(DEVICE)
    with pytest.raises(ValueError, match="power-of-two"):
        nr.rotary_(x, torch.zeros(2, dtype=torch.long, device=DEVICE), rot.cos.to(DEVICE), rot.sin.to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_layers_take_the_kernels_on_cuda_and_agree():
    torch.manual_seed(0)
    norm = RMSNorm(2048, 1e-6).cuda().to(torch.bfloat16)
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(norm(x).float(), torch_rms_norm(norm, x).float(), rtol=1.6e-2, atol=1e-2)
    rot = Rotary(128, 4096, 1e6).cuda()
    q = torch.randn(64, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(64, 16, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (64,), device="cuda")
    ref_q, ref_k = rot(q, pos), rot(k, pos)
    with torch.no_grad():
        out_q, out_k = rot.apply_qk(q.clone(), k.clone(), pos)
    torch.testing.assert_close(out_q.float(), ref_q.float(), rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out_k.float(), ref_k.float(), rtol=1.6e-2, atol=1e-2)


ULP = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}  # relative: a rounding step or two (the
# interpreter rounds bf16 differently from the GPU, as in the RMSNorm test above)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,inter", [(1, 64), (5, 1500), (0, 32)])
def test_silu_and_mul_matches_the_swiglu_torch_code(dtype, T, inter):
    g = torch.Generator().manual_seed(T * inter + 1)
    h = (torch.randn(T, 2 * inter, generator=g) * 4).to(DEVICE, dtype)
    ref = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    out = nr.silu_and_mul(h)
    assert out.shape == (T, inter) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=ULP[dtype], atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(3, 64), (4, 2100)])
def test_gated_add_matches_the_shared_expert_torch_code(dtype, T, D):
    from brownout.models.layers.moe import gated_shared_add

    g = torch.Generator().manual_seed(T + D)
    base, x = (torch.randn(2, T, D, generator=g) * 2).to(DEVICE, dtype)
    gate = (torch.randn(T, 1, generator=g) * 3).to(DEVICE, dtype)
    prod = torch.sigmoid(gate) * x
    ref = base + prod
    # three roundings (gate, product, sum), each at most a step of the dtype apart, measured
    # against the terms, not the (possibly cancelled) sum
    step = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7}[dtype]
    scale = base.float().abs() + prod.float().abs()
    err = (nr.gated_add(base, gate, x).float() - ref.float()).abs()
    assert (err <= 3 * step * scale + 1e-6).all(), float((err / (scale + 1e-6)).max())
    assert torch.equal(gated_shared_add(base, gate, x), ref)  # off CUDA: the torch ops


@needs_kernels
def test_elementwise_kernels_reject_bad_layouts():
    h = torch.randn(4, 9, device=DEVICE)
    with pytest.raises(ValueError):
        nr.silu_and_mul(h)  # odd width
    with pytest.raises(ValueError):
        nr.gated_add(h, torch.randn(4, 2, device=DEVICE), h)  # gate not [T, 1]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,D", [(1, 64), (7, 100), (33, 256)])
def test_add_rms_norm_matches_the_add_then_the_layer(dtype, rows, D):
    g = torch.Generator().manual_seed(7 * rows + D)
    norm = RMSNorm(D, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    x = (torch.randn(rows, D, generator=g) * 3).to(DEVICE, dtype)
    r = (torch.randn(rows, D, generator=g) * 3).to(DEVICE, dtype)
    ref_sum = r + x
    out, total = nr.add_rms_norm(x, r, norm.weight.detach(), norm.eps)
    ref = torch_rms_norm(norm, total)  # the norm of the sum the kernel stored
    if dtype == torch.float32:
        torch.testing.assert_close(total, ref_sum, rtol=0, atol=0)  # rounded where torch rounds
    else:  # the interpreter's bf16 cast may round the other way: one step apart at most
        torch.testing.assert_close(total.float(), ref_sum.float(), rtol=2 ** -7, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1e-2)


@needs_kernels
def test_add_rms_norm_of_strided_views_empty_input_and_mismatch():
    x = torch.randn(5, 3, 64).to(DEVICE)[:, 1]
    r = torch.randn(5, 2, 64).to(DEVICE)[:, 0]
    w = torch.rand(64).to(DEVICE)
    out, total = nr.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(total, r + x)
    torch.testing.assert_close(out, torch_rms_norm(_norm(w, 1e-5), r + x))
    empty = torch.empty(0, 64, device=DEVICE)
    assert nr.add_rms_norm(empty, empty, w, 1e-5)[0].shape == (0, 64)
    with pytest.raises(ValueError, match="do not match"):
        nr.add_rms_norm(x, r[:, :32], w, 1e-5)


def test_layer_add_forward_is_the_add_then_the_norm():
    """The torch path the layers take off CUDA: bit-for-bit the unfused code."""
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(48, 1e-6).to(torch.bfloat16)
    x = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    r = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    out, total = norm.add_forward(x, r)
    assert torch.equal(total, r + x) and torch.equal(out, norm(r + x))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_slots_rms_norm_is_the_moe_sum_then_add_rms_norm(dtype):
    """A MoE layer's unsummed outputs summed inside the norm: the same values as fused_moe's
    own sum followed by add_rms_norm, with unused assignments (id -1, garbage rows) skipped."""
    fm = pytest.importorskip("brownout.kernels.fused_moe")
    g = torch.Generator().manual_seed(11)
    T, k, D = 5, 3, 96
    y = (torch.randn(T * k, D, generator=g) * 2).to(DEVICE, dtype)
    ids = torch.randint(0, 7, (T, k), generator=g, dtype=torch.int32)
    ids[1, 2] = -1
    ids[3] = -1  # a padding row: every assignment unused
    ids = ids.to(DEVICE)
    y[ids.reshape(-1).cpu() < 0] = float("nan")  # garbage the sum must never read
    r = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    w = (torch.rand(D, generator=g) + 0.5).to(DEVICE, dtype)
    want_out, want_total = nr.add_rms_norm(fm.moe_sum(y, ids), r, w, 1e-6)
    out, total = nr.add_slots_rms_norm(y, ids, r, w, 1e-6)
    assert torch.equal(total, want_total) and torch.equal(out, want_out)
    assert not out.isnan().any()
    with pytest.raises(ValueError, match="add_slots_rms_norm"):
        nr.add_slots_rms_norm(y[:-1], ids, r, w, 1e-6)
