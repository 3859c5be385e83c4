"""Triton RMSNorm and rotary embedding: one launch each where torch issues 7 and ~20.

A decode step is a few hundred small kernels besides the GEMMs: an eager step spends several
microseconds of host time launching each of ~60 kernels per layer, and RMSNorm
(float cast, square, mean, rsqrt, two multiplies, cast back) and rotary (two gathers of
the cos/sin table, casts, four multiplies, two adds, a concatenation, for q and again for
k) were the largest groups of them. These kernels compute the same float32 arithmetic as
`RMSNorm` and `Rotary` in `models/layers/common.py`, in one launch each:

  rms_norm(x, w, eps)         out = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), float32 stats
  add_rms_norm(x, r, w, eps)  s = x + r (rounded to x's dtype), out = rms_norm(s): the
                              residual add of a decoder layer and the norm after it, one pass
  add_slots_rms_norm(y, ids, r, w, eps)  the same with x the sum of a MoE layer's
                              per-assignment outputs, which then needs no launch of its own
  rotary_(x, pos, cos, sin)   x [T, H, Dh] rotated in place (neox halves); called for q and k
  silu_and_mul(h)             silu(h[:, :I]) * h[:, I:] (SwiGLU), one pass over h
  gated_add(out, g, shared)   out + sigmoid(g) * shared (the shared expert's gate), one pass

The last two replace torch's elementwise kernels over strided halves and broadcasts, which
take its slow non-vectorised path (about three times the time their bytes need on a Hopper
GPU; the engine profiles in `benchmarks/results/engine/` show it). They round where torch
rounds (after the activation, after the product), so results match the torch code.

Used on CUDA with autograd off (serving, evaluation); everything else keeps the torch code.
"""

from __future__ import annotations

import torch

from brownout.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch code
    triton = None


