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


# --- the shared tier (S3): one replica builds, another reads ---------------------------------
import hashlib  # noqa: E402

from promptfleet.adapters.blob_url import S3Location  # noqa: E402
from promptfleet.adapters.device_cache import AdapterCache  # noqa: E402
from promptfleet.adapters.s3_storage import S3Config, S3Objects, S3SharedPrefixes  # noqa: E402

ADAPTER_SHA = hashlib.sha256(b"an adapter blob").hexdigest()
KEY = f"{ADAPTER_SHA}:gpt2-test-fingerprint"


def _replica(root, shared, wid="w"):
    return PrefixStore(root, weights_id=wid, dtype=torch.float32, device="cpu", shared=shared)


def test_a_prefix_built_on_one_replica_is_read_by_another(tiny_checkpoint, tmp_path, s3_bucket, s3_proxy):
    model = load_gpt2(tiny_checkpoint)
    shared = S3SharedPrefixes(S3Objects(S3Location(s3_bucket, "pf"),
                                        S3Config.from_env(max_retries=1, retry_timeout_s=2.0)))
    a, b = _replica(tmp_path / "a", shared), _replica(tmp_path / "b", shared)
    builds = []

    def build(w, key):
        builds.append(key)
        return build_prefix(model, w, key)

    built = a.builder(build)(_weights(), KEY)
    # replica B has never seen the adapter: its device cache reads the shared prefix, never
    # loading the adapter's weights nor running the backbone
    cache_b = AdapterCache(b.builder(build, check_stored=False), 1 << 20, stored=b.load)
    got = cache_b.get_or_load(KEY, lambda: pytest.fail("replica B loaded the adapter's weights"))
    assert builds == [KEY] and b.shared_hits == 1 and b.hits == 1
    assert torch.equal(got.k, built.k) and torch.equal(got.v, built.v)
    assert list((tmp_path / "b").rglob("*.safetensors"))  # kept on B's disk: read there next time
    # another backbone (weights) or dtype never reads it
    assert _replica(tmp_path / "c", shared, wid="other").load(KEY) is None
    # the shared tier is a cache: down, a replica builds and serves anyway
    s3_proxy.down()
    c = _replica(tmp_path / "d", shared)
    again = c.builder(build)(_weights(), KEY)
    assert torch.equal(again.k, built.k) and builds == [KEY, KEY]
    s3_proxy.up()


def test_a_corrupt_shared_prefix_is_ignored_and_rebuilt(tiny_checkpoint, tmp_path, s3_bucket):
    model = load_gpt2(tiny_checkpoint)
    objects = S3Objects(S3Location(s3_bucket, "pf"), S3Config.from_env())
    shared = S3SharedPrefixes(objects)
    a = _replica(tmp_path / "a", shared)
    a.save(build_prefix(model, _weights(), KEY))
    (info,) = list(objects.list("prefixes/"))
    data = bytearray(objects.get(info.key))
    data[-3] ^= 0xFF
    objects.put(info.key, bytes(data))
    b = _replica(tmp_path / "b", shared)
    assert b.load(KEY) is None and b.corrupt == 1 and b.shared_hits == 0
    rebuilt = b.builder(lambda w, key: build_prefix(model, w, key))(_weights(), KEY)
    assert _replica(tmp_path / "e", shared).load(KEY) is not None  # the rebuild replaced the shared copy
    assert torch.isfinite(rebuilt.k).all()
