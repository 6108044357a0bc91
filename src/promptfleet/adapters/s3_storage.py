"""Content-addressed blobs and shared KV prefixes in an S3-compatible store.

``S3BlobStorage`` implements ``BlobStorage`` over ``S3Objects`` (obstore; the choice and
its measurements are in ``promptfleet.adapters.s3_objects``): ``blobs/<sha256>``, the
SHA-256 checked again on every read (a mismatch is ``CorruptBlobError``, never served).
A PUT is atomic in S3 (multipart objects appear only when complete), so a failed upload
leaves no object; a store that cannot be reached is ``StorageUnavailable`` (503).

``promptfleet gc`` does not delete an unreferenced blob at once: it moves it to
``trash/<sha256>`` and purges it at a later run. A row committed by an upload that raced
the move (it found the blob, so wrote nothing) still reads its bytes: ``get`` falls back
to the trash and puts the blob back.

``S3SharedPrefixes`` holds built KV prefixes under ``prefixes/<adapter sha256>/``, so a
replica that never saw an adapter reads its prefix instead of running the backbone.
"""
from __future__ import annotations

import logging

from promptfleet.adapters.blob_url import S3Location
from promptfleet.adapters.s3_objects import S3Config, S3Objects
from promptfleet.adapters.storage import BlobNotFoundError, CorruptBlobError, check_digest, sha256_hex

__all__ = ["S3BlobStorage", "S3Config", "S3SharedPrefixes", "blob_key", "trash_key"]

log = logging.getLogger(__name__)

BLOBS, TRASH, PREFIXES = "blobs/", "trash/", "prefixes/"
SMALL_PUT_BYTES = 1 << 20  # below this, put writes without a HEAD first (one request, not two)


def blob_key(sha256: str) -> str:
    return BLOBS + check_digest(sha256)


def trash_key(sha256: str) -> str:
    return TRASH + check_digest(sha256)


class S3BlobStorage:
    def __init__(self, location: S3Location | S3Objects, config: S3Config | None = None) -> None:
        self.objects = location if isinstance(location, S3Objects) else S3Objects(location, config or S3Config())

    def __repr__(self) -> str:
        return f"S3BlobStorage({str(self.objects.location)!r})"

    @property
    def location(self) -> S3Location:
        return self.objects.location

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        key = blob_key(digest)
        if len(data) < SMALL_PUT_BYTES:  # rewriting the same bytes costs less than asking first
            self.objects.put(key, data)
            return digest
        info = self.objects.head(key)
        if info is not None and info.size == len(data):
            return digest  # the same bytes are there already (content-addressed)
        if info is not None:
            log.warning("blob %s in %s has the wrong size (%d, not %d); rewriting it", digest, self.location,
                        info.size, len(data))
        self.objects.put(key, data)
        return digest

    def get(self, sha256: str) -> bytes:
        key = blob_key(sha256)
        data = self.objects.get(key)
        if data is None:
            data = self._from_trash(sha256)
        actual = sha256_hex(data)
        if actual != sha256:
            raise CorruptBlobError(f"blob {sha256} is corrupt: its content hashes to {actual}")
        return data

    def _from_trash(self, sha256: str) -> bytes:
        """A blob that gc set aside while a row came to point at it: put it back."""
        data = self.objects.get(trash_key(sha256))
        if data is None:
            raise BlobNotFoundError(f"blob {sha256} not found in storage")
        if sha256_hex(data) == sha256:
            log.warning("blob %s was in the gc trash of %s; restoring it", sha256, self.location)
            self.objects.copy(trash_key(sha256), blob_key(sha256))
        return data

    def exists(self, sha256: str) -> bool:
        return self.objects.head(blob_key(sha256)) is not None

    def delete(self, sha256: str) -> None:
        self.objects.delete(blob_key(sha256))
        self.objects.delete(trash_key(sha256))


class S3SharedPrefixes:
    """Built KV prefix files (safetensors bytes; ``PrefixStore`` checks them) by adapter
    sha256 and name."""

    def __init__(self, objects: S3Objects) -> None:
        self.objects = objects

    def __repr__(self) -> str:
        return f"S3SharedPrefixes({str(self.objects.location)!r})"

    @staticmethod
    def key(adapter_sha256: str, name: str) -> str:
        return f"{PREFIXES}{check_digest(adapter_sha256)}/{check_digest(name)}.safetensors"

    def get(self, adapter_sha256: str, name: str) -> bytes | None:
        return self.objects.get(self.key(adapter_sha256, name))

    def put(self, adapter_sha256: str, name: str, data: bytes) -> None:
        self.objects.put(self.key(adapter_sha256, name), data)

    def delete(self, adapter_sha256: str, name: str) -> None:
        self.objects.delete(self.key(adapter_sha256, name))
