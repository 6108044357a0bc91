"""The bf16 native kernels (csrc/gemm_bf16_avx512.c, bf16 decode attention) against torch's
bf16 and an fp32/float64 reference, and our bf16 GPT-2 on them against transformers: its
error from the fp32 reference must be no worse than transformers' own in bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from promptfleet.platform.model import DenseCache
from promptfleet.platform.native_kernels import native_kernels
from promptfleet.platform.native_layers import NativeLinear
from promptfleet.platform.weights import load_gpt2
from promptfleet.testing.skips import needs_native

pytestmark = needs_native(torch.bfloat16)  # why a skip is legitimate: promptfleet.testing.skips


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("shape", [(48, 16), (100, 64), (2304, 96), (77, 2)])
def test_bf16_linear_is_as_close_as_torchs(rows, shape):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.1).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16()
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    ref = x.double() @ weight.double().T + bias.double()  # exact on the bf16 inputs
    with torch.inference_mode():
        layer = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        got = NativeLinear(layer, native_kernels())(x)
        want = F.linear(x, weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # both round an fp32 sum to bf16 once: within a bf16 step of the exact answer
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("activation,fn", [("gelu_new", lambda y: F.gelu(y, approximate="tanh")), ("relu", F.relu)])
def test_bf16_epilogue_matches_torch(activation, fn):
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(200, 64, generator=gen) * 0.2).bfloat16()
    x, residual = torch.randn(16, 64, generator=gen).bfloat16(), torch.randn(16, 200, generator=gen).bfloat16()
    kernels = native_kernels()
    packed = kernels.pack(weight)
    got = kernels.linear(x, packed, 200, activation=activation, residual=residual)
    ref = fn(x.double() @ weight.double().T) + residual.double()
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 2e-3).all()  # rounded once, at the end


def test_bf16_refusals():
    kernels = native_kernels()
    with pytest.raises(ValueError, match="inner dimension: it must be even"):
        kernels.pack(torch.randn(48, 15).bfloat16())
    packed = kernels.pack(torch.randn(48, 16).bfloat16())
    with pytest.raises(ValueError, match="bad native GEMM call"):
        kernels.linear(torch.randn(8, 16), packed, 48)  # fp32 rows on a bf16 weight
    with pytest.raises(ValueError, match="bad native GEMM call"):
        kernels.linear(torch.randn(8, 16).bfloat16(), packed, 48, torch.randn(48))  # fp32 bias


@pytest.mark.parametrize("heads, dim", [(12, 64), (3, 16)])
def test_bf16_decode_attention_matches_float64(heads, dim):
    gen = torch.Generator().manual_seed(heads)
    slots, positions = 5, 70
    k_cache = torch.randn(slots, positions, heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots, positions, heads, dim, generator=gen).bfloat16()
    q, k_new, v_new = (torch.randn(4, heads, dim, generator=gen).bfloat16() for _ in range(3))
    lens = torch.tensor([1, 2, 33, 70], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    got = native_kernels().decode_attention(q, k_cache, v_cache, 1, lens, k_new=k_new, v_new=v_new)
    assert got.dtype == torch.bfloat16
    for b, n in enumerate(lens.tolist()):
        want_k[1 + b, n - 1], want_v[1 + b, n - 1] = k_new[b], v_new[b]
        keys, values = want_k[1 + b, :n].double().transpose(0, 1), want_v[1 + b, :n].double().transpose(0, 1)
        scores = (q[b].double()[:, None] @ keys.transpose(1, 2)) / dim ** 0.5
        ref = (scores.softmax(-1) @ values)[:, 0]
        assert ((got[b].double() - ref).abs() <= ref.abs() * 2**-8 + 1e-4).all(), b
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # the step's token stored


@pytest.mark.parametrize("shape", [(1, 768), (32, 768), (3, 5, 17), (300, 768)])
@pytest.mark.parametrize("affine", [True, False])
def test_bf16_layer_norm_is_as_close_as_torchs(shape, affine):
    """Computed in fp32 and rounded once, like torch's bf16 layer norm: within one bf16
    rounding of the float64 answer on the same bf16 inputs (tails past 16 and the threaded
    path included)."""
    gen = torch.Generator().manual_seed(shape[-1] + len(shape))
    x = (torch.randn(*shape, generator=gen) * 3 + 50).bfloat16()
    weight = torch.randn(shape[-1], generator=gen).bfloat16() if affine else None
    bias = torch.randn(shape[-1], generator=gen).bfloat16() if affine else None
    got = native_kernels().layer_norm(x, weight, bias, 1e-5)
    xd = x.double()
    ref = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    if affine:
        ref = ref * weight.double() + bias.double()
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()
    want = F.layer_norm(x, (shape[-1],), weight, bias, 1e-5)
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-2)


def test_bf16_model_is_as_close_to_fp32_as_transformers_bf16(tmp_path):
    from promptfleet.platform.random_checkpoint import make_random_checkpoint

    ckpt = make_random_checkpoint(tmp_path / "small", shape="small-test", seed=11)
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = GPT2LMHeadModel.from_pretrained(ckpt).eval()(ids).logits
        hf_bf16 = GPT2LMHeadModel.from_pretrained(ckpt, dtype=torch.bfloat16).eval()(ids).logits.float()
        ours = load_gpt2(ckpt, dtype=torch.bfloat16, linear_kernels="avx512")
        assert ours.linear_kernels == "avx512"
        cache = DenseCache(ours.config.n_layer)
        got = ours.logits(ours(ids, torch.arange(ids.shape[1])[None].expand_as(ids), cache))
    ours_err, hf_err = (got - ref).abs().mean().item(), (hf_bf16 - ref).abs().mean().item()
    assert ours_err <= 1.5 * hf_err, (ours_err, hf_err)
