"""Adapter values against the backbone: soft prompts and KV prefixes that would overflow
the model are refused with the tensor and the bound named; adapters PEFT makes pass."""
from __future__ import annotations

import pytest
import torch

from promptfleet.platform.adapter import (ADAPTER_SCALE_LIMIT, AdapterError, AdapterWeights, BackboneScale,
                                          backbone_scale, build_prefix, check_values,
                                          load_adapter_dir)


def _filled(weights: AdapterWeights, value: float) -> AdapterWeights:
    return AdapterWeights(weights.peft_type, weights.num_virtual_tokens,
                          torch.full_like(weights.prompt_embeddings, value), weights.config)


def test_backbone_scale_is_measured_from_the_model(small_engine):
    scale = backbone_scale(small_engine.model)
    assert scale.embedding == pytest.approx(float(small_engine.model.wte.weight.abs().max()))
    assert 0 < scale.kv < 1e4 and scale.dtype == torch.float32


def test_peft_adapters_pass(small_engine, peft_adapters):
    for path in peft_adapters.values():
        small_engine.check_adapter(load_adapter_dir(path))


@pytest.mark.parametrize("name", ["pt_a", "ptune", "prefix"])
@pytest.mark.parametrize("value", [3e38, -1e7, 1e6])
def test_overflowing_values_are_refused_naming_the_tensor(small_engine, peft_adapters, name, value):
    weights = _filled(load_adapter_dir(peft_adapters[name]), value)
    with pytest.raises(AdapterError, match=rf"{weights.peft_type} prompt_embeddings has values up to .* over "
                                           rf"{ADAPTER_SCALE_LIMIT:g} x the backbone's"):
        small_engine.check_adapter(weights)


def test_values_that_overflow_the_serving_dtype_are_refused(peft_adapters):
    weights = _filled(load_adapter_dir(peft_adapters["pt_a"]), 70_000.0)  # fp16's max is 65504
    fp16 = BackboneScale(embedding=1e6, kv=1e6, dtype=torch.float16)
    with pytest.raises(AdapterError, match="not finite in the serving dtype float16"):
        check_values(weights, fp16)
    check_values(weights, BackboneScale(embedding=1e6, kv=1e6, dtype=torch.float32))


def test_prompt_whose_keys_overflow_is_refused_after_building(small_engine, peft_adapters):
    """A soft prompt within its own bound whose computed keys/values are not: caught on the
    built prefix (a key/value scale shrunk to stand for such a backbone)."""
    weights = load_adapter_dir(peft_adapters["pt_a"])
    real = backbone_scale(small_engine.model)
    tight = BackboneScale(embedding=real.embedding, kv=real.kv / 1e6, dtype=real.dtype)
    with pytest.raises(AdapterError, match="KV prefix's keys"):
        build_prefix(small_engine.model, weights, "k", tight)
    build_prefix(small_engine.model, weights, "k", real)
