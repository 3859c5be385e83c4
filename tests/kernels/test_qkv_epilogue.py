"""The QKV projection with rotary and the KV-cache write in its epilogue (`qkv_rope_write_kv`)
against the two launches it replaces: `skinny_linear` at the same tiles and split, then
`rope_write_kv` on its q, k and v.

Both round the projection to the output's dtype, then rotate in float32 from those values
and round again, and sum the same float32 partials in the same order, so q and the caches
must match bit for bit (bf16 and float32). Padding rows (slot -1) write nothing: every cache
cell outside the step's slots keeps its value. Two calls in a row check that the arrival
counters are back at zero. The engine's greedy tokens do not change with the fused path on
(the tiny models, the Triton kernels interpreted on a CPU). Without CUDA the kernels run
under triton's CPU interpreter.
"""

from __future__ import annotations

import pytest
import torch

from triton_interpret import CUDA, DEVICE, engine_tokens_with_switch, import_kernels, rerun_in_fresh_process

sk = import_kernels("brownout.kernels.skinny_gemm")
pa = import_kernels("brownout.kernels.paged_attention")
needs_kernels = pytest.mark.skipif(sk is None or pa is None, reason="run by test_cpu_suite_in_fresh_process")
NUM_BLOCKS, BLOCK_SIZE = 4, 4  # 16 cache slots: room for the largest step and untouched cells


@pytest.mark.skipif(sk is not None and pa is not None, reason="kernels imported here")
def test_cpu_suite_in_fresh_process():
    rerun_in_fresh_process(__file__)


def _layer(T, hq, hkv, dh, K, bias, dtype, seed):
    """x, the fused weight [q heads, k heads, v heads] and bias, rotary tables, positions, slots
    (rows 1 and T - 2 of steps over 2 rows are padding) and caches of random contents."""
    from brownout.models.layers.common import Rotary

    g = torch.Generator().manual_seed(seed)
    n = (hq + 2 * hkv) * dh
    rot = Rotary(dh, 64, 10000.0)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:T]
    if T > 2:
        slots[[1, T - 2]] = -1
    to = dict(device=DEVICE)
    return dict(
        x=torch.randn(T, K, generator=g).to(dtype=dtype, **to),
        weight=(0.05 * torch.randn(n, K, generator=g)).to(dtype=dtype, **to),
        bias=torch.randn(n, generator=g).to(dtype=dtype, **to) if bias else None,
        positions=torch.randint(0, 64, (T,), generator=g).to(**to),
        cos=rot.cos.to(**to), sin=rot.sin.to(**to),
        k_cache=torch.randn(NUM_BLOCKS, BLOCK_SIZE, hkv, dh, generator=g).to(dtype=dtype, **to),
        v_cache=torch.randn(NUM_BLOCKS, BLOCK_SIZE, hkv, dh, generator=g).to(dtype=dtype, **to),
        slot_mapping=slots.to(**to))


def _two_launches(a, hq, hkv, dh, split):
    """skinny_linear with head-sized tiles at `split`, then rope_write_kv -> q, k_cache, v_cache."""
    kc, vc = a["k_cache"].clone(), a["v_cache"].clone()
    block_k, _ = sk.head_tiles(dh, sk.row_block(a["x"].shape[0]), a["x"].element_size())
    y = sk.skinny_linear(a["x"], a["weight"], a["bias"], block_n=dh, block_k=block_k, split_k=split)
    q, k, v = (t.unflatten(-1, (h, dh)) for t, h in zip(y.split([hq * dh, hkv * dh, hkv * dh], -1), (hq, hkv, hkv)))
    pa.rope_write_kv(q, k, v, a["positions"], a["cos"], a["sin"], kc, vc, a["slot_mapping"])
    return q, kc, vc


def _fused(a, hq, hkv, dh, split):
    kc, vc = a["k_cache"].clone(), a["v_cache"].clone()
    q = sk.qkv_rope_write_kv(a["x"], a["weight"], a["bias"], a["positions"], a["cos"], a["sin"], kc, vc,
                             a["slot_mapping"], hq, hkv, dh, split_k=split)
    return q, kc, vc


