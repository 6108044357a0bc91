"""Engine behaviour: seeds, stop strings, repetition cut, cancellation, limits, bad adapters."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import save_file

from promptfleet.platform.adapter import AdapterError, load_adapter_dir
from promptfleet.platform.config import EngineConfig, RepetitionConfig
from promptfleet.platform.engine import Engine, QueueFullError, RequestTooLargeError
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.sequence import find_repetition
from promptfleet.testing.engine_gate import StepGate
from promptfleet.testing.polling import wait_for_async


async def test_seeded_request_same_text_whatever_batch_mates(small_engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=1234)
    alone = await small_engine.complete("Seeds make sampling", params)
    mates = [small_engine.complete(f"mate {i}", SamplingParams(max_tokens=8 + i, temperature=1.2)) for i in range(6)]
    together = await asyncio.gather(*mates, small_engine.complete("Seeds make sampling", params))
    assert together[-1].token_ids == alone.token_ids
    other = await small_engine.complete("Seeds make sampling", SamplingParams(max_tokens=16, temperature=1.0,
                                                                              top_k=50, seed=4321))
    assert other.token_ids != alone.token_ids


async def test_stream_deltas_join_to_complete_text(small_engine):
    params = SamplingParams(max_tokens=20, temperature=0, detect_repetition=False)
    whole = await small_engine.complete("Streaming text", params)
    parts = [d async for d in small_engine.generate("Streaming text", params)]
    assert "".join(p.text for p in parts) == whole.text
    assert parts[-1].finish_reason == whole.finish_reason
    assert [t for p in parts for t in p.token_ids] == whole.token_ids


async def test_stop_string_cuts_text_and_is_never_streamed(small_engine):
    params = SamplingParams(max_tokens=24, temperature=0, detect_repetition=False)
    full = (await small_engine.complete("Stop here", params)).text
    assert len(full) > 12
    stop = full[5:9]  # a substring that appears in the greedy output
    cut = full[: full.index(stop)]
    stopped = SamplingParams(max_tokens=24, temperature=0, detect_repetition=False, stop=(stop, "NEVER"))
    parts = [d async for d in small_engine.generate("Stop here", stopped)]
    assert "".join(p.text for p in parts) == cut
    assert parts[-1].finish_reason == "stop"


def test_find_repetition():
    cfg = RepetitionConfig(max_ngram=4, min_repeats=3, min_span=6)
    assert find_repetition([5, 1, 2, 1, 2, 1, 2], cfg) == 1
    assert find_repetition([7, 7, 7, 7, 7, 7], cfg) == 0
    assert find_repetition([1, 2, 3, 1, 2, 4], cfg) is None


async def test_repetition_loop_is_cut(tiny_checkpoint):
    # a tiny random model under greedy decoding falls into loops quickly
    engine = Engine.from_pretrained(tiny_checkpoint, EngineConfig(
        repetition=RepetitionConfig(max_ngram=8, min_repeats=3, min_span=6)))
    try:
        found = None
        for prompt in ["a", "the", "Hello world", "loop loop", "x y z", "1 2 3"]:
            out = await engine.complete(prompt, SamplingParams(max_tokens=200, temperature=0))
            if out.finish_reason == "repetition":
                found = out
                break
        assert found is not None, "no greedy loop found to cut"
        assert len(found.token_ids) < 200
        assert find_repetition(found.token_ids, engine.config.repetition) is not None
        off = await engine.complete(prompt, SamplingParams(max_tokens=len(found.token_ids) + 10, temperature=0,
                                                           detect_repetition=False))
        assert off.token_ids[: len(found.token_ids)] == found.token_ids and off.finish_reason != "repetition"
    finally:
        engine.stop()


async def test_cancel_frees_cache_at_once(small_engine):
    gen = small_engine.generate("cancel me", SamplingParams(max_tokens=500, temperature=0, detect_repetition=False))
    await gen.__anext__()
    assert small_engine.stats().running == 1 and small_engine.stats().kv_reserved_tokens > 0
    await gen.aclose()
    await wait_for_async(lambda: small_engine.stats().running == 0, what="the cancelled request to leave the batch")
    assert small_engine.stats().kv_reserved_tokens == 0


async def test_kv_budget_bounds_admission(small_checkpoint):
    """kv_cache_bytes sizes the cache: 2.5 sequences' worth of 64 positions (keys and values,
    4 layers of width 128, fp32, written out here) hold two slots, so at most two of six
    waiting requests run at once, and a prompt longer than a slot is refused."""
    per_token = 2 * 4 * 128 * 4
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(kv_cache_bytes=per_token * 160, max_model_len=64))
    try:
        running_after_admit: list[int] = []
        admit = engine.scheduler.admit

        def spy():
            admitted = admit()
            running_after_admit.append(len(engine.scheduler.running))
            return admitted

        engine.scheduler.admit = spy
        params = SamplingParams(max_tokens=20, temperature=0, detect_repetition=False)
        with StepGate(engine) as gate:  # all six wait before the first step, so admission is what bounds them
            tasks = [asyncio.ensure_future(engine.complete(f"req {i}", params)) for i in range(6)]
            await wait_for_async(lambda: engine.stats().waiting == 6, what="six requests to be waiting")
            gate.open()
            done = await asyncio.gather(*tasks)
        assert [len(d.token_ids) for d in done] == [20] * 6
        assert max(running_after_admit) == 2
        with pytest.raises(RequestTooLargeError, match="context of 64"):
            await engine.complete([11] * 70, SamplingParams(max_tokens=4))
    finally:
        engine.stop()


async def test_queue_full_is_refused(small_checkpoint):
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_batch_size=1, max_queue=1))
    try:
        slow = SamplingParams(max_tokens=200, temperature=0, detect_repetition=False)
        with StepGate(engine, allow=1) as gate:  # the first request runs one step, then the engine waits
            first = engine.generate("one", slow)
            await first.__anext__()  # running
            second = asyncio.ensure_future(engine.complete("two", slow))
            await wait_for_async(lambda: engine.stats().waiting == 1, what="the second request to be waiting")
            assert engine.stats().running == 1
            with pytest.raises(QueueFullError, match="queue is full"):
                await engine.complete("three", slow)
            gate.open()
            await first.aclose()
            assert (await second).completion_tokens > 0
    finally:
        engine.stop()


def test_prompt_longer_than_context_is_refused(small_engine):
    with pytest.raises(RequestTooLargeError, match="context"):
        asyncio.run(small_engine.complete([11] * 1024, SamplingParams(max_tokens=4)))


def _write_adapter(path, config: dict, tensor: torch.Tensor):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": tensor}, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("config,tensor,message", [
    ({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}, torch.randn(4, 64),
     "width 64 does not fit"),
    ({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}, torch.randn(4, 128),
     "n_layer\\*2\\*n_kv_head\\*head_dim"),
    ({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2},
     torch.tensor([[float("nan")] * 128, [0.0] * 128]), "NaN or Inf"),
    ({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 1},
     torch.full((1, 128), float("inf")), "NaN or Inf"),
    ({"peft_type": "LORA", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}, torch.randn(4, 128),
     "unsupported peft_type 'LORA'"),
    ({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 4}, torch.randn(4, 128),
     "task_type"),
    ({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5}, torch.randn(4, 128),
     "expected \\[5, dim\\]"),
])
def test_bad_adapters_are_refused_with_reason(small_engine, tmp_path, config, tensor, message):
    with pytest.raises(AdapterError, match=message):
        small_engine.build_adapter(load_adapter_dir(_write_adapter(tmp_path / "a", config, tensor)), "bad")


def test_pickle_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter_dir(tmp_path)


async def test_soft_prompt_costs_no_prefill(small_engine, peft_adapters):
    """Only the request's own tokens are prefilled: the 7 virtual tokens are copied."""
    small_engine.add_adapter("pt_a", load_adapter_dir(peft_adapters["pt_a"]))
    before = small_engine.stats().prompt_tokens
    ids = small_engine.encode("count my prefill")
    await small_engine.complete(ids, SamplingParams(max_tokens=2, temperature=0), adapter="pt_a")
    assert small_engine.stats().prompt_tokens - before == len(ids)


