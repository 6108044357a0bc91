"""Beam search in the engine against transformers' ``generate(num_beams=k)``: the same
beams, best first, for GPT-2 and Llama (two EOS ids), with and without PEFT adapters
(PEFT's own no-cache generate as the reference), across length penalties and the three
early-stopping modes; beams inside mixed batches equal the beams alone; the prompt's KV is
never copied per beam; a cancelled or failed search frees every slot it held."""
from __future__ import annotations

import asyncio
import collections
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine, RequestTooLargeError
from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing import make_peft_adapter
from promptfleet.testing.peft import load_reference_model, reference_beams

PROMPTS = [[464, 2068, 7586, 21831], [10, 20, 30, 40, 50, 60, 70], [1, 2]]
# (beams, returned, max_tokens, length_penalty, early_stopping)
SEARCHES = [(2, 1, 8, 1.0, False), (4, 2, 10, 1.0, False), (3, 3, 7, 0.0, "never"), (4, 4, 9, 2.0, "never"),
            (3, 2, 9, -1.0, True), (5, 1, 6, 1.0, True)]


def _with_eos(checkpoint: Path, out: Path, eos: list[int]) -> Path:
    """A copy of ``checkpoint`` whose end-of-sequence ids are ``eos``."""
    shutil.copytree(checkpoint, out)
    for name in ("config.json", "generation_config.json"):
        if (out / name).exists():
            cfg = json.loads((out / name).read_text())
            cfg["eos_token_id"] = eos if len(eos) > 1 else eos[0]
            (out / name).write_text(json.dumps(cfg))
    return out


def _early_tokens(checkpoint: Path, count: int) -> list[int]:
    """The third token of the best beam on each of the first ``count`` prompts: as EOS
    ids they end some beams early (so EOS scoring and the length penalty decide ranks)."""
    model = load_reference_model(checkpoint, None)
    return [reference_beams(model, ids, num_beams=4, num_return=1, max_new_tokens=4, eos_token_ids=[0])[0][0][2]
            for ids in PROMPTS[:count]]


@pytest.fixture(scope="module")
def gpt2_eos(small_checkpoint, tmp_path_factory):
    return _with_eos(small_checkpoint, tmp_path_factory.mktemp("gpt2-eos") / "ckpt", _early_tokens(small_checkpoint, 1))


