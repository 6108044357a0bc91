"""Content-addressed blob storage. Blobs are named by their SHA-256 (lowercase hex) and
verified on every read. The interface speaks only in bytes and digests (no filesystem
paths): ``LocalBlobStorage`` (a directory) and ``promptfleet.adapters.s3_storage.
S3BlobStorage`` (any S3-compatible store) both implement it; ``promptfleet.adapters.
blob_url.open_blob_storage`` picks one from ``PROMPTFLEET_BLOB_URL``."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobNotFoundError(LookupError):
    """No blob with this digest."""


class CorruptBlobError(RuntimeError):
    """A stored blob whose content no longer matches its SHA-256."""


class StorageUnavailable(RuntimeError):
    """The blob store cannot be reached or keeps failing (after retries): a transient
    outage, answered 503 ``storage_unavailable``; nothing was written that a row points to."""


@runtime_checkable
class BlobStorage(Protocol):
    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent); return its SHA-256 hex digest."""

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified; ``BlobNotFoundError`` or ``CorruptBlobError`` otherwise."""

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None:
        """Remove the blob; a missing blob is not an error."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return sha256


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class LocalBlobStorage:
    """Blobs under ``root/ab/cdef...``, written atomically (temp file in the same folder,
    fsync, rename, fsync of the folder), so a crash never leaves a partial blob."""

    def __init__(self, root: str | Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStorage({str(self._root)!r})"

    @property
    def root(self) -> Path:
        """The local folder (this implementation only; not part of ``BlobStorage``)."""
        return self._root

    def _path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self._root / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        path = self._path(digest)
        try:
            # touched first: a garbage-collection sweep keeps a blob touched recently, so
            # reusing this one cannot race its deletion (see promptfleet.storage_gc)
            os.utime(path)
            if path.read_bytes() == data:
                return digest
            log.warning("blob %s on disk is corrupt; rewriting it", digest)
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(path.parent)
        return digest

    def get(self, sha256: str) -> bytes:
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {sha256} not found in storage") from None
        actual = sha256_hex(data)
        if actual != sha256:
            raise CorruptBlobError(f"blob {sha256} is corrupt: its content hashes to {actual}")
        return data

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        path = self._path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)
