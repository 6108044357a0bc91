"""The slot KV cache's attention (SDPA, FlexAttention's and the AVX-512 decode path) against plain
float64 attention over each row's own keys: rows at different lengths, prefill chunks
right-padded, decode steps, in fp32 and bf16 (bf16 attends in fp32 on CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from promptfleet.platform.config import ModelConfig
from promptfleet.platform.kv_cache import StepBatch, SlotBatch, SlotKVCache, resolve_attention
from promptfleet.platform.native_kernels import build_support, kernel_support
from promptfleet.testing.skips import needs_native

CFG = ModelConfig(n_layer=1, n_head=4, n_embd=32, n_positions=64)
H, D = CFG.n_head, CFG.head_dim
CFG16 = ModelConfig(n_layer=1, n_head=4, n_embd=64, n_positions=64)  # head_dim 16: the native kernel's unit
AVX512 = needs_native()  # why a skip is legitimate: promptfleet.testing.skips


def reference(history_k: list[torch.Tensor], history_v: list[torch.Tensor], q: torch.Tensor, b: int,
              start: int, n: int) -> torch.Tensor:
    """Row b's n new queries, in float64: [n, H, D]. No mask: query i (at position
    start + i) is written out over exactly its keys 0..start+i, one query at a time."""
    out = []
    for i in range(n):
        keys = history_k[b][: start + i + 1].double()      # [k, H, D]
        values = history_v[b][: start + i + 1].double()
        scores = torch.einsum("hd,khd->hk", q[b, i].double(), keys) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(out)


@pytest.mark.parametrize("backend, cfg, dtype, tol", [
    ("sdpa", CFG, torch.float32, 1e-5), ("sdpa", CFG, torch.bfloat16, 3e-2),
    ("flex", CFG16, torch.float32, 1e-5),  # FlexAttention decode (compiled by inductor's C++ backend here)
    pytest.param("avx512", CFG16, torch.float32, 1e-5, marks=AVX512)])
def test_slot_attention_matches_float64_reference(backend, cfg, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    H, D = cfg.n_head, cfg.head_dim
    cache = SlotKVCache(cfg, max_slots=4, max_len=40, device=torch.device("cpu"), dtype=dtype, backend=backend)
    # a NaN in never-written positions must not reach any row (each reads only its own keys)
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    rows, prompt_lens = 3, [5, 2, 7]
    history_k = [torch.randn(40, H, D, generator=gen).to(dtype) for _ in range(rows)]
    history_v = [torch.randn(40, H, D, generator=gen).to(dtype) for _ in range(rows)]
    lengths = [0] * rows

    def step(new: list[int], width: int) -> None:
        q = torch.randn(rows, width, H, D, generator=gen).to(dtype)
        k = torch.zeros(rows, width, H, D, dtype=dtype)
        v = torch.zeros(rows, width, H, D, dtype=dtype)
        for b in range(rows):
            k[b, : new[b]] = history_k[b][lengths[b]: lengths[b] + new[b]]
            v[b, : new[b]] = history_v[b][lengths[b]: lengths[b] + new[b]]
        batch = SlotBatch(cache, 0, list(lengths), new, width)
        assert (batch.native_lens is not None) == (backend == "avx512" and width == 1)
        out = batch.attend(0, q, k, v)
        for b in range(rows):
            want = reference(history_k, history_v, q, b, lengths[b], new[b])
            assert (out[b, : new[b]].double() - want).abs().max() <= tol, (b, lengths[b], new[b])
            lengths[b] += new[b]

    step(prompt_lens, max(prompt_lens))  # a right-padded prefill of different lengths
    for _ in range(6):                   # decode steps: every row at its own length
        step([1] * rows, 1)


def test_packed_groups_attend_like_separate_batches():
    """A decode group and a prefill group in one packed call give what each gives alone."""
    gen = torch.Generator().manual_seed(1)
    caches = [SlotKVCache(CFG, max_slots=4, max_len=40, device=torch.device("cpu"), dtype=torch.float32,
                          backend="sdpa") for _ in range(2)]
    warm = torch.randn(2, 6, H, D, generator=gen)
    for cache in caches:  # slots 0-1 hold 6 tokens already
        SlotBatch(cache, 0, [0, 0], [6, 6], 6).attend(0, warm, warm, warm)
    dq, dk = torch.randn(2, 1, H, D, generator=gen), torch.randn(2, 1, H, D, generator=gen)
    pq, pk = torch.randn(2, 4, H, D, generator=gen), torch.randn(2, 4, H, D, generator=gen)
    alone_d = SlotBatch(caches[0], 0, [6, 6], [1, 1], 1).attend(0, dq, dk, dk)
    alone_p = SlotBatch(caches[0], 2, [0, 0], [4, 3], 4).attend(0, pq, pk, pk)
    packed = StepBatch([SlotBatch(caches[1], 0, [6, 6], [1, 1], 1), SlotBatch(caches[1], 2, [0, 0], [4, 3], 4)])
    flat = lambda t: t.reshape(1, -1, H, D)  # noqa: E731
    out = packed.attend(0, torch.cat([flat(dq), flat(pq)], 1), torch.cat([flat(dk), flat(pk)], 1),
                        torch.cat([flat(dk), flat(pk)], 1))
    assert torch.allclose(out[0, :2], alone_d.reshape(2, H, D), atol=1e-6)
    assert torch.allclose(out[0, 2:].reshape(2, 4, H, D)[0], alone_p[0], atol=1e-6)
    assert torch.allclose(out[0, 2:].reshape(2, 4, H, D)[1, :3], alone_p[1, :3], atol=1e-6)


def test_resolve_attention_refuses_what_cannot_run_here():
    cpu = torch.device("cpu")
    assert resolve_attention("sdpa", cpu, torch.float32, 64) == "sdpa"
    bf16_native = kernel_support(cpu, torch.bfloat16).available  # needs AVX512-BF16
    assert resolve_attention("auto", cpu, torch.bfloat16, 64) == ("avx512" if bf16_native else "sdpa")
    assert resolve_attention("auto", cpu, torch.float32, 64) == ("avx512" if build_support().available else "sdpa")
    assert resolve_attention("auto", cpu, torch.float32, 8) == "sdpa"
    with pytest.raises(ValueError, match="avx512 attention kernel cannot run here: head_dim 8 is not a multiple of 16"):
        resolve_attention("avx512", cpu, torch.float32, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        resolve_attention("fast", cpu, torch.float32, 64)


@pytest.mark.parametrize("backend, pad", [("sdpa", 1), ("flash", 0)])
@pytest.mark.parametrize("budget_tokens, max_slots, want_slots", [(10_000, 64, 9), (100_000, 64, 64), (500, 8, 1)])
def test_cache_allocates_within_its_budget(backend, pad, budget_tokens, max_slots, want_slots):
    """Slots of max_len (+ pad) positions, as many as the budget holds (SDPA's scratch row
    counted; flash-attn has none), and one shorter slot when it holds less than one."""
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, n_positions=1024)
    per_token = 2 * 2 * 64 * 4
    budget = budget_tokens * per_token
    cache = SlotKVCache.for_budget(cfg, budget_bytes=budget, max_slots=max_slots, max_len=1024,
                                   device=torch.device("meta"), dtype=torch.float32, backend=backend)
    assert cache.bytes_per_token == per_token
    assert cache.allocated_bytes <= budget
    assert cache.k[0].shape[1] == cache.max_len + pad
    if budget_tokens >= 1024 + pad:
        assert (cache.max_slots, cache.max_len) == (min(max_slots, budget_tokens // (1024 + pad)), 1024)
    else:
        assert cache.max_slots == 1 and budget_tokens // 2 <= cache.max_len <= budget_tokens - pad
    with pytest.raises(ValueError, match="holds no sequence"):
        SlotKVCache.for_budget(cfg, budget_bytes=per_token, max_slots=4, max_len=1024, device=torch.device("meta"),
                               dtype=torch.float32, backend="sdpa")


@AVX512
def test_native_decode_attention_shares_kv_heads():
    """The slot cache's native decode path under grouped-query attention (9 query heads,
    3 KV heads, head_dim 64: SmolLM2's) equals SDPA's."""
    cfg = ModelConfig(family="llama", n_layer=1, n_head=9, n_kv_head=3, n_embd=576, n_positions=64)
    gen = torch.Generator().manual_seed(7)
    caches = [SlotKVCache(cfg, max_slots=3, max_len=40, device=torch.device("cpu"), dtype=torch.float32,
                          backend=b) for b in ("sdpa", "avx512")]
    warm_q, warm_kv = torch.randn(3, 9, 9, 64, generator=gen), torch.randn(3, 9, 3, 64, generator=gen)
    for cache in caches:
        SlotBatch(cache, 0, [0, 0, 0], [9, 5, 7], 9).attend(0, warm_q, warm_kv, warm_kv)
    q, k, v = (torch.randn(3, 1, h, 64, generator=gen) for h in (9, 3, 3))
    outs = [SlotBatch(c, 0, [9, 5, 7], [1, 1, 1], 1).attend(0, q, k, v) for c in caches]
    assert caches[1].decode_kernels is not None
    assert (outs[0] - outs[1]).abs().max() < 1e-5
