"""Mixed batches against PEFT itself: every request's greedy tokens inside a batch of
other adapters, prompt lengths and no-adapter requests equal PeftModel.generate alone."""
from __future__ import annotations

import asyncio

import pytest

from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.sampling import SamplingParams

GREEDY = dict(temperature=0.0, detect_repetition=False)


def test_adapter_types_and_shapes(peft_adapters):
    assert load_adapter_dir(peft_adapters["pt_a"]).peft_type == "PROMPT_TUNING"
    assert load_adapter_dir(peft_adapters["ptune"]).peft_type == "P_TUNING"
    w = load_adapter_dir(peft_adapters["prefix"])
    assert w.peft_type == "PREFIX_TUNING" and w.prompt_embeddings.shape == (6, 4 * 2 * 128)


async def test_mixed_batch_matches_peft_generate(small_checkpoint, small_engine, peft_adapters, peft_reference):
    engine = small_engine
    for name, path in peft_adapters.items():
        engine.add_adapter(name, load_adapter_dir(path))
    tok = engine.tokenizer
    prompts = ["The quick brown fox", "Hello world", "Once upon a time in a land far away there lived",
               "PromptFleet serves", "a", "Mixed batches of soft prompts and prefixes"]
    requests = [(name, prompts[i % len(prompts)]) for i, name in enumerate(["pt_a", "pt_b", "ptune", "prefix"])]
    requests += [(None, prompts[4]), ("prefix", prompts[2]), ("pt_a", prompts[5]), (None, prompts[0])]
    n_new = 12
    results = await asyncio.gather(*[
        engine.complete(p, SamplingParams(max_tokens=n_new, **GREEDY), adapter=a) for a, p in requests])
    for (adapter, prompt), got in zip(requests, results):
        want = peft_reference(small_checkpoint, peft_adapters[adapter] if adapter else None, tok.encode(prompt), n_new)
        assert got.token_ids == want, (adapter, prompt)
        if got.finish_reason == "stop":  # EOS ends both
            assert len(want) == len(got.token_ids)


@pytest.mark.parametrize("adapter", ["pt_a", "prefix", None])
async def test_output_independent_of_batch_mates(small_engine, peft_adapters, adapter):
    engine = small_engine
    for name, path in peft_adapters.items():
        engine.add_adapter(name, load_adapter_dir(path))
    params = SamplingParams(max_tokens=10, **GREEDY)
    alone = await engine.complete("Independent of company", params, adapter=adapter)
    crowd = [engine.complete(f"noise {i} " * (i + 1), SamplingParams(max_tokens=5 + i, temperature=0.9, seed=i),
                             adapter=["pt_b", "ptune", None][i % 3]) for i in range(9)]
    together = await asyncio.gather(engine.complete("Independent of company", params, adapter=adapter), *crowd)
    assert together[0].token_ids == alone.token_ids


async def test_requests_joining_mid_stream_ride_the_decode_pass_and_match_peft(
        small_checkpoint, small_engine, peft_adapters, peft_reference):
    """Prompts admitted while others decode go through the same forward as the decode
    tokens (packed groups); every request must still equal PEFT alone."""
    engine = small_engine
    for name, path in peft_adapters.items():
        engine.add_adapter(name, load_adapter_dir(path))
    passes: list[list[tuple[bool, int]]] = []
    forward = engine._forward_and_sample

    def spy(groups):
        passes.append([(g.is_prompt, len(g.seqs)) for g in groups])
        return forward(groups)

    engine._forward_and_sample = spy
    n_new = 10
    first = [("pt_a", "The quick brown fox"), (None, "Hello world"), ("prefix", "a")]
    later = [("ptune", "Once upon a time in a land far away"), ("pt_b", "PromptFleet"), (None, "Mixed batches")]

    async def run(adapter, prompt, started: asyncio.Event | None = None):
        tokens = []
        async for delta in engine.generate(prompt, SamplingParams(max_tokens=n_new, **GREEDY), adapter=adapter):
            tokens += delta.token_ids
            if started is not None:
                started.set()
        return tokens

    started = asyncio.Event()
    early = [asyncio.create_task(run(a, p, started)) for a, p in first]
    await started.wait()  # the first requests are decoding now
    results = await asyncio.gather(*early, *[run(a, p) for a, p in later])
    assert any(len(groups) >= 2 and not groups[0][0] and all(g[0] for g in groups[1:]) for groups in passes), passes
    for (adapter, prompt), got in zip(first + later, results):
        want = peft_reference(small_checkpoint, peft_adapters[adapter] if adapter else None,
                              engine.tokenizer.encode(prompt), n_new)
        assert got == want, (adapter, prompt)


async def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(small_checkpoint, peft_adapters,
                                                                         peft_reference):
    """Chunked prefill: with a 32-token step budget, a ~150-token prompt (behind a
    prefix-tuning adapter) is prefilled over several steps, each also carrying the running
    streams' decode tokens; its answer and theirs still equal PEFT's."""
    from promptfleet.platform.config import EngineConfig
    from promptfleet.platform.engine import Engine

    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_step_tokens=32, max_batch_size=8))
    try:
        for name, path in peft_adapters.items():
            engine.add_adapter(name, load_adapter_dir(path))
        steps: list[list[tuple[bool, bool, int]]] = []
        forward = engine._forward_and_sample

        def spy(groups):
            steps.append([(g.is_prompt, g.sample, g.tokens) for g in groups])
            return forward(groups)

        engine._forward_and_sample = spy
        n_new = 8
        long_prompt = " ".join(f"item {i}," for i in range(50))
        started = asyncio.Event()

        async def run(adapter, prompt, signal: bool = False):
            tokens = []
            async for delta in engine.generate(prompt, SamplingParams(max_tokens=n_new if not signal else 24,
                                                                      **GREEDY), adapter=adapter):
                tokens += delta.token_ids
                if signal:
                    started.set()
            return tokens

        early = [asyncio.create_task(run(a, p, signal=True)) for a, p in [("pt_a", "Hello"), (None, "The fleet")]]
        await started.wait()
        late = await run("prefix", long_prompt)
        early_out = await asyncio.gather(*early)
    finally:
        engine.stop()
    ids = engine.tokenizer.encode(long_prompt)
    assert len(ids) > 100
    assert late == peft_reference(small_checkpoint, peft_adapters["prefix"], ids, n_new)
    for (adapter, prompt), got in zip([("pt_a", "Hello"), (None, "The fleet")], early_out):
        want = peft_reference(small_checkpoint, peft_adapters[adapter] if adapter else None,
                              engine.tokenizer.encode(prompt), 24)
        assert got == want, (adapter, prompt)
    inner_chunks = [s for s in steps if any(is_prompt and not sample for is_prompt, sample, _ in s)]
    assert len(inner_chunks) >= 3, steps                      # the long prompt took several steps ...
    assert all(any(not is_prompt for is_prompt, _, _ in s) for s in inner_chunks)  # ... each with decode rows
    assert all(sum(n for *_, n in s) <= 32 for s in steps), steps  # and no forward carried more than the budget
