"""The native modules against torch: ``NativeLinear``'s fused epilogue (tanh GELU, ReLU,
residual add) against ``F.gelu``/``F.relu``/``r + F.linear``, including values where a
naive tanh overflows and NaN; ``NativeLayerNorm`` against ``F.layer_norm``; and that our
GPT-2 packed for ``avx512`` uses them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptfleet.platform.native_kernels import native_kernels
from promptfleet.platform.native_layers import NativeLayerNorm, NativeLinear
from promptfleet.testing.skips import needs_native

pytestmark = needs_native()  # why a skip is legitimate: promptfleet.testing.skips

EXTREMES = torch.tensor([0.0, -0.0, 1e-6, -1e-6, 3.0, -3.0, 12.0, -12.0, 60.0, -60.0, 1e4, -1e4, 3e38, -3e38])


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("activation,fn", [
    ("gelu_new", lambda y: F.gelu(y, approximate="tanh")),
    ("gelu_fast", lambda y: F.gelu(y, approximate="tanh")),
    ("relu", F.relu),
    ("gelu", F.gelu),  # erf GELU: not in the kernel, runs after it in torch
])
def test_fused_activation_matches_torch(rows, activation, fn):
    torch.manual_seed(rows)
    linear = nn.Linear(40, 70)
    x = torch.randn(rows, 40) * 3
    with torch.inference_mode():
        got = NativeLinear(linear, native_kernels(), activation=activation)(x)
        want = fn(F.linear(x, linear.weight, linear.bias))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("activation,fn", [("gelu_new", lambda y: F.gelu(y, approximate="tanh")), ("relu", F.relu)])
def test_fused_activation_at_extremes_and_nan(activation, fn):
    """An identity weight puts chosen values straight into the epilogue."""
    values = torch.cat([EXTREMES, torch.tensor([float("nan"), float("inf"), float("-inf")])])
    n = values.numel()
    with torch.inference_mode():
        got = NativeLinear(nn.Linear(n, n, bias=False).requires_grad_(False).weight.copy_(torch.eye(n)),
                           native_kernels(), activation=activation)(torch.diag(values))
    got, want = got.diagonal(), fn(values)
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], atol=1e-6, rtol=1e-6), (got - want)
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])


@pytest.mark.parametrize("rows", [5, 32])
def test_residual_add_is_fused(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 50)
    x, residual = torch.randn(1, rows, 96), torch.randn(1, rows, 50)
    before = residual.clone()
    with torch.inference_mode():
        layer = NativeLinear(linear, native_kernels())
        got = layer(x, residual=residual)
        plain = layer(x)
        ref = F.linear(x, linear.weight, linear.bias)
    assert got.shape == (1, rows, 50)
    assert torch.allclose(got, residual + ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(plain, ref, atol=1e-5, rtol=1e-5)  # without a residual nothing is added
    assert torch.equal(residual, before)  # the residual is read, never written


def test_bad_epilogue_calls_are_refused():
    gemm = native_kernels()
    packed = gemm.pack(torch.randn(48, 16))
    with pytest.raises(ValueError, match="activation 'gelu'"):
        gemm.linear(torch.randn(8, 16), packed, 48, activation="gelu")
    with pytest.raises(ValueError, match=r"residual \(8, 47\)"):
        gemm.linear(torch.randn(8, 16), packed, 48, residual=torch.randn(8, 47))
    with pytest.raises(ValueError, match="residual add after an unfused activation"):
        NativeLinear(torch.randn(48, 16), gemm, activation="gelu")(torch.randn(8, 16), residual=torch.randn(8, 48))


@pytest.mark.parametrize("shape", [(1, 768), (32, 768), (3, 5, 17), (300, 768), (2, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, affine):
    torch.manual_seed(shape[-1] + len(shape))
    norm = nn.LayerNorm(shape[-1], eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(*shape) * 4 + 1000  # a large mean: a one-pass variance would lose it
    with torch.inference_mode():
        got = NativeLayerNorm(norm, native_kernels())(x)
        want = norm(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_layer_norm_keeps_nan_to_its_row_and_refuses_other_tensors():
    x = torch.randn(4, 64)
    x[2, 7] = float("nan")
    got = native_kernels().layer_norm(x, None, None, 1e-5)
    assert got[2].isnan().all() and not got[[0, 1, 3]].isnan().any()
    with pytest.raises(ValueError, match="bad native layer norm call"):
        native_kernels().layer_norm(x.to(torch.float16), None, None, 1e-5)
    with pytest.raises(ValueError, match="bad native layer norm call"):
        native_kernels().layer_norm(x, torch.ones(63), None, 1e-5)
    with pytest.raises(ValueError, match="bad native layer norm call"):
        native_kernels().layer_norm(x, torch.ones(64, dtype=torch.bfloat16), None, 1e-5)  # mixed dtypes
    with pytest.raises(ValueError, match="normalises one dimension"):
        NativeLayerNorm(nn.LayerNorm((4, 64)), native_kernels())


def test_packed_model_uses_the_native_layers(tiny_checkpoint):
    from promptfleet.platform.weights import load_gpt2

    model = load_gpt2(tiny_checkpoint, linear_kernels="avx512")
    block = model.blocks[0]
    assert isinstance(block.ln_1, NativeLayerNorm) and isinstance(model.ln_f, NativeLayerNorm)
    assert isinstance(block.mlp_proj, NativeLinear) and block.c_fc.fused == "gelu_new"
    assert block.ln_1.weight is not None and block.ln_1.weight.data_ptr() == model.blocks[0].ln_1.weight.data_ptr()
