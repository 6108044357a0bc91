"""Decode-only steps through the CUDA-graph path's static buffers, on CPU: the graph is
``EagerGraph`` (the same static-buffer forward, re-run at each replay), so the buckets,
the padded rows (copies of the last one), the ragged attention and the fallback to eager
are tested against PEFT where no GPU is."""
from __future__ import annotations

import asyncio
import logging

import pytest

from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.decode_graphs import bucket_for
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing.engine_gate import StepGate

REQUESTS = [("pt_a", "The quick brown fox"), (None, "Hello world"), ("prefix", "a"),
            ("ptune", "Once upon a time in a land far away"), ("pt_b", "PromptFleet")]


@pytest.mark.parametrize("rows, max_rows, want", [(1, 64, 1), (3, 64, 4), (16, 64, 16), (17, 64, 24),
                                                  (33, 64, 48), (33, 40, 40), (41, 40, None), (0, 8, None)])
def test_bucket_choice(rows, max_rows, want):
    assert bucket_for(rows, max_rows) == want


async def _together(engine: Engine, n_new: int) -> list[list[int]]:
    """Every request queued before the engine's first step (the gate holds it), each with its
    own length, so decode-only steps run 5, 4, 3, 2 then 1 rows (buckets 8, 4, 2, 1)."""
    with StepGate(engine) as gate:
        params = [SamplingParams(max_tokens=n_new + 2 * i, temperature=0.0, detect_repetition=False)
                  for i in range(len(REQUESTS))]
        tasks = [asyncio.create_task(engine.complete(p, params[i], adapter=a)) for i, (a, p) in enumerate(REQUESTS)]
        await asyncio.sleep(0)  # every task has submitted its request
        gate.open()
        return [r.token_ids for r in await asyncio.gather(*tasks)]


async def test_graph_path_gives_peft_tokens(small_checkpoint, peft_adapters, peft_reference):
    """(FlexAttention's ragged decode, the graph's attention on CUDA without flash-attn,
    is tested against float64 attention in test_kv_cache; compiling it here would double
    this test's time.)"""
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(attention="sdpa", decode_graphs="eager",
                                                                   max_batch_size=8))
    try:
        for name, path in peft_adapters.items():
            engine.add_adapter(name, load_adapter_dir(path))
        answers = await _together(engine, 4)
    finally:
        engine.stop()
    graphs = engine.runner.graphs
    assert graphs.replays > 0 and set(graphs._buckets) == {8, 4, 2, 1}  # padded rows in 8 and 4
    for i, ((adapter, prompt), got) in enumerate(zip(REQUESTS, answers)):
        want = peft_reference(small_checkpoint, peft_adapters[adapter] if adapter else None,
                              engine.tokenizer.encode(prompt), 4 + 2 * i)
        assert got == want, (adapter, prompt)


async def test_a_failed_capture_falls_back_to_eager(small_checkpoint, peft_adapters, peft_reference, caplog):
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(attention="sdpa", decode_graphs="eager",
                                                                   max_batch_size=8))

    def refuse(fn, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine.runner.graphs._graph = refuse
    try:
        with caplog.at_level(logging.WARNING, logger="promptfleet.platform.decode_graphs"):
            got = await engine.complete("Hello world", SamplingParams(max_tokens=5, temperature=0.0,
                                                                      detect_repetition=False))
    finally:
        engine.stop()
    assert got.token_ids == peft_reference(small_checkpoint, None, engine.tokenizer.encode("Hello world"), 5)
    assert caplog.text.count("stay eager: capturing their graph failed") == 1
    assert engine.runner.graphs._buckets == {1: None} and engine.runner.graphs.replays == 0


def test_graphs_are_off_on_cpu_by_default(small_checkpoint):
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(attention="sdpa"))
    assert engine.runner.graphs is None
    with pytest.raises(ValueError, match="decode_graphs must be"):
        Engine.from_pretrained(small_checkpoint, EngineConfig(decode_graphs="always"))