def _kernels_interpreted() -> bool:
    """True when triton decorated this module's kernels for its CPU interpreter."""
    return triton is not None and not isinstance(_rms_norm_kernel, triton.runtime.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:
    from brownout.kernels.pdl import pdl_launch, pdl_wait, prefetch_l2  # noqa: F401

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, D, eps,
                         BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        normed = (x * inv).to(out_ptr.dtype.element_ty)  # rounded like `.to(x.dtype)`
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        out = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o,
                             stride_s, D, eps, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        s = (x + r).to(sum_ptr.dtype.element_ty)  # rounded like torch's `x + r`
        tl.store(sum_ptr + row * stride_s + offs, s, mask=ok)
        sf = s.to(tl.float32)
        inv = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
        normed = (sf * inv).to(out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        out = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_slots_rms_norm_kernel(y_ptr, ids_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, D, eps,
                                   TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        # the MoE layer's per-assignment outputs summed (as fused_moe's last kernel rounds
        # them), then the residual add and the norm, as _add_rms_norm_kernel; the slot loop is
        # unrolled so that its loads are in flight together, not one latency after another
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            e = tl.load(ids_ptr + row * TOP_K + j + offs * 0)  # broadcast: [BLOCK_D] copies
            y = tl.load(y_ptr + (row * TOP_K + j) * D + offs, mask=ok & (e >= 0), other=0.0)
            acc += y.to(tl.float32)
        x = acc.to(sum_ptr.dtype.element_ty).to(tl.float32)
        r = tl.load(r_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
        s = (x + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * D + offs, s, mask=ok)
        sf = s.to(tl.float32)
        inv = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
        normed = (sf * inv).to(out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        out = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * D + offs, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, H,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
        # one program: one token, all H heads of q (or k), rotated in place
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        j = tl.arange(0, HALF)
        ok = h[:, None] < H
        cos = tl.load(cos_ptr + pos * stride_c + j)[None, :]  # [1, HALF] float32
        sin = tl.load(sin_ptr + pos * stride_c + j)[None, :]
        base = x_ptr + t * stride_t + h[:, None] * stride_h + j[None, :]
        x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(base, o1.to(x_ptr.dtype.element_ty), mask=ok)
        tl.store(base + HALF, o2.to(x_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, stride_h, stride_o, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        g = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * stride_h + inter + offs, mask=ok, other=0.0)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # rounded like F.silu
        out = act.to(tl.float32) * u.to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gated_add_kernel(base_ptr, g_ptr, x_ptr, out_ptr, stride_b, stride_g, stride_x, stride_o, D,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        pdl_launch(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < D
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # rounded like sigmoid
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        prod = (gate.to(tl.float32) * x.to(tl.float32)).to(out_ptr.dtype.element_ty)
        b = tl.load(base_ptr + row * stride_b + offs, mask=ok, other=0.0)
        res = b.to(tl.float32) + prod.to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, res.to(out_ptr.dtype.element_ty), mask=ok)


def kernels_usable(x: torch.Tensor) -> bool:
    """The model layers call these kernels for x: triton present, CUDA, autograd off (the
    kernels record no graph, and rotary writes in place; the norm weight requires grad).
    Tests call `rms_norm` / `rotary_` directly, on the CPU through the interpreter."""
    return triton is not None and x.is_cuda and not torch.is_grad_enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] with a unit last stride -> a new contiguous tensor like x."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim {D}")
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.reshape(x.shape)
    block_d = _next_pow2(D)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), D,
                                      float(eps), BLOCK_D=block_d,
                                      num_warps=4 if block_d <= 2048 else 8, **pdl.launch_opts(rows))
    return out.reshape(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [..., D] of one dtype, in one
    pass: the decoder layer's residual add and the norm that follows it read the activations
    once instead of three times, with one launch instead of two."""
    D = x.shape[-1]
    if weight.shape != (D,) or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype}, residual "
                         f"{tuple(residual.shape)} {residual.dtype} and weight "
                         f"{tuple(weight.shape)} do not match")
    rows = x.reshape(-1, D)
    res = residual.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if res.stride(-1) != 1:
        res = res.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block_d = _next_pow2(D)
        _add_rms_norm_kernel[(rows.shape[0],)](rows, res, weight, out, total, rows.stride(0),
                                              res.stride(0), out.stride(0), total.stride(0), D,
                                              float(eps), BLOCK_D=block_d,
                                              num_warps=4 if block_d <= 2048 else 8, **pdl.launch_opts(rows))
    return out.reshape(x.shape), total.reshape(x.shape)


def add_slots_rms_norm(y: torch.Tensor, ids: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm(moe, residual)` where moe[t] = sum over j with ids[t, j] >= 0 of
    y[t * k + j] (a MoE layer's unsummed outputs, y [T * k, D] contiguous, ids [T, k]), with
    the sum rounded to y's dtype as fused_moe rounds it: one launch where the sum took its own."""
    T, k = ids.shape
    D = residual.shape[-1]
    if y.shape != (T * k, D) or residual.shape != (T, D) or weight.shape != (D,) or y.dtype != residual.dtype:
        raise ValueError(f"add_slots_rms_norm: y {tuple(y.shape)} {y.dtype}, ids {tuple(ids.shape)}, "
                         f"residual {tuple(residual.shape)} {residual.dtype}, weight {tuple(weight.shape)}")
    y, ids, residual = y.contiguous(), ids.contiguous(), residual.contiguous()
    out = torch.empty_like(residual)
    total = torch.empty_like(residual)
    if T:
        block_d = _next_pow2(D)
        _add_slots_rms_norm_kernel[(T,)](y, ids, residual, weight, out, total, D, float(eps), TOP_K=k,
                                         BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8, **pdl.launch_opts(y))
    return out, total


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, H, Dh] in place at positions [T] (cos/sin tables [P, Dh/2], float32)."""
    T, H, Dh = x.shape
    half = Dh // 2
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or cos.shape[-1] != half or half & (half - 1):
        raise ValueError(f"rotary_ needs unit-stride heads and a power-of-two half dim, "
                         f"got x {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}")
    if T == 0:
        return
    _rotary_kernel[(T,)](x, positions.reshape(-1), cos, sin, x.stride(0), x.stride(1),
                         cos.stride(0), H, HALF=half, BLOCK_H=max(1, _next_pow2(H)), num_warps=4, **pdl.launch_opts(x))


_EW_BLOCK = 1024  # elements per program of the two elementwise kernels


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """h [T, 2I] (gate then up, unit last stride) -> silu(gate) * up, [T, I], h's dtype."""
    if h.dim() != 2 or h.shape[-1] % 2 or h.stride(-1) != 1:
        raise ValueError(f"silu_and_mul needs [T, 2I] with a unit last stride, got "
                         f"{tuple(h.shape)} strides {h.stride()}")
    T, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty(T, inter, dtype=h.dtype, device=h.device)
    if T and inter:
        _silu_mul_kernel[(T, triton.cdiv(inter, _EW_BLOCK))](h, out, h.stride(0), out.stride(0), inter,
                                                             BLOCK=_EW_BLOCK, num_warps=4, **pdl.launch_opts(h))
    return out


def gated_add(base: torch.Tensor, gate_logit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """base + sigmoid(gate_logit) * x: base, x [T, D], gate_logit [T, 1]; a new tensor."""
    if base.shape != x.shape or base.dim() != 2 or gate_logit.shape != (x.shape[0], 1) \
            or base.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"gated_add needs base and x [T, D] with unit last strides and a [T, 1] "
                         f"gate, got {tuple(base.shape)}, {tuple(x.shape)}, {tuple(gate_logit.shape)}")
    T, D = x.shape
    out = torch.empty_like(base)
    if T and D:
        _gated_add_kernel[(T, triton.cdiv(D, _EW_BLOCK))](
            base, gate_logit, x, out, base.stride(0), gate_logit.stride(0), x.stride(0), out.stride(0), D,
            BLOCK=_EW_BLOCK, num_warps=4, **pdl.launch_opts(base))
    return out
