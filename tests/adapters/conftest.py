"""Fixtures for the registry tests: a PEFT adapter made with PEFT itself on the tiny
checkpoint, blob storage and tenants. Archive and adapter builders are in
``promptfleet.testing`` (``archives``, ``adapter_files``, ``peft``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from promptfleet.adapters.storage import LocalBlobStorage
from promptfleet.db import session_scope
from promptfleet.platform.config import ModelConfig
from promptfleet.tenants.service import create_tenant
from promptfleet.testing.peft import make_peft_adapter
from promptfleet.testing.s3 import any_storage, blob_url, s3_bucket, s3_endpoint, s3_proxy  # noqa: F401


@pytest.fixture(scope="session")
def tiny_config(tiny_checkpoint: Path) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def prompt_adapter_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT PROMPT_TUNING adapter folder for the tiny checkpoint (made once)."""
    return make_peft_adapter(tiny_checkpoint, tmp_path_factory.mktemp("prompt-adapter"), "prompt_tuning", 5, seed=7)


@pytest.fixture
def storage(tmp_path: Path) -> LocalBlobStorage:
    return LocalBlobStorage(tmp_path / "blobs")


@pytest.fixture
def tenant_id(session_factory) -> str:
    with session_scope(session_factory) as s:
        tenant, _ = create_tenant(s, name="tenant-a")
        return tenant.id


@pytest.fixture
def other_tenant_id(session_factory) -> str:
    with session_scope(session_factory) as s:
        tenant, _ = create_tenant(s, name="tenant-b")
        return tenant.id
