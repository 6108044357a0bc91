"""Where blobs live, from ``PROMPTFLEET_BLOB_URL``.

- unset or ``file:///path``: ``LocalBlobStorage`` in a directory (unset: ``<data_dir>/
  blobs``, as before). Built KV prefixes stay on each host's disk only.
- ``s3://bucket/prefix``: ``S3BlobStorage`` in any S3-compatible store; adapters,
  datasets and built KV prefixes are shared by every replica and worker. Endpoint and
  credentials follow the AWS conventions (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``; see ``S3Config``).

Layout under ``s3://bucket/prefix``: ``blobs/<sha256>`` (content-addressed),
``prefixes/<adapter sha256>/<name>.safetensors`` (built KV prefixes) and ``trash/<sha256>``
(blobs set aside by ``promptfleet gc``, purged by a later run).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from promptfleet.adapters.storage import BlobStorage, LocalBlobStorage

# S3's rules for bucket names (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


@dataclass(frozen=True)
class FileLocation:
    root: Path


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""  # without leading or trailing '/'

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def _check_bucket(bucket: str, url: str) -> str:
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket or _IP_RE.fullmatch(bucket):
        raise ValueError(f"PROMPTFLEET_BLOB_URL={url!r}: {bucket!r} is not a valid S3 bucket name "
                         "(3-63 characters: lowercase letters, digits, '.' and '-')")
    return bucket


def parse_blob_url(url: str | None, *, default_root: Path) -> FileLocation | S3Location:
    """``None``/empty -> ``default_root``; ``file:///path``; ``s3://bucket[/prefix]``.
    Anything else is a ``ValueError`` that names the setting."""
    if not url:
        return FileLocation(Path(default_root))
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ValueError(f"PROMPTFLEET_BLOB_URL={url!r}: use file:///absolute/path")
        return FileLocation(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        prefix = parsed.path.strip("/")
        if parsed.query or parsed.fragment or any(part in ("", ".", "..") for part in prefix.split("/") if prefix):
            raise ValueError(f"PROMPTFLEET_BLOB_URL={url!r}: use s3://bucket or s3://bucket/some/prefix")
        return S3Location(bucket=_check_bucket(parsed.netloc, url), prefix=prefix)
    raise ValueError(f"PROMPTFLEET_BLOB_URL={url!r}: the scheme must be file:// or s3://")


def open_blob_storage(url: str | None, *, default_root: Path) -> BlobStorage:
    """The blob storage ``url`` names (see ``parse_blob_url``)."""
    location = parse_blob_url(url, default_root=default_root)
    if isinstance(location, FileLocation):
        return LocalBlobStorage(location.root)
    from promptfleet.adapters.s3_storage import S3BlobStorage, S3Config

    return S3BlobStorage(location, S3Config.from_env())


def shared_prefixes(storage: BlobStorage):  # -> SharedPrefixes | None (prefix_store imports torch)
    """The shared tier of built KV prefixes that goes with ``storage``: in the same bucket
    for S3, none for a local directory (each host's prefix dir is the disk tier)."""
    from promptfleet.adapters.s3_storage import S3BlobStorage, S3SharedPrefixes

    return S3SharedPrefixes(storage.objects) if isinstance(storage, S3BlobStorage) else None
