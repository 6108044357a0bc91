"""Content-addressed local blob storage."""
from __future__ import annotations

import hashlib
import os

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


# --- both backends (file, s3 on moto_server), the S3 client's failure modes, the URL ---------
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from email.utils import format_datetime  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

from promptfleet.adapters.blob_url import FileLocation, S3Location, parse_blob_url  # noqa: E402
from promptfleet.adapters.s3_storage import S3BlobStorage, S3Config, blob_key  # noqa: E402
from promptfleet.adapters.storage import StorageUnavailable  # noqa: E402


def test_backend_round_trip(any_storage):
    assert isinstance(any_storage, BlobStorage)
    data = b"adapter bytes " * 100
    digest = any_storage.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert any_storage.exists(digest) and any_storage.get(digest) == data
    assert any_storage.put(data) == digest  # idempotent
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not any_storage.exists(missing)
    with pytest.raises(BlobNotFoundError, match=missing):
        any_storage.get(missing)
    any_storage.delete(digest)
    any_storage.delete(digest)  # deleting a missing blob is fine
    assert not any_storage.exists(digest)
    for op in (any_storage.get, any_storage.exists, any_storage.delete):
        with pytest.raises(ValueError, match="not a SHA-256"):
            op("../" + "0" * 61)


def test_s3_corrupt_object_is_refused_and_healed_by_put(s3_bucket):
    store = S3BlobStorage(S3Location(s3_bucket, "pf"), S3Config.from_env())
    data = bytes(range(256)) * 40
    digest = store.put(data)
    store.objects.put(blob_key(digest), data[:-1] + b"\x00")  # same size, other bytes
    with pytest.raises(CorruptBlobError, match=f"blob {digest} is corrupt"):
        store.get(digest)
    store.objects.put(blob_key(digest), data[:-1])  # other size: put rewrites it
    store.put(data)
    assert store.get(digest) == data


def test_s3_large_objects_go_up_in_parts(s3_bucket, s3_endpoint):
    import boto3

    store = S3BlobStorage(S3Location(s3_bucket, "pf"), S3Config.from_env(multipart_bytes=5 << 20))
    data = os.urandom(11 << 20)  # 3 parts of at most 5 MiB (S3's smallest part)
    digest = store.put(data)
    assert store.get(digest) == data
    head = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing").head_object(Bucket=s3_bucket, Key=f"pf/blobs/{digest}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    small = store.put(b"small")
    head = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing").head_object(Bucket=s3_bucket, Key=f"pf/blobs/{small}")
    assert "-" not in head["ETag"]


def test_s3_down_is_storage_unavailable_then_everything_is_back(s3_bucket, s3_proxy):
    store = S3BlobStorage(S3Location(s3_bucket, "pf"),
                          S3Config.from_env(max_retries=2, retry_timeout_s=2.0, connect_timeout_s=1.0))
    digest = store.put(b"kept through the outage")
    s3_proxy.down()
    for op in (lambda: store.get(digest), lambda: store.put(b"written during the outage"),
               lambda: store.exists(digest), lambda: store.delete(digest)):
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable, match="unavailable"):
            op()
        assert time.monotonic() - t0 < 10
    s3_proxy.up()
    assert store.get(digest) == b"kept through the outage"
    assert not store.exists(hashlib.sha256(b"written during the outage").hexdigest())


class _Flaky(BaseHTTPRequestHandler):
    """An S3 stand-in whose first ``fail`` answers are 503 (or, with ``stall``, that hang
    past the client's timeout); then it serves one object for any GET."""

    fail = 0
    stall = 0.0
    body = b""
    seen: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        type(self).seen.append(self.path)
        if len(type(self).seen) <= type(self).fail:
            if type(self).stall:
                time.sleep(type(self).stall)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"e"')
        self.send_header("Last-Modified", format_datetime(datetime.now(timezone.utc), usegmt=True))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture
def flaky_s3():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Flaky.seen = []
    yield server, _Flaky
    server.shutdown()
    server.server_close()


def _flaky_store(server, **config) -> S3BlobStorage:
    return S3BlobStorage(S3Location("promptfleet-test", "pf"),
                         S3Config(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", access_key_id="k",
                                  secret_access_key="s", init_backoff_s=0.05, **config))


@pytest.mark.parametrize("stall", [0.0, 1.5])
def test_s3_5xx_and_timeouts_are_retried_with_backoff(flaky_s3, stall):
    server, handler = flaky_s3
    handler.body, handler.fail, handler.stall = b"through the storm", 2, stall
    digest = hashlib.sha256(handler.body).hexdigest()
    store = _flaky_store(server, max_retries=3, timeout_s=1.0)
    assert store.get(digest) == handler.body
    assert handler.seen == [f"/promptfleet-test/pf/blobs/{digest}"] * 3  # two failures, then the answer


def test_s3_retries_give_up_as_storage_unavailable(flaky_s3):
    server, handler = flaky_s3
    handler.body, handler.fail, handler.stall = b"never reached", 100, 0.0
    store = _flaky_store(server, max_retries=2)
    with pytest.raises(StorageUnavailable, match="unavailable"):
        store.get(hashlib.sha256(handler.body).hexdigest())
    assert len(handler.seen) == 3  # the try and two retries


def test_blob_url_parsing(tmp_path):
    assert parse_blob_url(None, default_root=tmp_path) == FileLocation(tmp_path)
    assert parse_blob_url("", default_root=tmp_path) == FileLocation(tmp_path)
    assert parse_blob_url("file:///srv/pf%20blobs", default_root=tmp_path) == FileLocation(Path("/srv/pf blobs"))
    assert parse_blob_url("s3://promptfleet-prod", default_root=tmp_path) == S3Location("promptfleet-prod", "")
    assert parse_blob_url("s3://my.bucket-1/a/b/", default_root=tmp_path) == S3Location("my.bucket-1", "a/b")
    for bad in ("s3://Upper", "s3://ab", "s3://bucket_x", "s3://192.168.0.1", "s3://a..b/x", "s3://bucket/a//b",
                "s3://bucket/../x", "gs://bucket", "file://host/x", "/plain/path", "s3://bucket/x?y=1"):
        with pytest.raises(ValueError, match="PROMPTFLEET_BLOB_URL"):
            parse_blob_url(bad, default_root=tmp_path)


def test_s3_config_follows_aws_conventions():
    cfg = S3Config.from_env({"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "id",
                             "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu-west-3", "AWS_MAX_ATTEMPTS": "5"})
    assert (cfg.endpoint_url, cfg.access_key_id, cfg.secret_access_key, cfg.region, cfg.max_retries) == (
        "http://minio:9000", "id", "secret", "eu-west-3", 4)
    assert S3Config.from_env({"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"
    assert S3Config.from_env({}).endpoint_url is None  # AWS itself
