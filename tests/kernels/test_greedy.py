"""The greedy-token kernel against torch's argmax of the float32 logits.

Without CUDA the kernel runs under triton's CPU interpreter, at small pieces so that a small
vocabulary spans several of them and the last program of a row has partials to pick from.
"""

from __future__ import annotations

import pytest
import torch

from triton_interpret import CUDA, DEVICE, import_kernels, rerun_in_fresh_process

gr = import_kernels("brownout.kernels.greedy")
needs_kernels = pytest.mark.skipif(gr is None, reason="run by test_cpu_suite_in_fresh_process")


@pytest.mark.skipif(gr is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def reference(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().argmax(dim=1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,vocab,chunk", [(1, 50, 16), (5, 1000, 64), (3, 64, 64), (2, 7, 16)])
def test_greedy_tokens_match_torch_argmax(dtype, rows, vocab, chunk):
    g = torch.Generator().manual_seed(rows * vocab + chunk)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(DEVICE, dtype)
    for _ in range(2):  # the arrival counters are back at zero after a launch
        out = gr.greedy_tokens(logits, chunk=chunk)
        assert out.dtype == torch.int64 and out.shape == (rows,)
        assert out.cpu().tolist() == reference(logits).cpu().tolist()


@needs_kernels
def test_ties_go_to_the_first_index_across_and_within_pieces():
    """Rows whose maximum repeats within one piece, in a later piece, in every piece; a row of
    -inf but one finite logit in its last (partial) piece; a row all -inf (index 0, as torch)."""
    vocab, chunk = 100, 16
    logits = torch.zeros(6, vocab)
    logits[0, [37, 33, 90]] = 5.0  # one piece (32-47) holds 33 and 37, a later one 90
    logits[1, [99, 16]] = 2.0  # the last, partial piece and the second
    logits[2] = 1.0  # every logit ties
    logits[3] = float("-inf")
    logits[3, 98] = -1e30
    logits[4] = float("-inf")
    logits[5, 50] = 3.0
    logits[5, 70] = 3.0 + 1e-3  # larger, later: wins
    logits = logits.to(DEVICE, torch.bfloat16)
    out = gr.greedy_tokens(logits, chunk=chunk).cpu().tolist()
    assert out == reference(logits).cpu().tolist() == [33, 16, 0, 98, 0, 50]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_ranks_above_every_number(dtype):
    """The first NaN wins, before an earlier +inf too, within a piece and across pieces."""
    logits = torch.randn(4, 80)
    logits[0, 45] = float("nan")
    logits[1, [10, 60]] = float("nan")
    logits[2, 3], logits[2, 70] = float("inf"), float("nan")  # +inf in an earlier piece
    logits[3, 33], logits[3, 34] = float("inf"), float("nan")  # in the same piece
    logits = logits.to(DEVICE, dtype)
    out = gr.greedy_tokens(logits, chunk=16).cpu().tolist()
    assert out == reference(logits).cpu().tolist() == [45, 10, 70, 34]


@needs_kernels
def test_strided_rows_and_refusals():
    wide = torch.randn(4, 300).to(DEVICE, torch.bfloat16)
    view = wide[:, :257]  # rows 300 apart, 257 logits each
    assert gr.greedy_tokens(view, chunk=64).cpu().tolist() == reference(view).cpu().tolist()
    with pytest.raises(ValueError, match="power of two"):
        gr.greedy_tokens(view, chunk=48)
    assert not gr.usable(wide[:, ::2])  # no unit last stride: torch's argmax serves it


@needs_kernels
def test_sampler_greedy_takes_the_kernel_on_cuda_logits_only(monkeypatch):
    """`sampler.greedy` reads the kernel's tokens on CUDA logits, torch's elsewhere."""
    from brownout.runner import sampler

    logits = torch.randn(3, 200).to(DEVICE, torch.bfloat16)
    calls = []
    real = gr.greedy_tokens
    monkeypatch.setattr(gr, "greedy_tokens", lambda x, *a, **k: calls.append(x) or real(x, *a, **k))
    out = sampler.greedy(logits)
    assert out.cpu().tolist() == reference(logits).cpu().tolist()
    assert len(calls) == (1 if CUDA else 0)  # the interpreter's tensors are CPU tensors


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 8, 64, 256])
def test_greedy_tokens_at_a_real_vocabulary_gpu(rows):
    """bf16 logits of Qwen1.5-MoE's 151,936 tokens, with planted ties, at the default pieces."""
    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, 151936, generator=g) * 3).to("cuda", torch.bfloat16)
    logits[0, [151935, 5000]] = 100.0  # a tie across pieces: the first index wins
    out = gr.greedy_tokens(logits)
    torch.cuda.synchronize()
    assert out.cpu().tolist() == reference(logits).cpu().tolist()
    assert out[0].item() == 5000


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_every_row_gets_its_last_arrival_under_contention_gpu():
    """4096 rows of small-integer logits (ties everywhere) in pieces of 64, so that a row's
    programs run on many SMs at once and arrive in any order; launched 50 times, each against
    torch, and the arrival counters back at zero after."""
    g = torch.Generator().manual_seed(0)
    for i in range(50):
        logits = torch.randint(-8, 8, (gr.MAX_ROWS, 4000), generator=g).to("cuda", torch.bfloat16)
        out = gr.greedy_tokens(logits, chunk=64)
        assert torch.equal(out, reference(logits)), f"launch {i}"
    assert int(gr._counters(logits.device).abs().sum()) == 0
