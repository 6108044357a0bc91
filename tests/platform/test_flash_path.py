"""The engine's flash-attn path (``SlotBatch._flash``) without a GPU.

flash-attn needs CUDA, and no GPU has been lent to this project's sessions. What CAN be
checked on CPU is our side of the call: the cache layout, ``cache_seqlens`` /
``cache_batch_idx``, new keys appended in place, padded prompt rows, packed groups. A
plain-torch implementation of ``flash_attn_with_kvcache``'s documented semantics stands
in for the kernel, asserting the kernel's contract (int32 indices on the same device, one
fp16/bf16 dtype, contiguous last dims, head_dim limits, appends inside the cache), and the
engine on ``attention="flash"`` must give the same tokens as on SDPA. (The kernel itself is
flash-attn's to test; scripts/gpu_check.sh runs it on a device.)
"""
from __future__ import annotations

import asyncio
import math
import sys
import types

import pytest
import torch

import promptfleet.platform.engine as engine_module
from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.attention_backend import AttentionChoice
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SamplingParams


def _check_contract(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx) -> None:
    """What the real kernel requires (flash-attn 2.x, ``flash_api.cpp`` ``mha_fwd_kvcache``):
    one device and one fp16/bf16 dtype for every tensor, contiguous last dims, int32
    ``cache_seqlens``/``cache_batch_idx`` on that device, head_dim a multiple of 8 up to
    256, whole query heads per KV head, and appended tokens inside the cache (the kernel
    does not bounds-check: a token past the end would write another slot's memory)."""
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v}
    for name, t in tensors.items():
        assert t.dtype in (torch.float16, torch.bfloat16), f"{name} is {t.dtype}: flash-attn takes fp16/bf16"
        assert t.dtype == q.dtype, f"{name} is {t.dtype}, q is {q.dtype}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
        assert t.stride(-1) == 1, f"{name} must have a contiguous last dimension"
    batch, tq, heads, dim = q.shape
    assert dim % 8 == 0 and dim <= 256, f"head_dim {dim}"
    assert k_cache.shape[-1] == dim and k_cache.shape == v_cache.shape
    assert heads % k_cache.shape[2] == 0, "query heads must be a multiple of KV heads"
    assert k.shape[:1] == (batch,) and k.shape[2:] == k_cache.shape[2:] and k.shape == v.shape
    for name, idx in (("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx)):
        assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int32, f"{name} must be an int32 tensor"
        assert idx.device == q.device and idx.shape == (batch,), f"{name}: {idx.device} {tuple(idx.shape)}"
    assert int(cache_batch_idx.max()) < k_cache.shape[0] and int(cache_batch_idx.min()) >= 0
    assert int((cache_seqlens + k.shape[1]).max()) <= k_cache.shape[1], "appended tokens past the cache's end"


def reference_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None,
                                      cache_batch_idx=None, causal=False, softmax_scale=None, **unsupported):
    """flash_attn_with_kvcache as its docstring defines it (flash-attn 2.x): q
    ``[B, Tq, H, D]``; caches ``[B_cache, T_cache, H_kv, D]`` indexed by ``cache_batch_idx``;
    ``k``/``v`` written in place at ``cache_seqlens``; causal mask aligned bottom-right;
    computed in float32 and returned in q's dtype, as the kernel accumulates. Asserts the
    kernel's contract first (``_check_contract``)."""
    assert not unsupported, unsupported
    assert k is not None and v is not None, "the engine always appends this step's keys"
    _check_contract(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx)
    batch, tq, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    scale = softmax_scale or 1.0 / math.sqrt(dim)
    out = torch.empty_like(q)
    for b in range(batch):
        slot, length = int(cache_batch_idx[b]), int(cache_seqlens[b])
        k_cache[slot, length:length + k.shape[1]] = k[b]
        v_cache[slot, length:length + v.shape[1]] = v[b]
        total = length + k.shape[1]
        keys = k_cache[slot, :total].float().repeat_interleave(group, dim=1)     # [T, H, D]
        values = v_cache[slot, :total].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].float(), keys) * scale
        if causal:
            allowed = torch.arange(total)[None, :] <= (total - tq + torch.arange(tq))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """flash-attn's stand-in, and the CUDA device it needs: the engine's backend check is
    told flash can run (the stand-in asserts what the device would)."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = reference_flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    real = engine_module.choose_attention

    def choose(name, device, dtype, head_dim, probe=None):
        if name == "flash":
            return AttentionChoice("flash", "the test's stand-in for flash-attn on a CUDA device")
        return real(name, device, dtype, head_dim, probe)

    monkeypatch.setattr(engine_module, "choose_attention", choose)


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
async def test_flash_path_matches_sdpa(fake_flash_attn, small_checkpoint, peft_adapters, stagger, step_tokens):
    """In bf16 (the stand-in, like the kernel, refuses fp32), the flash path gives SDPA's
    tokens for a mixed batch of prompt/P/prefix-tuning and plain requests;
    ``step_tokens=8`` prefills the longer prompts in chunks (cache_seqlens > 0 with several
    new tokens: the causal mask must be aligned bottom-right). (SDPA's tokens equal PEFT's
    in fp32: test_engine_peft; in bf16 near-ties of this random model differ from PEFT's
    bf16 forward, so PEFT is no reference here.)"""
    requests = [("pt_a", "The quick brown fox"), (None, "Hello world"), ("prefix", "a"),
                ("ptune", "Once upon a time in a land far away, long ago"), ("pt_b", "PromptFleet"),
                (None, "Mixed batches of many adapters on one backbone")]
    n_new = 8
    answers = {}
    for backend in ("flash", "sdpa"):
        engine = Engine.from_pretrained(small_checkpoint, EngineConfig(attention=backend, max_batch_size=8,
                                                                       dtype="bfloat16", max_step_tokens=step_tokens))
        try:
            assert engine.attention_backend == backend
            for name, path in peft_adapters.items():
                engine.add_adapter(name, load_adapter_dir(path))
            answers[backend] = await _answers(engine, requests, n_new, stagger)
        finally:
            engine.stop()
    assert answers["flash"] == answers["sdpa"]


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "int32"),
    (lambda a: a.update(cache_batch_idx=a["cache_batch_idx"].long()), "int32"),
    (lambda a: a.update({n: a[n].float() for n in ("q", "k_cache", "v_cache", "k", "v")}), "fp16/bf16"),
    (lambda a: a.update(q=a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)), "contiguous last"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10, 2], dtype=torch.int32)), "past the cache's end"),
])
def test_stand_in_refuses_what_the_kernel_would(change, message):
    """The stand-in fails the way the kernel would: a call the real kernel refuses (or
    that would write out of bounds) is refused here too."""
    gen = torch.Generator().manual_seed(0)
    bf = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    args = dict(q=bf(2, 1, 4, 16), k_cache=bf(3, 10, 2, 16), v_cache=bf(3, 10, 2, 16), k=bf(2, 1, 2, 16),
                v=bf(2, 1, 2, 16), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
    reference_flash_attn_with_kvcache(**{k: v.clone() for k, v in args.items()}, causal=True)  # the valid call runs
    change(args)
    with pytest.raises(AssertionError, match=message):
        reference_flash_attn_with_kvcache(**args, causal=True)
