"""S3 for tests: one ``moto_server`` per session (``moto[server]``, an in-memory S3-protocol
server), started here unless ``PROMPTFLEET_TEST_S3_ENDPOINT`` names one; a fresh, valid
bucket per test; a TCP proxy that takes the store away and brings it back intact; and a
``blob_url`` fixture parametrized over both backends (file, s3).

Missing ``moto_server`` skips a developer's run and fails under ``CI=true``
(``skips.missing``). Conftests import the fixtures by name::

    from promptfleet.testing.s3 import any_storage, blob_url, s3_bucket, s3_endpoint, s3_proxy  # noqa: F401
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from promptfleet.testing.skips import missing

S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    from promptfleet.adapters.s3_local import moto_server_path, start_moto_server

    given = os.environ.get("PROMPTFLEET_TEST_S3_ENDPOINT")
    if given:
        yield given
        return
    if moto_server_path() is None:
        missing("moto_server is not installed (pip install 'moto[server]', part of the dev extra)")
    server = start_moto_server(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server.endpoint
    finally:
        server.stop()


def create_bucket(endpoint: str) -> str:
    import boto3

    name = f"promptfleet-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the test server; the AWS_* variables point at the server."""
    for key, value in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    return create_bucket(s3_endpoint)


@pytest.fixture
def s3_proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A TCP proxy in front of the test server that a test takes down (``.down()``) and
    brings back (``.up()``) with everything stored intact; AWS_ENDPOINT_URL points at it."""
    from promptfleet.adapters.s3_local import TcpProxy

    target = urlparse(s3_endpoint)
    proxy = TcpProxy(target=(target.hostname, target.port)).up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.down()


@pytest.fixture(params=["file", "s3"])
def blob_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """PROMPTFLEET_BLOB_URL of each backend: a local directory, a fresh S3 bucket."""
    if request.param == "file":
        return (tmp_path / "blob-dir").as_uri()
    return f"s3://{request.getfixturevalue('s3_bucket')}/pf"


@pytest.fixture
def any_storage(blob_url: str, tmp_path: Path):
    """A ``BlobStorage`` of each backend (S3: one retry, short timeouts, for outage tests)."""
    from promptfleet.adapters.blob_url import FileLocation, open_blob_storage, parse_blob_url
    from promptfleet.adapters.s3_storage import S3BlobStorage, S3Config

    location = parse_blob_url(blob_url, default_root=tmp_path / "unused")
    if isinstance(location, FileLocation):
        return open_blob_storage(blob_url, default_root=tmp_path / "unused")
    return S3BlobStorage(location, S3Config.from_env(max_retries=1, retry_timeout_s=2.0, connect_timeout_s=1.0))