def _same(got, want):
    """Bit for bit, except float32 on a GPU: there the compiler may contract the rotary's
    multiply-adds differently in the two kernels, which moves the last bits; bf16's rounding
    hides that, and the interpreter contracts nothing."""
    if CUDA and got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hq,hkv,dh,K,bias,split", [
    (1, 4, 2, 16, 300, False, 1),  # one decode row, GQA, one split
    (3, 2, 2, 64, 300, True, 2),   # MHA with bias, 64-column steps, two partial sums (192 + 108 columns)
    (8, 4, 1, 16, 700, True, 4),   # GQA 4:1, four splits of which the last sums nothing
])
def test_matches_skinny_linear_then_rope_write_kv(T, hq, hkv, dh, K, bias, split, dtype):
    a = _layer(T, hq, hkv, dh, K, bias, dtype, seed=T * 10 + hq + hkv)
    b = _layer(T, hq, hkv, dh, K, bias, dtype, seed=T * 10 + hq + hkv + 1)
    with torch.inference_mode():
        for case in (a, b):  # two calls in a row: the counters were reset between them
            q, kc, vc = _fused(case, hq, hkv, dh, split)
            q_ref, kc_ref, vc_ref = _two_launches(case, hq, hkv, dh, split)
            assert q.shape == (T, hq, dh) and q.dtype == dtype
            for got, want in ((q, q_ref), (kc, kc_ref), (vc, vc_ref)):
                _same(got, want)
            written = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool, device=DEVICE)
            written[case["slot_mapping"][case["slot_mapping"] >= 0]] = True
            for new, old in ((kc, case["k_cache"]), (vc, case["v_cache"])):
                new, old = new.flatten(0, 1), old.flatten(0, 1)
                assert torch.equal(new[~written], old[~written])  # padding and other slots untouched
                assert not torch.equal(new[written], old[written])
    _, counts = sk._scratch(torch.device(DEVICE))
    assert int(counts.abs().sum()) == 0


@needs_kernels
def test_the_chosen_split_matches_too():
    """Without `split_k` the launch picks its own split (over the head tiles): the same bits
    as the two launches at that split."""
    hq, hkv, dh, T = 2, 1, 16, 3
    a = _layer(T, hq, hkv, dh, 1024, True, torch.bfloat16, seed=5)
    split = sk.choose_split_k(hq + 2 * hkv, 1024, torch.device(DEVICE), dh, sk.row_block(T))
    assert split > 1
    with torch.inference_mode():
        q_ref, kc_ref, vc_ref = _two_launches(a, hq, hkv, dh, split)
        q = sk.qkv_rope_write_kv(a["x"], a["weight"], a["bias"], a["positions"], a["cos"], a["sin"],
                                 a["k_cache"], a["v_cache"], a["slot_mapping"], hq, hkv, dh)
    assert torch.equal(q, q_ref) and torch.equal(a["k_cache"], kc_ref) and torch.equal(a["v_cache"], vc_ref)


@needs_kernels
def test_head_tiles_stream_as_much_weight_a_step_as_the_32_row_tiles():
    for head_dim, block_k in ((16, 128), (32, 128), (64, 64), (128, 32)):
        assert sk.head_tiles(head_dim, 16, 2) == (block_k, 4)
    assert sk.head_tiles(128, 64, 2) == (32, 8)  # a 128 x 64 float32 accumulator takes 8 warps


@needs_kernels
def test_usable_where_the_skinny_gemm_and_rope_write_kv_apply():
    hq, hkv, dh = 4, 2, 16
    a = _layer(3, hq, hkv, dh, 64, False, torch.float32, seed=1)

    def ok(x=a["x"], w=a["weight"], cos=a["cos"], kc=a["k_cache"], dh=dh, qk_norm=False):
        return sk.qkv_rope_write_kv_usable(x, w, cos, a["sin"], kc, a["v_cache"], hq, hkv, dh, qk_norm)

    assert not ok()  # autograd on: the torch path keeps gradients
    with torch.inference_mode():
        assert ok() == (CUDA or sk._kernels_interpreted())
        assert not ok(qk_norm=True)  # the norms sit between the projection and the rotary
        assert not ok(x=torch.zeros(sk.SKINNY_MAX_ROWS + 1, 64, device=DEVICE))
        assert not ok(cos=a["cos"].double())
        assert not ok(kc=a["k_cache"][:, :, :1])  # the cache's heads are not this layer's
        w24 = torch.zeros((hq + 2 * hkv) * 24, 64, device=DEVICE)  # not a power of two
        assert not ok(w=w24, dh=24)
        w8 = torch.zeros((hq + 2 * hkv) * 8, 64, device=DEVICE)  # below a tensor-core tile
        assert not ok(w=w8, dh=8)


@needs_kernels
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])  # with and without the qkv bias
def test_engine_greedy_tokens_unchanged_with_the_epilogue(tiny_models, family, monkeypatch):
    """The engine on the Triton path (interpreted here) gives the same greedy tokens with the
    fused QKV epilogue as with the projection and `rope_write_kv` apart, and takes the fused
    path for its prefill and decode steps only when on."""
    tokens, calls = engine_tokens_with_switch(tiny_models[family], monkeypatch, (sk, "QKV_EPILOGUE"),
                                              (sk, "qkv_rope_write_kv"))
    assert tokens[True] == tokens[False]
    assert 3 in calls and 19 in calls  # the decode steps and the prefill
