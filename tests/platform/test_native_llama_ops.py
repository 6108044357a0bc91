"""The Llama family's native kernels (csrc/llama_ops_avx512.c, grouped-query decode
attention) against float64 references and against our torch Llama's own operations, at odd
sizes (row tails, widths that are not multiples of 16), in fp32 and bf16 (the element-wise
kernels take bf16 on any AVX-512F CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promptfleet.platform.config import ModelConfig, RopeScaling
from promptfleet.platform.llama import RMSNorm, Rotary, apply_rope
from promptfleet.platform.native_kernels import native_kernels
from promptfleet.platform.native_layers import NativeRMSNorm, NativeRotary
from promptfleet.testing.skips import needs_native

pytestmark = needs_native()  # why a skip is legitimate: promptfleet.testing.skips


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows, d", [(1, 16), (7, 64), (9, 576), (3, 37)])
def test_rms_norm_matches_float64_and_torch(rows, d):
    x = torch.randn(rows, d, generator=_gen(d)) * 3
    norm = RMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=_gen(d + 1)))
    got = NativeRMSNorm(norm, native_kernels())(x)
    xd = x.double()
    want = norm.weight.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got - norm(x)).abs().max() <= 2e-6 * want.abs().max()  # torch's own fp32, up to summation order
    half = NativeRMSNorm(norm.to(torch.bfloat16), native_kernels())(x.bfloat16())
    torch_half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - torch_half.float()).abs().max() <= 2 ** -7 * want.abs().max()


def _config(head_dim: int, scaling: RopeScaling | None = None) -> ModelConfig:
    return ModelConfig(family="llama", n_layer=1, n_head=2, n_kv_head=1, n_embd=2 * head_dim,
                       explicit_head_dim=head_dim, rope_theta=10000.0, rope_scaling=scaling)


@pytest.mark.parametrize("head_dim", [16, 64, 40])
@pytest.mark.parametrize("scaling", [None, RopeScaling("llama3", 8.0, 1.0, 4.0, 32)])
def test_rope_matches_apply_rope_in_place(head_dim, scaling):
    """q and k adjacent in one qkv row (one call) and apart (two calls), positions far
    past the first few (angles of thousands of radians), against ``apply_rope`` in float64."""
    rotary = Rotary(_config(head_dim, scaling))
    native = NativeRotary(rotary, native_kernels())
    b, t, heads, kv_heads = 2, 5, 4, 2
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 100, 1023, 4096, 8191]])
    qkv = torch.randn(b, t, (heads + 2 * kv_heads) * head_dim, generator=_gen(head_dim))
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(b, t, heads, head_dim), k.view(b, t, kv_heads, head_dim)
    ref = rotary(positions, torch.float64)
    want_q, want_k = apply_rope(q.double(), ref.cos, ref.sin), apply_rope(k.double(), ref.cos, ref.sin)
    torch_q, torch_k = rotary(positions, torch.float32)(q, k)
    got_q, got_k = native(positions, torch.float32)(q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    for got, want, torch_out in ((got_q, want_q, torch_q), (got_k, want_k, torch_k)):
        assert (got.double() - want).abs().max() < 5e-6
        assert (got - torch_out).abs().max() < 5e-6
    # apart: k from another tensor
    q2 = torch.randn(b, t, heads, head_dim, generator=_gen(1))
    k2 = torch.randn(b, t, kv_heads, head_dim, generator=_gen(2))
    want2 = apply_rope(k2.double(), ref.cos, ref.sin)
    _, got_k2 = native(positions, torch.float32)(q2.clone(), k2.clone())
    assert (got_k2.double() - want2).abs().max() < 5e-6


def test_rope_bf16_rounds_like_torch():
    rotary = Rotary(_config(64))
    positions = torch.arange(6)[None]
    x = torch.randn(1, 6, 3, 64, generator=_gen(3)).bfloat16()
    want, _ = rotary(positions, torch.bfloat16)(x, x[:, :, :1])
    got, _ = NativeRotary(rotary, native_kernels())(positions, torch.bfloat16)(x.clone(), x[:, :, :1].clone())
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


@pytest.mark.parametrize("rows, width", [(1, 16), (5, 1536), (3, 37)])
def test_silu_gate_matches_float64(rows, width):
    gate_up = torch.randn(rows, 2 * width, generator=_gen(width)) * 6
    gate_up[0, 0], gate_up[0, width] = -100.0, 3.0   # exp(100): no overflow to NaN
    got = native_kernels().silu_gate(gate_up)
    g, u = gate_up.double().chunk(2, dim=-1)
    want = F.silu(g) * u
    assert got.shape == (rows, width)
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    half = native_kernels().silu_gate(gate_up.bfloat16())
    gh, uh = gate_up.bfloat16().chunk(2, dim=-1)
    assert (half.float() - (F.silu(gh) * uh).float()).abs().max() <= 2 ** -7 * want.abs().max()
    nan = gate_up.clone()
    nan[-1, 0] = float("nan")
    assert torch.isnan(native_kernels().silu_gate(nan)[-1, 0])


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 1), (4, 4)])
def test_grouped_query_decode_attention_matches_float64(heads, kv_heads):
    """Query head h reads KV head h // (heads / kv_heads); q/k/v read in place from one
    qkv row, the new token stored first."""
    dim, slots, positions, batch = 64, 5, 300, 3
    gen = _gen(heads * 10 + kv_heads)
    k_cache = torch.randn(slots, positions, kv_heads, dim, generator=gen)
    v_cache = torch.randn(slots, positions, kv_heads, dim, generator=gen)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen) * 3
    q = qkv[:, :heads * dim].view(batch, heads, dim)
    k_new = qkv[:, heads * dim:(heads + kv_heads) * dim].view(batch, kv_heads, dim)
    v_new = qkv[:, (heads + kv_heads) * dim:].view(batch, kv_heads, dim)
    lens = torch.tensor([1, 77, 300], dtype=torch.int32)
    got = native_kernels().decode_attention(q, k_cache, v_cache, 1, lens, k_new=k_new, v_new=v_new)
    group = heads // kv_heads
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(k_cache[1 + b, n - 1], k_new[b]) and torch.equal(v_cache[1 + b, n - 1], v_new[b])
        keys = k_cache[1 + b, :n].double().repeat_interleave(group, dim=1)
        values = v_cache[1 + b, :n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].double(), keys) / math.sqrt(dim)
        want = torch.einsum("hk,khd->hd", scores.softmax(-1), values)
        assert (got[b].double() - want).abs().max() < 2e-5, (b, n)
    with pytest.raises(ValueError, match="bad native attention call"):  # 4 query heads cannot share 3 KV heads
        native_kernels().decode_attention(torch.zeros(2, 4, 16), torch.zeros(2, 8, 3, 16), torch.zeros(2, 8, 3, 16),
                                           0, torch.tensor([1, 2], dtype=torch.int32))


def test_refusals():
    kernels = native_kernels()
    with pytest.raises(ValueError, match="bad native RMSNorm call"):
        kernels.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="bad native RMSNorm call"):
        kernels.rms_norm(torch.zeros(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="bad native SiLU-gate call"):
        kernels.silu_gate(torch.zeros(2, 7))
    cos, sin = kernels.rope_table(torch.arange(3), torch.ones(8))
    with pytest.raises(ValueError, match="bad native RoPE call"):
        kernels.rope(torch.zeros(3, 2, 16).transpose(1, 2), cos, sin)  # heads not dense
    with pytest.raises(ValueError, match="bad native RoPE table call"):
        kernels.rope_table(torch.arange(3, dtype=torch.int32), torch.ones(8))
