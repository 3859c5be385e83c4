"""The decode-size linear kernel (`skinny_linear`) against `torch.nn.functional.linear`.

Float32 inputs compare to 1e-4 (the kernel sums K in another order, and split-K partials
add in split order); bf16 inputs to bf16 rounding. Split-K runs with its arrival counters,
so the same call twice must give the same answer (the counters are back at zero after each
launch). Without CUDA the kernel runs under triton's CPU interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process

sk = import_kernels("brownout.kernels.skinny_gemm")

needs_kernels = pytest.mark.skipif(sk is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(sk is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _case(M, N, K, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (0.05 * torch.randn(N, K, generator=g)).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


@needs_kernels
@pytest.mark.parametrize("M,N,K,bias,split", [
    (1, 61, 300, False, 1),   # a router: N not a multiple of the tile, K not of the step
    (3, 40, 512, True, 2),    # QKV-like with bias, two partial sums
    (16, 33, 1024, False, 4), # the largest row count, four partial sums
    (5, 16, 700, True, 8),    # more splits than full steps: some programs sum nothing
    (40, 50, 256, True, 2),   # a 64-row tile
])
def test_matches_f_linear(M, N, K, bias, split):
    x, w, b = _case(M, N, K, bias, torch.float32)
    ref = F.linear(x, w, b)
    with torch.inference_mode():
        out = sk.skinny_linear(x, w, b, split_k=split)
        again = sk.skinny_linear(x, w, b, split_k=split)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-6)  # counters were reset
    _, counts = sk._scratch(x.device)
    assert int(counts.abs().sum()) == 0


@needs_kernels
def test_bf16_rounds_like_torch():
    x, w, b = _case(2, 48, 512, True, torch.bfloat16, seed=1)
    ref = F.linear(x.float(), w.float(), b.float())
    with torch.inference_mode():
        out = sk.skinny_linear(x, w, b, split_k=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1e-2)


@needs_kernels
def test_split_choice_fills_the_sms_and_stays_a_power_of_two():
    dev = torch.device(DEVICE)
    for n_tiles, K in [(1, 4096), (4, 2048), (128, 2048), (384, 2048), (4, 128)]:
        s = sk.choose_split_k(n_tiles, K, dev)
        assert s >= 1 and s & (s - 1) == 0 and s <= sk.MAX_SPLIT_K
        assert s == 1 or K // s >= sk.MIN_K_PER_SPLIT
    assert sk.choose_split_k(4, 128, dev) == 1  # too short a K to split


@needs_kernels
def test_usable_only_for_few_rows_without_autograd():
    x, w, _ = _case(sk.SKINNY_MAX_ROWS + 1, 16, 64, False, torch.float32)
    with torch.inference_mode():
        assert not sk.usable(x, w)
        assert sk.usable(x[:4], w) == (CUDA or sk._kernels_interpreted())
    assert not sk.usable(x[:4], w)  # autograd on: the torch path keeps gradients


@needs_kernels
def test_wide_layers_only_at_few_rows_under_pdl(monkeypatch):
    """A QKV-wide weight (over SKINNY_MAX_N outputs) takes the kernel only at up to
    WIDE_MAX_ROWS rows and only when the launch overlaps the previous kernel (PDL)."""
    w = torch.zeros(sk.SKINNY_MAX_N + 64, 32, device=DEVICE)
    few, many = (torch.zeros(m, 32, device=DEVICE) for m in (sk.WIDE_MAX_ROWS, sk.WIDE_MAX_ROWS + 1))
    with torch.inference_mode():
        local = CUDA or sk._kernels_interpreted()
        monkeypatch.setattr(sk.pdl, "active", lambda t: False)
        assert not sk.usable(few, w)
        monkeypatch.setattr(sk.pdl, "active", lambda t: True)
        assert sk.usable(few, w) == local and not sk.usable(many, w)
        assert not sk.usable(few, torch.zeros(sk.WIDE_MAX_N + 64, 32, device=DEVICE))


@needs_kernels
def test_decode_linear_takes_the_kernel_when_enabled(monkeypatch):
    """DecodeLinear routes few-row CUDA calls to the kernel (on CUDA only: CPU tensors keep
    F.linear even under the interpreter)."""
    from brownout.models.layers.common import DecodeLinear

    lin = DecodeLinear(64, 40, bias=True).to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE)
    calls = []
    real = sk.skinny_linear
    monkeypatch.setattr(sk, "ENABLED", True)
    monkeypatch.setattr(sk, "skinny_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("brownout.kernels.triton_module", lambda name: sk)
    with torch.inference_mode():
        out = lin(x)
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-4)
    assert len(calls) == (1 if CUDA else 0)


@needs_kernels
def test_a_split_beyond_the_workspace_is_refused():
    x, w, _ = _case(64, 4096, 512, False, torch.float32)
    n_tiles = 4096 // 16
    assert not sk.fits_workspace(16, n_tiles, 16, 64)
    with torch.inference_mode(), pytest.raises(ValueError, match="split_k"):
        sk.skinny_linear(x, w, split_k=16, block_n=16)
    assert sk.fits_workspace(sk.choose_split_k(n_tiles, 512, x.device, 16, 64), n_tiles, 16, 64)
