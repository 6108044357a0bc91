"""The AVX-512 kernels against torch: the GEMM (csrc/gemm_avx512.c) against ``F.linear``
at the shapes that exercise its edges (rows padded to the row block, columns past the last
full panel, tiny and odd inner sizes, every thread count); decode attention
(csrc/decode_attention_avx512.c) against float64 softmax attention; and the refusals."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptfleet.platform.native_layers import NativeLinear
from promptfleet.platform.native_kernels import native_kernels
from promptfleet.testing.skips import needs_native

needs_kernel = needs_native()  # why a skip is legitimate: promptfleet.testing.skips


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 32, 33, 130])
@pytest.mark.parametrize("shape", [(48, 80), (768, 48), (3, 49), (77, 1), (16, 100)])
def test_matches_torch_linear(rows, shape):
    in_features, out_features = shape
    torch.manual_seed(rows * 1000 + out_features)
    linear = nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features) * 2
    with torch.inference_mode():
        got = NativeLinear(linear, native_kernels())(x)
        want = F.linear(x, linear.weight, linear.bias)
    assert got.shape == (rows, out_features)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()


@needs_kernel
@pytest.mark.parametrize("activation,fn", [("gelu_new", lambda y: F.gelu(y, approximate="tanh")), ("relu", F.relu)])
def test_activation_bare_weight_and_leading_dims(activation, fn):
    weight = torch.randn(100, 64)
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        got = NativeLinear(weight, native_kernels(), activation=activation)(x)
    assert got.shape == (2, 5, 100)
    assert torch.allclose(got, fn(x @ weight.T), atol=1e-4)


@needs_kernel
def test_thread_count_does_not_change_a_bit():
    """Each output column is one thread's dot products in one fixed order."""
    gemm = native_kernels()
    weight, bias, x = torch.randn(2304, 768), torch.randn(2304), torch.randn(32, 768)
    packed = gemm.pack(weight)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(gemm.linear(x, packed, 2304, bias))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.allclose(outs[0], F.linear(x, weight, bias), atol=1e-4)


@needs_kernel
def test_bad_calls_are_refused():
    gemm = native_kernels()
    packed = gemm.pack(torch.randn(48, 16))
    with pytest.raises(ValueError, match="bad native GEMM call"):
        gemm.linear(torch.randn(5, 16), packed, 48)  # rows not a multiple of the row block
    with pytest.raises(ValueError, match="bad native GEMM call"):
        gemm.linear(torch.randn(8, 15), packed, 48)  # inner size of another weight
    with pytest.raises(ValueError, match="float32 CPU weights"):
        gemm.pack(torch.randn(48, 16, dtype=torch.float16))


@needs_kernel
@pytest.mark.parametrize("heads, dim", [(12, 64), (3, 16), (25, 64)])
def test_decode_attention_matches_float64(heads, dim):
    kernels = native_kernels()
    gen = torch.Generator().manual_seed(heads)
    slots, positions, batch, slot0 = 9, 1025, 6, 2
    k_cache = torch.randn(slots, positions, heads, dim, generator=gen)
    v_cache = torch.randn(slots, positions, heads, dim, generator=gen)
    q = torch.randn(batch, heads, dim, generator=gen) * 4  # peaked softmax: large scores
    lens = torch.tensor([1, 17, 16, 84, 1025, 333], dtype=torch.int32)
    k_cache[slot0 + 1, 17:] = float("nan")  # past a row's length: never read
    got = kernels.decode_attention(q, k_cache, v_cache, slot0, lens)
    for b, n in enumerate(lens.tolist()):
        keys, values = k_cache[slot0 + b, :n].double(), v_cache[slot0 + b, :n].double()
        scores = torch.einsum("hd,khd->hk", q[b].double(), keys) / math.sqrt(dim)
        want = torch.einsum("hk,khd->hd", scores.softmax(-1), values)
        assert (got[b].double() - want).abs().max() < 2e-5, (b, n)


@needs_kernel
def test_decode_attention_refuses_bad_calls():
    kernels = native_kernels()
    k_cache = torch.zeros(4, 10, 2, 16)
    q, lens = torch.zeros(2, 2, 16), torch.tensor([3, 4], dtype=torch.int32)
    assert kernels.decode_attention(q, k_cache, k_cache, 2, lens).shape == (2, 2, 16)
    for bad_lens in ([0, 4], [3, 11]):
        with pytest.raises(ValueError, match="refused lengths"):
            kernels.decode_attention(q, k_cache, k_cache, 0, torch.tensor(bad_lens, dtype=torch.int32))
    with pytest.raises(ValueError, match="bad native attention call"):
        kernels.decode_attention(q, k_cache, k_cache, 3, lens)  # rows 3..4 of 4 slots
    with pytest.raises(ValueError, match="bad native attention call"):
        kernels.decode_attention(q.bfloat16(), k_cache, k_cache, 0, lens)
    with pytest.raises(ValueError, match="bad native attention call"):
        kernels.decode_attention(torch.zeros(2, 2, 8), torch.zeros(4, 10, 2, 8), torch.zeros(4, 10, 2, 8), 0, lens)


