"""Our GPT-2 against transformers.GPT2LMHeadModel on the same weights."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from promptfleet.platform.config import ModelConfig, resolve_dtype
from promptfleet.platform.linear_kernels import onednn_linear_available, resolve_kernels
from promptfleet.platform.model import DenseCache
from promptfleet.platform.native_kernels import build_support, kernel_support
from promptfleet.platform.random_checkpoint import make_random_checkpoint
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.platform.weights import load_gpt2
from promptfleet.testing.skips import needs_native


def _ours_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = DenseCache(model.config.n_layer)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model.logits(model(ids, pos, cache))


NO_ONEDNN = not onednn_linear_available(torch.device("cpu"), torch.float32)
ONEDNN = pytest.param("onednn", marks=pytest.mark.skipif(NO_ONEDNN, reason="this torch has no oneDNN"))
AVX512 = pytest.param("avx512", marks=needs_native(torch.float32))  # skips: promptfleet.testing.skips
KERNELS = ["torch", ONEDNN, AVX512]
BF16_NATIVE = kernel_support(torch.device("cpu"), torch.bfloat16).available
AVX512_BF16 = pytest.param("avx512", marks=needs_native(torch.bfloat16))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("shape", ["tiny", "small-test"])
def test_logits_match_transformers(tmp_path, shape, kernels):
    ckpt = make_random_checkpoint(tmp_path / shape, shape=shape, seed=7)  # unscaled: HF's own init
    ref = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    ours = load_gpt2(ckpt, linear_kernels=kernels)
    assert ours.linear_kernels == kernels
    ids = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    got = _ours_logits(ours, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("kernels", KERNELS)
def test_kv_cache_decode_matches_full_forward(tiny_checkpoint, kernels):
    """Decode steps and a multi-token chunk over a cache against transformers' own full
    forward (an independent causal mask, not ours)."""
    model = load_gpt2(tiny_checkpoint, linear_kernels=kernels)
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()(ids).logits
    cache = DenseCache(model.config.n_layer)
    model(ids[:, :8], torch.arange(8)[None].expand(2, 8), cache)
    steps = []
    for t in range(8, 12):
        hidden = model(ids[:, t:t + 1], torch.full((2, 1), t), cache)
        steps.append(model.logits(hidden))
    # multi-token chunk on top of a cache: the causal mask must be bottom-right aligned
    cache2 = DenseCache(model.config.n_layer)
    model(ids[:, :5], torch.arange(5)[None].expand(2, 5), cache2)
    chunk = model.logits(model(ids[:, 5:], torch.arange(5, 12)[None].expand(2, 7), cache2))
    tol = 1e-5 * full.abs().max()  # fp32 rounding on logits of this size (scaled weights)
    assert (torch.cat(steps, 1) - full[:, 8:]).abs().max() <= tol
    assert (chunk - full[:, 5:]).abs().max() <= tol


def test_config_refuses_other_models(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict({"model_type": "llama"})


def test_dtypes():
    assert resolve_dtype("cpu", None) == torch.float32
    assert resolve_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_dtype("cpu", "float16")


@pytest.mark.parametrize("kernels", ["torch", ONEDNN, AVX512_BF16])
def test_bfloat16_on_cpu_runs(tiny_checkpoint, kernels):
    model = load_gpt2(tiny_checkpoint, dtype=torch.bfloat16, linear_kernels=kernels)
    fp32 = load_gpt2(tiny_checkpoint)
    ids = torch.tensor([[15496, 995, 11, 314]])
    a, b = _ours_logits(model, ids), _ours_logits(fp32, ids)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_auto_kernels_pick_the_fastest_that_runs_and_refuse_unknown_names(tiny_checkpoint):
    expected = "avx512" if build_support().available else "torch" if NO_ONEDNN else "onednn"
    assert load_gpt2(tiny_checkpoint).linear_kernels == expected
    bf16 = "avx512" if BF16_NATIVE else "torch" if NO_ONEDNN else "onednn"  # native bf16: AVX512-BF16
    assert load_gpt2(tiny_checkpoint, dtype=torch.bfloat16).linear_kernels == bf16
    with pytest.raises(ValueError, match=r"avx512 linear kernel cannot run here: they run float32 \(or bfloat16\) on CPU"):
        resolve_kernels("avx512", torch.device("cpu"), torch.float16)
    assert resolve_kernels("auto", torch.device("cuda"), torch.float16) == "torch"
    with pytest.raises(ValueError, match="oneDNN linears need a CPU"):
        resolve_kernels("onednn", torch.device("cuda"), torch.float16)
    with pytest.raises(ValueError, match="unknown linear kernels"):
        load_gpt2(tiny_checkpoint, linear_kernels="fast")


def test_tokenizer_is_real_gpt2_bpe(tiny_checkpoint):
    assert load_tokenizer(None).encode("Hello world") == [15496, 995]
    assert load_tokenizer(tiny_checkpoint).encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_other_activations_match_transformers(tmp_path, activation, kernels):
    """oneDNN fuses the MLP activation into c_fc, the native kernel applies it after:
    each supported one must match."""
    import json

    ckpt = make_random_checkpoint(tmp_path / "ckpt", shape="tiny", seed=3, scale=8.0)  # activations O(1)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["activation_function"] = activation
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ref = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    got = _ours_logits(load_gpt2(ckpt, linear_kernels=kernels), ids)
    tol = 1e-5 * want.abs().max()  # fp32 rounding on logits of this size; a wrong GELU is ~100x off
    assert (got - want).abs().max() <= tol, ((got - want).abs().max(), tol)
