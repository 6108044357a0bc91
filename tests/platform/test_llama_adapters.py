"""PEFT prompt-learning adapters made by PEFT itself on a seeded random Llama base
(grouped-query attention: 6 query heads, 2 KV heads) served through our engine: KV
prefixes sized by the KV heads, logits equal to PeftModel's, mixed batches equal to
PeftModel's greedy tokens, and adapters made for another base refused."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from promptfleet.platform.adapter import AdapterError, build_prefix, load_adapter_dir
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.model import DenseCache
from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.weights import load_model
from promptfleet.testing import make_peft_adapter, peft_greedy

GREEDY = dict(temperature=0.0, detect_repetition=False)
# not GPT-2 small-test's shape (4 layers, 4 heads, d=128), so adapters made for it cannot fit
SHAPE = dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=192)
SPECS = {"pt_a": ("prompt_tuning", 7, 1), "pt_b": ("prompt_tuning", 3, 2),
         "ptune": ("p_tuning", 5, 3), "prefix": ("prefix_tuning", 6, 4)}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return make_random_llama_checkpoint(tmp_path_factory.mktemp("llama-base"), shape="llama-small-test",
                                        seed=21, scale=6.0, **SHAPE)


@pytest.fixture(scope="module")
def llama_adapters(llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-adapters")
    return {name: make_peft_adapter(llama_base, root / name, m, n, s) for name, (m, n, s) in SPECS.items()}


@pytest.fixture
def llama_engine(llama_base, llama_adapters):
    engine = Engine.from_pretrained(llama_base, EngineConfig(max_batch_size=16))
    for name, path in llama_adapters.items():
        engine.add_adapter(name, load_adapter_dir(path))
    yield engine
    engine.stop()


def test_prefix_tuning_is_sized_by_the_kv_heads(llama_adapters):
    """PEFT gives a grouped-query model's prefix n_layer * 2 * n_kv_head * head_dim columns."""
    w = load_adapter_dir(llama_adapters["prefix"])
    assert w.prompt_embeddings.shape == (6, 3 * 2 * 2 * 16)
    assert (w.config["token_dim"], w.config["num_attention_heads"]) == (32, 2)
    pt = load_adapter_dir(llama_adapters["pt_a"])
    assert pt.prompt_embeddings.shape == (7, 96) and pt.config["num_attention_heads"] == 6


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_equal_peft_model(llama_base, llama_adapters, name):
    """Our shared KV prefix (prompt run through the backbone at positions 0..n-1, or the
    prefix's keys used as stored, unrotated) then the request at positions n..: PeftModel's
    logits on the real tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(llama_base, linear_kernels="torch")
    weights = load_adapter_dir(llama_adapters[name])
    prefix = build_prefix(model, weights, name)
    assert prefix.k.shape == (3, 2, weights.num_virtual_tokens, 16)  # the KV heads only
    ids = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(5))
    n = weights.num_virtual_tokens
    cache = DenseCache(model.config.n_layer)
    cache.k = [prefix.k[layer][None].expand(2, -1, -1, -1) for layer in range(model.config.n_layer)]
    cache.v = [prefix.v[layer][None].expand(2, -1, -1, -1) for layer in range(model.config.n_layer)]
    got = model.logits(model(ids, torch.arange(n, n + 11)[None].expand(2, 11), cache))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base), llama_adapters[name]).eval()
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -11:]
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()


async def test_mixed_batch_matches_peft_generate(llama_base, llama_engine, llama_adapters):
    engine = llama_engine
    tok = engine.tokenizer
    prompts = ["The quick brown fox", "Hello world", "Once upon a time in a land far away there lived",
               "PromptFleet serves", "a", "Mixed batches of soft prompts and prefixes"]
    requests = [(name, prompts[i % len(prompts)]) for i, name in enumerate(["pt_a", "pt_b", "ptune", "prefix"])]
    requests += [(None, prompts[4]), ("prefix", prompts[2]), ("pt_a", prompts[5]), ("ptune", prompts[0])]
    n_new = 12
    results = await asyncio.gather(*[
        engine.complete(p, SamplingParams(max_tokens=n_new, **GREEDY), adapter=a) for a, p in requests])
    for (adapter, prompt), got in zip(requests, results):
        want = peft_greedy(llama_base, llama_adapters[adapter] if adapter else None, tok.encode(prompt), n_new)
        assert got.token_ids == want, (adapter, prompt)
    # the adapters do change the answers (else equality would prove little)
    assert len({tuple(r.token_ids) for (a, p), r in zip(requests, results) if p == prompts[0]}) == 2


async def test_output_independent_of_batch_mates(llama_engine):
    params = SamplingParams(max_tokens=10, **GREEDY)
    alone = await llama_engine.complete("Independent of company", params, adapter="prefix")
    crowd = [llama_engine.complete(f"noise {i} " * (i + 1), SamplingParams(max_tokens=5 + i, temperature=0.9, seed=i),
                                   adapter=["pt_b", "ptune", None][i % 3]) for i in range(7)]
    together = await asyncio.gather(llama_engine.complete("Independent of company", params, adapter="prefix"),
                                    *crowd)
    assert together[0].token_ids == alone.token_ids


def _with_config(path, tmp_path, **changes):
    """A copy of the adapter at ``path`` whose adapter_config.json has ``changes``."""
    out = tmp_path / f"{path.name}-changed"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    config = json.loads((path / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


def test_adapters_for_another_base_are_refused(llama_engine, llama_adapters, peft_adapters, small_engine,
                                               tmp_path):
    """GPT-2 adapters on the Llama engine, Llama adapters on a GPT-2 engine, and a prefix
    or prompt whose config names other heads or layers: AdapterError (the API's 400)."""
    for name in ("pt_a", "ptune", "prefix"):
        with pytest.raises(AdapterError, match="does not fit|does not match"):
            llama_engine.build_adapter(load_adapter_dir(peft_adapters[name]), f"gpt2-{name}")
        with pytest.raises(AdapterError, match="does not fit|does not match"):
            small_engine.build_adapter(load_adapter_dir(llama_adapters[name]), f"llama-{name}")
    # same widths, another base: a multi-head Llama's prefix counts 6 heads of 16, not 2
    with pytest.raises(AdapterError, match="num_attention_heads=6 does not match the backbone \\(2\\)"):
        llama_engine.build_adapter(load_adapter_dir(
            _with_config(llama_adapters["prefix"], tmp_path, num_attention_heads=6)), "mha-prefix")
    with pytest.raises(AdapterError, match="num_layers=4"):
        llama_engine.build_adapter(load_adapter_dir(
            _with_config(llama_adapters["pt_a"], tmp_path, num_layers=4)), "deeper")
