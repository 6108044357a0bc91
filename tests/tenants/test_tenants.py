"""Tenants and API keys against a real database (SQLite and PostgreSQL)."""
from __future__ import annotations

import hashlib
import os

import pytest
from sqlalchemy import inspect, select, text

from promptfleet.db import session_scope
from promptfleet.tenants.models import ApiKey, Tenant
from promptfleet.tenants.service import (InvalidTenantName, TenantExistsError, TenantNotFound, authenticate,
                                         create_tenant, get_tenant, get_tenant_by_name, list_keys, list_tenants,
                                         rotate_key)


def test_create_and_authenticate(session_factory):
    with session_scope(session_factory) as s:
        tenant, key = create_tenant(s, name="acme")
        tenant_id = tenant.id
    assert key.startswith("pf-") and len(key) >= 3 + 32
    assert len(tenant_id) == 32 and int(tenant_id, 16) >= 0
    with session_scope(session_factory) as s:
        assert authenticate(s, api_key=key).id == tenant_id
        assert authenticate(s, api_key=key + "x") is None
        assert authenticate(s, api_key="pf-" + "A" * 43) is None
        assert authenticate(s, api_key="") is None
        assert authenticate(s, api_key="Bearer " + key) is None
        assert get_tenant(s, tenant_id=tenant_id).name == "acme"
        assert get_tenant_by_name(s, name="acme").id == tenant_id
        assert [t.name for t in list_tenants(s)] == ["acme"]
        created = get_tenant(s, tenant_id=tenant_id).created_at
        assert created.tzinfo is not None


def test_two_tenants_have_distinct_keys(session_factory):
    with session_scope(session_factory) as s:
        a, key_a = create_tenant(s, name="a")
        b, key_b = create_tenant(s, name="b", max_concurrent=3, rate_per_s=1.5, rate_burst=4)
        ids = a.id, b.id
    assert key_a != key_b
    with session_scope(session_factory) as s:
        assert authenticate(s, api_key=key_a).id == ids[0]
        assert authenticate(s, api_key=key_b).id == ids[1]
        b = get_tenant(s, tenant_id=ids[1])
        assert (b.max_concurrent, b.rate_per_s, b.rate_burst) == (3, 1.5, 4)
        assert sorted(t.name for t in list_tenants(s)) == ["a", "b"]


def test_duplicate_name_refused(session_factory):
    with session_scope(session_factory) as s:
        create_tenant(s, name="acme")
    with pytest.raises(TenantExistsError, match="acme.*already exists"):
        with session_scope(session_factory) as s:
            create_tenant(s, name="acme")
    with session_scope(session_factory) as s:
        assert len(list_tenants(s)) == 1
        assert len(list(s.scalars(select(ApiKey)))) == 1


@pytest.mark.parametrize("name", ["", "Acme", "has space", "a/b", "-lead", ".hidden", "x" * 65, "é", "a@b"])
def test_invalid_names_refused(session_factory, name):
    with session_scope(session_factory) as s:
        with pytest.raises(InvalidTenantName, match="invalid tenant name"):
            create_tenant(s, name=name)
        assert list_tenants(s) == []


def test_unknown_tenant(session_factory):
    with session_scope(session_factory) as s:
        with pytest.raises(TenantNotFound):
            get_tenant(s, tenant_id="0" * 32)
        with pytest.raises(TenantNotFound):
            rotate_key(s, tenant_id="0" * 32)


def test_rotate_key_revokes_old_keys(session_factory):
    with session_scope(session_factory) as s:
        tenant, old = create_tenant(s, name="acme")
        tenant_id = tenant.id
    with session_scope(session_factory) as s:
        new = rotate_key(s, tenant_id=tenant_id)
    assert new != old
    with session_scope(session_factory) as s:
        assert authenticate(s, api_key=old) is None
        assert authenticate(s, api_key=new).id == tenant_id
        keys = list_keys(s, tenant_id=tenant_id)
        assert len(keys) == 2
        assert sum(k.active for k in keys) == 1
        assert {k.prefix for k in keys} == {old[:11], new[:11]}
        assert next(k for k in keys if not k.active).prefix == old[:11]


def _all_cells(session) -> list[str]:
    cells = []
    for table in inspect(session.get_bind()).get_table_names():
        for row in session.execute(text(f'SELECT * FROM "{table}"')):
            cells.extend(str(v) for v in row)
    return cells


def test_clear_key_is_never_stored(session_factory, db_url):
    with session_scope(session_factory) as s:
        tenant, key = create_tenant(s, name="acme")
        rotated = rotate_key(s, tenant_id=tenant.id)
    with session_scope(session_factory) as s:
        cells = _all_cells(s)
        hashes = set(s.scalars(select(ApiKey.key_hash)))
    blob = "\n".join(cells)
    for clear in (key, rotated):
        assert clear not in blob
        assert clear[11:] not in blob  # not even the secret part
        assert hashlib.sha256(clear.encode()).hexdigest() in hashes
    if db_url.startswith("sqlite"):  # and not in the database file or its WAL either
        path = db_url.split("///", 1)[1]
        raw = b"".join(open(p, "rb").read() for p in (path, path + "-wal") if os.path.exists(p))
        assert key.encode() not in raw and rotated.encode() not in raw


def test_deleting_tenant_cascades_to_keys(session_factory):
    with session_scope(session_factory) as s:
        tenant, _ = create_tenant(s, name="acme")
        tenant_id = tenant.id
    with session_scope(session_factory) as s:
        s.delete(s.get(Tenant, tenant_id))
    with session_scope(session_factory) as s:
        assert list(s.scalars(select(ApiKey))) == []