async def test_prompts_of_different_lengths_are_prefilled_without_padding(small_engine):
    """Admitted together, prompts of lengths 3, 9, 9 and 20 go through the model as
    exactly 41 tokens (one group per run of equal lengths), and still answer as alone."""
    seen: list[list[tuple[int, int]]] = []
    forward = small_engine._forward_and_sample

    def spy(groups):
        seen.append([(len(g.seqs), max(len(t) for t in g.new_tokens)) for g in groups if g.is_prompt])
        return forward(groups)

    prompts = [list(range(100, 103)), list(range(200, 209)), list(range(300, 309)), list(range(400, 420))]
    params = SamplingParams(max_tokens=4, temperature=0, detect_repetition=False)
    alone = [(await small_engine.complete(p, params)).token_ids for p in prompts]
    small_engine._forward_and_sample = spy
    together = await asyncio.gather(*[small_engine.complete(p, params) for p in prompts])
    assert [t.token_ids for t in together] == alone
    prefill = [groups for groups in seen if groups][0]
    assert prefill == [(1, 3), (2, 9), (1, 20)]
    assert sum(rows * width for rows, width in prefill) == 41


async def test_bf16_engine_mixed_batch_answers_as_alone_and_near_fp32(small_checkpoint, peft_adapters):
    """bf16 on CPU (the native bf16 kernels where the CPU has AVX512-BF16, else oneDNN): a
    mixed batch of adapters gives each request its tokens alone, and greedy text close to
    the fp32 engine's (bf16 rounding may flip a late near-tie, not most tokens)."""
    engines = {dtype: Engine.from_pretrained(small_checkpoint, EngineConfig(max_batch_size=16, dtype=dtype))
               for dtype in ("bfloat16", "float32")}
    try:
        for engine in engines.values():
            for name in ("pt_a", "prefix"):
                engine.add_adapter(name, load_adapter_dir(peft_adapters[name]))
        params = SamplingParams(max_tokens=12, temperature=0, detect_repetition=False)
        requests = [("Mixed batches", "pt_a"), ("share one pass", "prefix"), ("in bf16 too", None)]
        bf16 = engines["bfloat16"]
        alone = [(await bf16.complete(p, params, adapter=a)).token_ids for p, a in requests]
        together = await asyncio.gather(*[bf16.complete(p, params, adapter=a) for p, a in requests])
        assert [t.token_ids for t in together] == alone
        fp32 = [(await engines["float32"].complete(p, params, adapter=a)).token_ids for p, a in requests]
        same = sum(x == y for b, f in zip(alone, fp32) for x, y in zip(b, f))
        assert same >= 0.75 * sum(len(f) for f in fp32), (alone, fp32)
    finally:
        for engine in engines.values():
            engine.stop()
