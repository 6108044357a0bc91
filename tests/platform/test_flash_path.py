"""The engine's flash-attn path (``SlotBatch._flash``) without a GPU.

flash-attn needs CUDA, and no GPU has been lent to this project's sessions. What CAN be
checked on CPU is our side of the call: the cache layout, ``cache_seqlens`` /
``cache_batch_idx``, new keys appended in place, padded prompt rows, packed groups. A
plain-torch implementation of ``flash_attn_with_kvcache``'s documented semantics stands
in for the kernel, and the engine on ``attention="flash"`` must give the same tokens as
on SDPA and as PEFT alone. (The kernel itself is flash-attn's to test.)
"""
from __future__ import annotations

import asyncio
import math
import sys
import types

import pytest
import torch

from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SamplingParams


def reference_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None,
                                      cache_batch_idx=None, causal=False, softmax_scale=None, **unsupported):
    """flash_attn_with_kvcache as its docstring defines it (flash-attn 2.x): q
    ``[B, Tq, H, D]``; caches ``[B_cache, T_cache, H, D]`` indexed by ``cache_batch_idx``;
    ``k``/``v`` written in place at ``cache_seqlens``; causal mask aligned bottom-right."""
    assert not unsupported, unsupported
    batch, tq, _, dim = q.shape
    scale = softmax_scale or 1.0 / math.sqrt(dim)
    rows = torch.arange(batch) if cache_batch_idx is None else cache_batch_idx.long()
    lens = torch.as_tensor(cache_seqlens).long().expand(batch)
    out = torch.empty_like(q)
    for b in range(batch):
        slot, length = int(rows[b]), int(lens[b])
        total = length
        if k is not None:
            k_cache[slot, length:length + k.shape[1]] = k[b]
            v_cache[slot, length:length + v.shape[1]] = v[b]
            total = length + k.shape[1]
        keys, values = k_cache[slot, :total], v_cache[slot, :total]        # [T, H, D]
        scores = torch.einsum("qhd,khd->hqk", q[b], keys) * scale
        if causal:
            allowed = torch.arange(total)[None, :] <= (total - tq + torch.arange(tq))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


@pytest.fixture
def fake_flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = reference_flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)


async def _answers(engine: Engine, requests, n_new: int, stagger: bool):
    params = SamplingParams(max_tokens=n_new, temperature=0.0, detect_repetition=False)
    if not stagger:
        return [r.token_ids for r in await asyncio.gather(*[engine.complete(p, params, adapter=a)
                                                            for a, p in requests])]
    started = asyncio.Event()

    async def run(adapter, prompt):
        tokens = []
        async for delta in engine.generate(prompt, params, adapter=adapter):
            tokens += delta.token_ids
            started.set()
        return tokens

    first = [asyncio.create_task(run(a, p)) for a, p in requests[:3]]
    await started.wait()  # the rest join while the first ones decode: packed prefill + decode
    return await asyncio.gather(*first, *[run(a, p) for a, p in requests[3:]])


@pytest.mark.parametrize("stagger, step_tokens", [(False, 512), (True, 512), (True, 8)])
async def test_flash_path_matches_sdpa_and_peft(fake_flash_attn, small_checkpoint, peft_adapters, peft_reference,
                                                stagger, step_tokens):
    """``step_tokens=8`` prefills the longer prompts in chunks (cache_seqlens > 0 with
    several new tokens: the causal mask must be aligned bottom-right)."""
    requests = [("pt_a", "The quick brown fox"), (None, "Hello world"), ("prefix", "a"),
                ("ptune", "Once upon a time in a land far away, long ago"), ("pt_b", "PromptFleet"),
                (None, "Mixed batches of many adapters on one backbone")]
    n_new = 8
    answers = {}
    for backend in ("flash", "sdpa"):
        engine = Engine.from_pretrained(small_checkpoint, EngineConfig(attention=backend, max_batch_size=8,
                                                                       max_step_tokens=step_tokens))
        try:
            assert engine.attention_backend == backend
            for name, path in peft_adapters.items():
                engine.add_adapter(name, load_adapter_dir(path))
            answers[backend] = await _answers(engine, requests, n_new, stagger)
        finally:
            engine.stop()
    assert answers["flash"] == answers["sdpa"]
    tok = engine.tokenizer
    for (adapter, prompt), got in zip(requests, answers["flash"]):
        want = peft_reference(small_checkpoint, peft_adapters[adapter] if adapter else None, tok.encode(prompt), n_new)
        assert got == want, (adapter, prompt)
