"""Plain objects in one S3 bucket (under a key prefix), through obstore.

Client library: obstore (Rust ``object_store`` bindings), chosen on evidence over boto3
by ``promptfleet bench storage`` against moto_server on this shared 2-core machine (p50
of two runs, ms, obstore vs boto3): 16 KiB put 9-16 vs 36-47 (boto3 with its CRC32
checksums off: 25), get 13 vs 35; 1 MiB put 46-51 vs 73-77, get 17-21 vs 38-39; 32 MiB
(multipart) put 1.8-2.3 s for both (moto-bound), get 250-440 vs 780-980. Our hot path
is small objects (an adapter is KBs, a built prefix KBs to a few MB: a cold adapter load
is one or two gets), where obstore's per-request cost is 2-3x lower; it also has no
dependencies. boto3 stays a dev dependency (moto needs it; the tests create buckets).

Every call is retried by obstore with exponential backoff and jitter on 5xx answers,
connection errors and timeouts of safe requests (``S3Config.max_retries``,
``retry_timeout_s``); what still fails is a ``StorageUnavailable``, and a missing key is
``None``/``False``, never an exception. Objects at or over ``multipart_bytes`` are
uploaded in parts (S3 shows the object only once every part is in: never half-written;
a bucket lifecycle rule should abort incomplete multipart uploads after a day).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from promptfleet.adapters.blob_url import S3Location
from promptfleet.adapters.storage import StorageUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Config:
    """Endpoint, credentials and client behaviour; ``from_env`` reads the AWS variables."""

    endpoint_url: str | None = None        # AWS_ENDPOINT_URL (MinIO, Ceph, R2, moto); None: AWS itself
    access_key_id: str | None = None       # AWS_ACCESS_KEY_ID
    secret_access_key: str | None = None   # AWS_SECRET_ACCESS_KEY
    session_token: str | None = None       # AWS_SESSION_TOKEN
    region: str = "us-east-1"              # AWS_REGION (or AWS_DEFAULT_REGION)
    connect_timeout_s: float = 2.0
    timeout_s: float = 60.0                # a whole request, 32 MiB parts included
    max_retries: int = 3
    init_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    retry_timeout_s: float = 10.0          # no retry starts later than this after the first try
    multipart_bytes: int = 8 << 20         # objects this large or larger go up in parts of this size

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "S3Config":
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")
        if env.get("AWS_MAX_ATTEMPTS"):  # botocore's convention: attempts = 1 + retries
            values["max_retries"] = max(0, int(env["AWS_MAX_ATTEMPTS"]) - 1)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class ObjectInfo:
    key: str                # relative to the location's prefix
    size: int
    last_modified: datetime


class S3Objects:
    """get/put/head/copy/delete/list of keys relative to ``location.prefix``. The obstore
    client is made lazily per process (a forked worker builds its own)."""

    def __init__(self, location: S3Location, config: S3Config) -> None:
        self.location = location
        self.config = config
        self._store: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Objects({str(self.location)!r}, endpoint={self.config.endpoint_url!r})"

    def _client(self) -> Any:
        with self._lock:
            if self._store is None or self._pid != os.getpid():
                self._store, self._pid = self._make_store(), os.getpid()
            return self._store

    def _make_store(self) -> Any:
        from obstore.store import S3Store

        c = self.config
        config: dict[str, Any] = {"region": c.region, "virtual_hosted_style_request": False}
        if c.endpoint_url:
            config["endpoint"] = c.endpoint_url
        for name, value in (("access_key_id", c.access_key_id), ("secret_access_key", c.secret_access_key),
                            ("session_token", c.session_token)):
            if value:
                config[name] = value
        client_options = {"connect_timeout": timedelta(seconds=c.connect_timeout_s),
                          "timeout": timedelta(seconds=c.timeout_s),
                          "allow_http": bool(c.endpoint_url and c.endpoint_url.startswith("http://"))}
        retry = {"max_retries": c.max_retries, "retry_timeout": timedelta(seconds=c.retry_timeout_s),
                 "backoff": {"init_backoff": timedelta(seconds=c.init_backoff_s),
                             "max_backoff": timedelta(seconds=c.max_backoff_s), "base": 2}}
        return S3Store(self.location.bucket, prefix=self.location.prefix or None, config=config,
                       client_options=client_options, retry_config=retry)

    def _unavailable(self, op: str, key: str, exc: Exception) -> StorageUnavailable:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        log.warning("S3 %s of %s/%s failed: %s", op, self.location, key, first)
        return StorageUnavailable(f"blob storage {self.location} is unavailable ({op} {key}): {first}")

    def _call(self, op: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(client, *args)``; a missing object -> ``KeyError``; any other failure -> ``StorageUnavailable``."""
        from obstore.exceptions import NotFoundError

        try:
            return fn(self._client(), *args, **kwargs)
        except (NotFoundError, FileNotFoundError):  # obstore raises the latter for a 404
            raise KeyError(key) from None
        except Exception as exc:  # obstore's errors, timeouts, connection errors, bad credentials
            raise self._unavailable(op, key, exc) from exc

    def put(self, key: str, data: bytes) -> None:
        import obstore

        big = len(data) >= self.config.multipart_bytes
        self._call("put", key, obstore.put, key, data, use_multipart=big, chunk_size=self.config.multipart_bytes)

    def get(self, key: str) -> bytes | None:
        import obstore

        try:
            return self._call("get", key, lambda store: bytes(obstore.get(store, key).bytes()))
        except KeyError:
            return None

    def head(self, key: str) -> ObjectInfo | None:
        import obstore

        try:
            meta = self._call("head", key, obstore.head, key)
        except KeyError:
            return None
        return ObjectInfo(key=key, size=int(meta["size"]), last_modified=meta["last_modified"])

    def copy(self, src: str, dst: str) -> bool:
        """Server-side copy; False when ``src`` does not exist."""
        import obstore

        try:
            self._call("copy", src, obstore.copy, src, dst)
        except KeyError:
            return False
        return True

    def delete(self, key: str) -> None:
        import obstore

        try:
            self._call("delete", key, obstore.delete, key)
        except KeyError:
            pass

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        import obstore

        chunks = self._call("list", prefix, obstore.list, prefix=prefix)
        try:
            for chunk in chunks:
                for meta in chunk:
                    yield ObjectInfo(key=meta["path"], size=int(meta["size"]), last_modified=meta["last_modified"])
        except Exception as exc:
            raise self._unavailable("list", prefix, exc) from exc
