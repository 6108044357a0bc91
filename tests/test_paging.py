"""Keyset pagination (promptfleet.paging) on SQLite and PostgreSQL: pages walk every row
once, in the order of their keys, ties on the first key included, in either direction."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from promptfleet.db import session_scope
from promptfleet.paging import SortKey, UnknownCursor, fetch_page
from promptfleet.tenants.models import Tenant
from promptfleet.tenants.service import list_tenants, page_tenants

SAME = datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
NAMES = ["delta", "alpha", "echo", "charlie", "bravo", "foxtrot", "golf"]


@pytest.fixture
def tenants(session_factory):
    """Seven tenants, five of them created at the same microsecond."""
    with session_scope(session_factory) as s:
        for i, name in enumerate(NAMES):
            s.add(Tenant(id=f"{i:032x}", name=name, created_at=SAME if i < 5 else SAME.replace(second=1)))
    return session_factory


def walk(fetch, limit: int) -> list[str]:
    seen, after = [], None
    for _ in range(len(NAMES) + 2):  # a cursor that does not advance fails instead of looping
        page = fetch(limit, after)
        assert len(page.items) <= limit
        seen += [t.name for t in page.items]
        if not page.has_more:
            return seen
        after = page.items[-1]
    raise AssertionError(f"pages never ended: {seen}")


@pytest.mark.parametrize("limit", [1, 2, 5, 7, 50])
def test_tenant_pages_follow_list_order_through_ties(tenants, limit):
    with session_scope(tenants) as s:
        seen = walk(lambda n, last: page_tenants(s, limit=n, after=last and last.id), limit)
        assert seen == [t.name for t in list_tenants(s)] == ["alpha", "bravo", "charlie", "delta", "echo",
                                                              "foxtrot", "golf"]


@pytest.mark.parametrize("limit", [1, 3])
def test_mixed_directions_newest_first_then_name(tenants, limit):
    from sqlalchemy import select

    keys = [SortKey(Tenant.created_at, descending=True), SortKey(Tenant.name)]
    with session_scope(tenants) as s:
        seen = walk(lambda n, last: fetch_page(s, select(Tenant), keys=keys, limit=n,
                                               after=last and (last.created_at, last.name)), limit)
    assert seen == ["foxtrot", "golf", "alpha", "bravo", "charlie", "delta", "echo"]


def test_unknown_cursor_and_empty_pages(tenants):
    with session_scope(tenants) as s:
        with pytest.raises(UnknownCursor):
            page_tenants(s, limit=2, after="f" * 32)
        last = page_tenants(s, limit=2, after=f"{6:032x}")
        assert last.items == [] and last.has_more is False
        zero = page_tenants(s, limit=0)
        assert zero.items == [] and zero.has_more is True
