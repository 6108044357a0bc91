"""Content-addressed local blob storage."""
from __future__ import annotations

import hashlib

import pytest

from promptfleet.adapters.storage import BlobNotFoundError, BlobStorage, CorruptBlobError, LocalBlobStorage


def test_put_get_exists_delete(tmp_path):
    store = LocalBlobStorage(tmp_path / "blobs")
    assert isinstance(store, BlobStorage)
    data = b"hello adapter"
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "blobs" / digest[:2] / digest[2:]).read_bytes() == data
    assert store.exists(digest) and store.get(digest) == data
    assert store.put(data) == digest  # idempotent
    store.delete(digest)
    assert not store.exists(digest)
    store.delete(digest)  # deleting a missing blob is fine
    with pytest.raises(BlobNotFoundError, match=digest):
        store.get(digest)
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []  # no temp files left


def test_corrupt_blob_detected_and_healed_by_put(tmp_path):
    store = LocalBlobStorage(tmp_path)
    data = bytes(range(256)) * 10
    digest = store.put(data)
    path = tmp_path / digest[:2] / digest[2:]
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(CorruptBlobError, match=f"blob {digest} is corrupt"):
        store.get(digest)
    store.put(data)
    assert store.get(digest) == data


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "ABCDEF" + "0" * 58, "0" * 63, "g" * 64])
def test_digest_is_validated(tmp_path, bad):
    store = LocalBlobStorage(tmp_path)
    for op in (store.get, store.exists, store.delete):
        with pytest.raises(ValueError, match="not a SHA-256"):
            op(bad)
