"""The disk tier of KV prefixes: round trip, keyed by weights, corruption detected."""
from __future__ import annotations

import torch

from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.platform.adapter import AdapterWeights, build_prefix
from promptfleet.platform.weights import load_gpt2, weights_id


def _weights(n=5, d=64, seed=0):
    return AdapterWeights("PROMPT_TUNING", n, torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def test_stored_prefix_equals_built_and_skips_the_build(tiny_checkpoint, tmp_path):
    model = load_gpt2(tiny_checkpoint)
    store = PrefixStore(tmp_path, weights_id=weights_id(tiny_checkpoint), dtype=torch.float32, device="cpu")
    calls = []

    def build(w, key):
        calls.append(key)
        return build_prefix(model, w, key)

    build_or_load = store.builder(build)
    first = build_or_load(_weights(), "sha-a")
    second = build_or_load(_weights(), "sha-a")
    assert calls == ["sha-a"] and store.hits == 1
    assert torch.equal(first.k, second.k) and torch.equal(first.v, second.v)
    assert second.peft_type == "PROMPT_TUNING" and second.num_virtual_tokens == 5


def test_other_weights_do_not_share_prefixes(tiny_checkpoint, tmp_path):
    model = load_gpt2(tiny_checkpoint)
    a = PrefixStore(tmp_path, weights_id="weights-A", dtype=torch.float32, device="cpu")
    b = PrefixStore(tmp_path, weights_id="weights-B", dtype=torch.float32, device="cpu")
    a.save(build_prefix(model, _weights(), "sha-a"))
    assert a.load("sha-a") is not None and b.load("sha-a") is None


def test_corrupt_file_is_dropped_and_rebuilt(tiny_checkpoint, tmp_path):
    model = load_gpt2(tiny_checkpoint)
    store = PrefixStore(tmp_path, weights_id="w", dtype=torch.float32, device="cpu")
    prefix = build_prefix(model, _weights(), "sha-a")
    store.save(prefix)
    path = next(tmp_path.rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor bytes
    path.write_bytes(bytes(data))
    assert store.load("sha-a") is None and store.corrupt == 1 and not path.exists()
    rebuilt = store.builder(lambda w, key: build_prefix(model, w, key))(_weights(), "sha-a")
    assert torch.equal(rebuilt.k, prefix.k)
