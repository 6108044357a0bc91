"""The decode fast path (``runner.ModelRunner``: a decode-only step replays the kernel calls
recorded from the module forward) against the module forward itself: the same kernels in
the same order, so hidden states and the K/V stored must be identical, bit for bit, for
GPT-2 and Llama, in fp32 and bf16, at batch sizes within one padded bucket (recorded at
one size, replayed at another). And the choice is made by the runner alone."""
from __future__ import annotations

import json

import pytest
import torch

from promptfleet.platform.kv_cache import StepBatch, SlotBatch, SlotKVCache
from promptfleet.platform.native_kernels import kernel_support
from promptfleet.platform.step_input import StepInput
from promptfleet.platform.random_checkpoint import make_random_checkpoint, make_random_llama_checkpoint
from promptfleet.platform.runner import ModelRunner
from promptfleet.platform.weights import load_model
from promptfleet.testing.skips import needs_native, require_native

CPU = torch.device("cpu")
NATIVE = kernel_support(CPU, torch.float32)
FP32 = pytest.param(torch.float32, marks=needs_native(torch.float32))  # skips: promptfleet.testing.skips
BF16 = pytest.param(torch.bfloat16, marks=needs_native(torch.bfloat16))


@pytest.fixture(scope="module")
def checkpoints(small_checkpoint, tmp_path_factory):
    llama = make_random_llama_checkpoint(tmp_path_factory.mktemp("llama-decode"), shape="llama-small-test", seed=5,
                                         scale=4.0)
    return {"gpt2": small_checkpoint, "llama": llama}


def _filled_cache(model, dtype: torch.dtype, backend: str = "avx512") -> SlotKVCache:
    cache = SlotKVCache(model.config, max_slots=12, max_len=64, device=CPU, dtype=dtype, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.initialized = [cache.max_len + 1] * cache.max_slots
    return cache


def _decode_batch(cache: SlotKVCache, starts: list[int], seed: int) -> StepInput:
    rows = len(starts)
    ids = torch.randint(0, 50257, (1, rows), generator=torch.Generator().manual_seed(seed))
    return StepInput(ids=ids, positions=torch.tensor(starts)[None],
                       ctx=StepBatch([SlotBatch(cache, 0, starts, [1] * rows, 1)]), last=torch.arange(rows))


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replayed_decode_is_the_module_path_bit_for_bit(checkpoints, family, dtype):
    model = load_model(checkpoints[family], dtype=dtype, linear_kernels="avx512")
    fast_cache, module_cache = _filled_cache(model, dtype), _filled_cache(model, dtype)
    runner = ModelRunner(model, fast_cache)
    assert runner.replays
    # the first step of a bucket records (and is that step), the later ones replay, with
    # fewer and more rows in the same padded bucket of 16
    for step, starts in enumerate([[0, 3, 10, 40, 63, 5, 5, 5, 17, 2], [6, 7, 8, 9, 10, 11, 12, 13, 14],
                                   [20, 21, 1, 22, 23, 24, 2, 25, 26, 27, 28, 30]]):
        with torch.inference_mode():
            fast = runner.forward(_decode_batch(fast_cache, starts, step))
            batch = _decode_batch(module_cache, starts, step)
            module = model(batch.ids, batch.positions, batch.ctx)
        assert torch.isfinite(fast.float()).all()
        assert torch.equal(fast, module), step
        assert all(torch.equal(a, b) for a, b in zip(fast_cache.k + fast_cache.v, module_cache.k + module_cache.v))
    assert list(runner._by_rows) == [16] and runner._by_rows[16].graph is not None


def test_only_decode_only_native_steps_replay(checkpoints, monkeypatch):
    """Prompt chunks, mixed steps and SDPA attention take the module forward; so does a
    model whose forward computes in torch between the kernels (unfusable erf GELU)."""
    if not NATIVE.available:
        require_native(torch.float32)
    model = load_model(checkpoints["llama"], linear_kernels="avx512")
    cache = _filled_cache(model, torch.float32)
    runner = ModelRunner(model, cache)
    calls = []
    monkeypatch.setattr(runner, "_decode", lambda batch, group: calls.append(group) or None)
    prompt = SlotBatch(cache, 4, [0, 0], [3, 2], 3)
    for ctx in (StepBatch([prompt]), StepBatch([SlotBatch(cache, 0, [3, 4], [1, 1], 1), prompt])):
        with torch.inference_mode():
            runner.forward(StepInput(ids=torch.ones(1, sum(ctx.sizes), dtype=torch.long),
                                       positions=torch.zeros(1, sum(ctx.sizes), dtype=torch.long), ctx=ctx,
                                       last=torch.zeros(1, dtype=torch.long)))
    assert calls == []
    assert not ModelRunner(model, _filled_cache(model, torch.float32, backend="sdpa")).replays
    with torch.inference_mode():
        runner.forward(_decode_batch(cache, [3, 4], 0))
    assert len(calls) == 1


def test_a_forward_that_computes_in_torch_keeps_the_module_path(tmp_path, caplog):
    if not NATIVE.available:
        require_native(torch.float32)
    ckpt = make_random_checkpoint(tmp_path / "erf", shape="small-test", seed=2)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    model = load_model(ckpt, linear_kernels="avx512")  # erf GELU runs in torch after the GEMM
    fast_cache, module_cache = _filled_cache(model, torch.float32), _filled_cache(model, torch.float32)
    runner = ModelRunner(model, fast_cache)
    for step in range(2):
        with torch.inference_mode():
            fast = runner.forward(_decode_batch(fast_cache, [5, 9, 2], step))
            batch = _decode_batch(module_cache, [5, 9, 2], step)
            assert torch.equal(fast, model(batch.ids, batch.positions, batch.ctx))
    assert runner._by_rows == {8: None}
    assert "keep the module path" in caplog.text and "gelu" in caplog.text
