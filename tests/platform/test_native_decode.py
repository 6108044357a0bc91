"""``NativeDecode`` (the decode-only step as a straight run of kernel calls) against the
block path it replaces: the same kernels in the same order, so the hidden states and the
K/V it stores must be identical, bit for bit, in fp32 and in bf16."""
from __future__ import annotations

import pytest
import torch

from promptfleet.platform.kv_cache import PackedBatch, SlotBatch, SlotKVCache
from promptfleet.platform.native_kernels import unavailable_for
from promptfleet.platform.weights import load_gpt2

CPU = torch.device("cpu")
FP32 = pytest.param(torch.float32, marks=pytest.mark.skipif(
    unavailable_for(CPU, torch.float32) is not None, reason=f"native kernels: {unavailable_for(CPU, torch.float32)}"))
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    unavailable_for(CPU, torch.bfloat16) is not None, reason=f"native bf16: {unavailable_for(CPU, torch.bfloat16)}"))


def _filled_cache(model, dtype: torch.dtype) -> SlotKVCache:
    cache = SlotKVCache(model.config, max_slots=8, max_len=64, device=CPU, dtype=dtype, backend="avx512")
    gen = torch.Generator().manual_seed(4)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.initialized = [cache.max_len + 1] * cache.max_slots
    return cache


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("starts", [[0, 3, 10, 40, 63], [5] * 8, [17]])
def test_fast_decode_is_the_block_path_bit_for_bit(small_checkpoint, dtype, starts):
    model = load_gpt2(small_checkpoint, dtype=dtype, linear_kernels="avx512")
    assert model.native_decode is not None
    fast_cache = _filled_cache(model, dtype)
    block_cache = _filled_cache(model, dtype)  # the same seeded contents
    rows = len(starts)
    ids = torch.randint(0, 50257, (1, rows), generator=torch.Generator().manual_seed(rows))
    positions = torch.tensor(starts)[None]
    with torch.inference_mode():
        ctx = PackedBatch([SlotBatch(fast_cache, 0, starts, [1] * rows, 1)])
        assert ctx.native_decode_plan() is not None
        fast = model(ids, positions, ctx)
        runner, model.native_decode = model.native_decode, None
        block = model(ids, positions, PackedBatch([SlotBatch(block_cache, 0, starts, [1] * rows, 1)]))
        model.native_decode = runner
    assert torch.isfinite(fast.float()).all()
    assert torch.equal(fast, block)
    assert all(torch.equal(a, b) for a, b in zip(fast_cache.k + fast_cache.v, block_cache.k + block_cache.v))


def test_only_a_single_group_of_one_token_rows_gets_a_plan(small_checkpoint):
    model = load_gpt2(small_checkpoint, linear_kernels="avx512" if unavailable_for(CPU, torch.float32) is None
                      else "torch")
    native = SlotKVCache(model.config, max_slots=8, max_len=64, device=CPU, dtype=torch.float32,
                         backend="avx512" if unavailable_for(CPU, torch.float32) is None else "sdpa")
    sdpa = SlotKVCache(model.config, max_slots=8, max_len=64, device=CPU, dtype=torch.float32, backend="sdpa")
    prompt = SlotBatch(native, 4, [0, 0], [3, 2], 3)
    assert PackedBatch([SlotBatch(sdpa, 0, [3], [1], 1)]).native_decode_plan() is None  # SDPA attention
    assert PackedBatch([prompt]).native_decode_plan() is None  # prompt tokens
    assert PackedBatch([SlotBatch(native, 0, [3, 4], [1, 1], 1), prompt]).native_decode_plan() is None  # mixed


def test_unfusable_activation_keeps_the_block_path(tmp_path):
    import json

    from promptfleet.platform.random_checkpoint import make_random_checkpoint

    if unavailable_for(CPU, torch.float32) is not None:
        pytest.skip(f"native kernels: {unavailable_for(CPU, torch.float32)}")
    ckpt = make_random_checkpoint(tmp_path / "erf", shape="small-test", seed=2)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    assert load_gpt2(ckpt, linear_kernels="avx512").native_decode is None  # erf GELU runs after the GEMM