@pytest.fixture(scope="module")
def llama_eos(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-beams")
    base = make_random_llama_checkpoint(root / "base", shape="llama-small-test", seed=41, scale=6.0,
                                        num_hidden_layers=3, hidden_size=96, num_attention_heads=6,
                                        num_key_value_heads=2, intermediate_size=192)
    return _with_eos(base, root / "ckpt", _early_tokens(base, 2))


def _eos(checkpoint: Path) -> list[int]:
    eos = json.loads((checkpoint / "config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


async def _check_parity(checkpoint: Path, adapter_dir: Path | None, searches=SEARCHES, prompts=PROMPTS) -> int:
    """Every search on every prompt equals transformers'; returns how many beams ended on EOS."""
    reference = load_reference_model(checkpoint, adapter_dir)
    engine = Engine.from_pretrained(checkpoint, EngineConfig(max_batch_size=16))
    adapter = None if adapter_dir is None else engine.add_adapter("a", load_adapter_dir(adapter_dir))
    eos, stopped = _eos(checkpoint), 0
    try:
        for k, n, max_tokens, lp, early in searches:
            for ids in prompts:
                want = reference_beams(reference, ids, num_beams=k, num_return=n, max_new_tokens=max_tokens,
                                       eos_token_ids=eos, length_penalty=lp, early_stopping=early)
                got = await engine.beam_search(ids, SamplingParams(max_tokens=max_tokens),
                                               BeamParams(k, n, length_penalty=lp, early_stopping=early), adapter)
                assert [(g.token_ids, g.finish_reason == "stop") for g in got] == want, (k, n, lp, early, ids)
                assert all(g.finish_reason in ("stop", "length") for g in got)
                stopped += sum(ended for _, ended in want)
    finally:
        engine.stop()
    return stopped


async def test_gpt2_beams_equal_transformers(gpt2_eos):
    assert await _check_parity(gpt2_eos, None) > 0  # some beams end on EOS: its scoring is exercised


async def test_llama_beams_equal_transformers_with_two_eos_ids(llama_eos):
    assert len(_eos(llama_eos)) == 2
    assert await _check_parity(llama_eos, None) > 0


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
async def test_gpt2_adapter_beams_equal_peft(gpt2_eos, tmp_path, method):
    adapter = make_peft_adapter(gpt2_eos, tmp_path / method, method, 5, 7)
    await _check_parity(gpt2_eos, adapter, searches=SEARCHES[:3], prompts=PROMPTS[:2])


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
async def test_llama_adapter_beams_equal_peft(llama_eos, tmp_path, method):
    """(Prefix tuning on Llama has no PEFT reference here: PEFT's no-cache generate reuses
    one prefix cache that the model appends to, see ``testing.peft.peft_greedy``; the mixed
    batch test below runs a Llama prefix adapter's beams against the same beams alone.)"""
    adapter = make_peft_adapter(llama_eos, tmp_path / method, method, 4, 9)
    await _check_parity(llama_eos, adapter, searches=SEARCHES[:3], prompts=PROMPTS[:2])


async def test_repetition_penalty_applies_to_beams_as_in_transformers(gpt2_eos):
    reference = load_reference_model(gpt2_eos, None)
    engine = Engine.from_pretrained(gpt2_eos, EngineConfig(max_batch_size=8))
    try:
        for ids in PROMPTS:
            want = reference_beams(reference, ids, num_beams=3, num_return=2, max_new_tokens=8,
                                   eos_token_ids=_eos(gpt2_eos), repetition_penalty=1.8)
            got = await engine.beam_search(ids, SamplingParams(max_tokens=8, repetition_penalty=1.8),
                                           BeamParams(3, 2))
            assert [(g.token_ids, g.finish_reason == "stop") for g in got] == want
    finally:
        engine.stop()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
async def test_beams_in_mixed_batches_equal_beams_alone(family, gpt2_eos, llama_eos, tmp_path):
    """Beam searches of several widths and adapters, greedy and seeded sampled requests,
    all at once: every request gets what it gets alone."""
    checkpoint = gpt2_eos if family == "gpt2" else llama_eos
    engine = Engine.from_pretrained(checkpoint, EngineConfig(max_batch_size=24, max_step_tokens=32))
    for name, method in (("pt", "prompt_tuning"), ("prefix", "prefix_tuning")):
        engine.add_adapter(name, load_adapter_dir(make_peft_adapter(checkpoint, tmp_path / name, method, 4, 3)))
    beams = [(PROMPTS[0], BeamParams(4, 2), "prefix"), (PROMPTS[1], BeamParams(3, 3, early_stopping=True), None),
             (PROMPTS[2], BeamParams(2, 1, length_penalty=0.5), "pt"), (PROMPTS[1], BeamParams(5, 2), "prefix")]
    plain = [(PROMPTS[i % 3], SamplingParams(max_tokens=9, temperature=0.0 if i % 2 else 0.8, seed=i,
                                             detect_repetition=False), [None, "pt", "prefix"][i % 3])
             for i in range(6)]
    try:
        alone_beams = [await engine.beam_search(ids, SamplingParams(max_tokens=9), b, a) for ids, b, a in beams]
        alone_plain = [(await engine.complete(ids, p, a)).token_ids for ids, p, a in plain]
        together = await asyncio.gather(*[engine.beam_search(ids, SamplingParams(max_tokens=9), b, a)
                                          for ids, b, a in beams],
                                        *[engine.complete(ids, p, a) for ids, p, a in plain])
        assert [[r.token_ids for r in res] for res in together[:len(beams)]] == \
            [[r.token_ids for r in res] for res in alone_beams]
        assert [r.token_ids for r in together[len(beams):]] == alone_plain
        assert not engine.scheduler.running and engine.stats().kv_reserved_tokens == 0
    finally:
        engine.stop()


async def test_prompt_kv_is_never_copied_per_beam(gpt2_eos, tmp_path):
    """The adapter prefix goes into the head's slot only, and a fork copies only a beam's
    own generated positions (from the shared length on)."""
    engine = Engine.from_pretrained(gpt2_eos, EngineConfig(max_batch_size=8))
    engine.add_adapter("pt", load_adapter_dir(make_peft_adapter(gpt2_eos, tmp_path / "pt", "prompt_tuning", 6, 1)))
    prefixes, moves = [], []
    copy_prefix, move = engine.cache.copy_prefix, engine.cache.move
    engine.cache.copy_prefix = lambda slot, prefix: (prefixes.append(slot), copy_prefix(slot, prefix))
    engine.cache.move = lambda src, dst, length, start=0: (moves.append((start, length)), move(src, dst, length, start))
    ids = PROMPTS[1]
    try:
        await engine.beam_search(ids, SamplingParams(max_tokens=10), BeamParams(4, 1), "pt")
    finally:
        engine.stop()
    shared = 6 + len(ids)
    assert len(prefixes) == 1
    assert moves and all(start == shared and length > shared for start, length in moves)


async def test_cancelled_search_frees_every_slot(gpt2_eos):
    engine = Engine.from_pretrained(gpt2_eos, EngineConfig(max_batch_size=8))
    try:
        task = asyncio.create_task(engine.beam_search(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True),
                                                      BeamParams(4, 1)))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if any(s.beam is not None and s.beam.started for s in engine.scheduler.running):
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not engine.scheduler.running:
                break
            await asyncio.sleep(0.01)
        assert not engine.scheduler.running and engine.stats().kv_reserved_tokens == 0
        after = await engine.complete(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0))
        assert len(after.token_ids) >= 1
    finally:
        engine.stop()


async def test_wider_than_the_batch_is_refused(gpt2_eos):
    engine = Engine.from_pretrained(gpt2_eos, EngineConfig(max_batch_size=4))
    try:
        with pytest.raises(RequestTooLargeError, match="5 beams"):
            await engine.beam_search(PROMPTS[0], SamplingParams(max_tokens=4), BeamParams(5, 1))
    finally:
        engine.stop()


def test_beam_params_are_checked():
    with pytest.raises(ValueError, match="at least 2 beams"):
        BeamParams(1)
    with pytest.raises(ValueError, match="between 1 and the beam width"):
        BeamParams(2, 3)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamParams(2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="length_penalty"):
        BeamParams(2, length_penalty=float("nan"))


def test_reference_is_transformers_beam_search(gpt2_eos):
    """The reference helper is transformers' beam search (not greedy): with 4 beams some
    prompt's best beam differs from greedy decoding."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_eos).eval()
    eos = _eos(gpt2_eos)
    greedy = [reference_beams(model, ids, num_beams=1, num_return=1, max_new_tokens=8, eos_token_ids=eos)[0]
              for ids in PROMPTS]
    beams = [reference_beams(model, ids, num_beams=4, num_return=1, max_new_tokens=8, eos_token_ids=eos)[0]
             for ids in PROMPTS]
    assert greedy != beams


def test_a_search_that_goes_non_finite_fails_alone(gpt2_eos):
    """Two searches in the same steps; one's shared prompt K/V turns to NaN mid-search (what
    a broken adapter would do): it fails with a numerical error, the other finishes with the
    beams it gets alone. The engine is stepped by hand, so nothing races."""
    from promptfleet.platform.beam_group import BeamGroup

    engine = Engine.from_pretrained(gpt2_eos, EngineConfig(max_batch_size=8))
    params, beam = SamplingParams(max_tokens=8, ignore_eos=True), BeamParams(3, 1)
    try:
        alone = asyncio.run(engine.beam_search(PROMPTS[1], params, beam))
        engine.stop()
        results: dict[int, list] = {}

        def search(i: int, ids: list[int]) -> BeamGroup:
            return BeamGroup.create(prompt_ids=ids, params=params, beam=beam, adapter=None,
                                    emit=lambda r, i=i: results.setdefault(i, r), detokenize=engine._detokenize,
                                    eos_token_ids=engine.model_config.eos_token_ids,
                                    repetition=engine.config.repetition, max_model_len=engine.max_model_len)

        bad, good = search(0, PROMPTS[0]), search(1, PROMPTS[1])
        engine.scheduler.add(bad.head)
        engine.scheduler.add(good.head)
        engine.step()
        engine.step()
        assert bad.started and good.started and not results
        for layer in range(engine.model_config.n_layer):
            engine.cache.k[layer][bad.head.slot, 0] = float("nan")
        for _ in range(20):
            if len(results) == 2:
                break
            engine.step()
        assert results[0][0].error_code == "numerical_error"
        assert [r.token_ids for r in results[1]] == [r.token_ids for r in alone]
        assert not engine.scheduler.running
    finally:
        engine.stop()