@needs_kernel
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 50257])
def test_argmax_is_torchs(cols):
    """First index of the maximum (ties), of the first NaN, -inf rows, row tails."""
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(9, cols, generator=gen)
    x[1] = x[1].round()            # many ties
    x[2, cols // 2:] = float("nan")  # NaN wins, the first one
    x[3] = float("-inf")           # all -inf: index 0
    x[4, -1] = 1e30                # the maximum in the tail
    x[5] = 7.0                     # all equal
    assert native_kernels().argmax(x) == x.argmax(-1).tolist()
    strided = x[::2, 1:] if cols > 1 else x[::2]  # not contiguous: copied first
    assert native_kernels().argmax(strided) == strided.argmax(-1).tolist()


@needs_kernel
def test_argmax_refuses_other_tensors():
    for bad in (torch.zeros(3), torch.zeros(2, 0), torch.zeros(2, 4, dtype=torch.float64)):
        with pytest.raises(ValueError, match="bad native argmax call"):
            native_kernels().argmax(bad)


@needs_kernel
def test_packed_weights_share_one_huge_page_arena_in_forward_order(tiny_checkpoint):
    from promptfleet.platform.native_kernels import HUGE_PAGE, huge_page_empty
    from promptfleet.platform.weights import load_gpt2

    arena = huge_page_empty(1000)
    assert arena.data_ptr() % HUGE_PAGE == 0 and arena.numel() == 1000
    arena.fill_(1.0)  # writable to its end
    model = load_gpt2(tiny_checkpoint, linear_kernels="avx512")
    packed = [lin.packed_weight for b in model.blocks for lin in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj)]
    packed.append(model.lm_head.packed_weight)
    assert len({p.untyped_storage().data_ptr() for p in packed}) == 1
    starts = [p.data_ptr() for p in packed]
    assert starts[0] % HUGE_PAGE == 0
    assert all(a + 4 * p.numel() == b for a, p, b in zip(starts, packed, starts[1:]))  # back to back


@needs_kernel
def test_decode_attention_stores_the_steps_token_before_reading_it():
    kernels = native_kernels()
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(3, 40, 4, 16, generator=gen), torch.randn(3, 40, 4, 16, generator=gen)
    q, k_new, v_new = (torch.randn(2, 4, 16, generator=gen) for _ in range(3))
    lens = torch.tensor([7, 40], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lens.tolist()):
        want_k[1 + b, n - 1], want_v[1 + b, n - 1] = k_new[b], v_new[b]
    want = kernels.decode_attention(q, want_k, want_v, 1, lens)  # the token already in place
    got = kernels.decode_attention(q, k_cache, v_cache, 1, lens, k_new=k_new, v_new=v_new)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # stored, nothing else touched
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="bad native attention call"):
        kernels.decode_attention(q, k_cache, v_cache, 1, lens, k_new=k_new)  # one without the other


@needs_kernel
def test_decode_attention_reads_row_strided_views_of_one_qkv_in_place():
    """q/k/v as the engine hands them over: views into one ``[B, 3, H, D]`` projection."""
    kernels = native_kernels()
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(3, 3, 4, 16, generator=gen)
    q, k_new, v_new = qkv.unbind(1)
    assert not q.is_contiguous()
    k_cache, v_cache = torch.randn(3, 20, 4, 16, generator=gen), torch.randn(3, 20, 4, 16, generator=gen)
    lens = torch.tensor([1, 9, 20], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = kernels.decode_attention(q.contiguous(), want_k, want_v, 0, lens,
                                    k_new=k_new.contiguous(), v_new=v_new.contiguous())
    got = kernels.decode_attention(q, k_cache, v_cache, 0, lens, k_new=k_new, v_new=v_new)
    assert torch.equal(got, want) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    mixed = kernels.decode_attention(q, k_cache.clone(), v_cache.clone(), 0, lens,
                                     k_new=k_new.contiguous(), v_new=v_new)  # strides differ: copied, same answer
    assert torch.equal(mixed, want)
