"""One step's host tensors travel in one copy: every piece comes back with its values,
shape and dtype (int64, int32, bool, float64 bits), and the step input's tensors are
on the model's device."""
from __future__ import annotations

import pytest
import torch

from promptfleet.platform.staging import StepStaging


def test_packed_pieces_come_back_exactly():
    stage = StepStaging(torch.device("cpu"), pack=True)  # the device layout, on CPU
    pieces = {"ids": torch.tensor([[5, 7, 50256]]), "lens": torch.tensor([3, 1], dtype=torch.int32),
              "mask": torch.tensor([True, False, True]),
              "u": torch.tensor([0.1, 1 - 2 ** -53, 1e-300], dtype=torch.float64), "empty": torch.zeros(0, 4).long()}
    staged = {k: stage.add(v) for k, v in pieces.items()}
    with pytest.raises(RuntimeError, match="before its step's staging was flushed"):
        staged["ids"].get()
    stage.flush()
    assert stage.copies == 1
    for name, host in pieces.items():
        got = staged[name].get()
        assert got.dtype == host.dtype and got.shape == host.shape and torch.equal(got, host), name


def test_float32_is_refused():
    with pytest.raises(TypeError, match="staging takes"):
        StepStaging(torch.device("cpu")).add(torch.zeros(2))


def test_step_input_is_built_on_the_models_device_in_one_copy():
    """Every tensor a step's forward reads (ids, positions, sampled rows, each group's cache
    indices) is on the cache's device ('meta' here stands for a GPU), moved in one copy."""
    from promptfleet.platform.config import ModelConfig, RepetitionConfig
    from promptfleet.platform.kv_cache import SlotKVCache
    from promptfleet.platform.sampling import SamplingParams
    from promptfleet.platform.sequence import Sequence
    from promptfleet.platform.step_input import build_step_input, plan_step

    meta = torch.device("meta")
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64)
    cache = SlotKVCache(cfg, max_slots=4, max_len=32, device=meta, dtype=torch.float32, backend="sdpa")
    seqs = []
    for slot, (prompt, cached) in enumerate([([1, 2, 3], 3), ([4, 5], 2), ([6, 7, 8, 9], 0)]):
        seq = Sequence(prompt_ids=prompt, params=SamplingParams(), adapter=None, emit=lambda d: None,
                       detokenize=lambda ids: "", eos_token_ids=(0,), repetition=RepetitionConfig())
        seq.slot, seq.cached = slot, cached
        seq.output_ids = [11] if cached else []
        seqs.append(seq)
    groups = plan_step(seqs, max_step_tokens=16)
    assert [g.is_prompt for g in groups] == [False, True]  # two decode rows, one prompt chunk
    stage = StepStaging(meta)
    batch = build_step_input(groups, cache, n_positions=64, device=meta, stage=stage)
    assert stage.copies == 1
    assert {t.device for t in (batch.ids, batch.positions, batch.last)} == {meta}
    decode, prompt = batch.ctx.groups
    assert decode._flat.get().device == meta and prompt._flat.get().device == meta
    assert decode._flat._stage is stage and prompt._start._stage is stage  # in that one copy
    assert prompt.mask.device == meta
