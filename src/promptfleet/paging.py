"""Keyset (cursor) pagination for the services' list queries (no HTTP here).

A page is the ``limit`` rows that follow a cursor row in a total order (the order's last
key must be unique), fetched with one more row to know whether more follow. Keyset, not
OFFSET: a row inserted or deleted between two pages neither repeats nor skips the others,
and a deep page costs what the first one does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

T = TypeVar("T")


class UnknownCursor(LookupError):
    """The ``after`` cursor names no row of this listing (another tenant's rows included)."""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


@dataclass(frozen=True)
class SortKey:
    column: Any  # a mapped column attribute
    descending: bool = False

    def ordering(self) -> ColumnElement[Any]:
        return self.column.desc() if self.descending else self.column.asc()


def after_clause(keys: Sequence[SortKey], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order ``keys`` (each key ascending or
    descending): ``k1 > v1 OR (k1 = v1 AND k2 > v2) OR ...``."""
    if len(keys) != len(values) or not keys:
        raise ValueError(f"{len(values)} cursor values for {len(keys)} sort keys")
    terms = []
    for i, key in enumerate(keys):
        ties = [k.column == v for k, v in zip(keys[:i], values[:i])]
        beyond = key.column < values[i] if key.descending else key.column > values[i]
        terms.append(and_(*ties, beyond))
    return or_(*terms)


def fetch_page(session: Session, stmt: Select[Any], *, keys: Sequence[SortKey], after: Sequence[Any] | None,
               limit: int | None) -> Page[Any]:
    """The ``limit`` rows (None: all) of ``stmt`` (unordered, unlimited) that follow the
    cursor values ``after`` (None: from the start) in the order ``keys``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    if after is not None:
        stmt = stmt.where(after_clause(keys, after))
    stmt = stmt.order_by(*(k.ordering() for k in keys))
    if limit is None:
        return Page(items=list(session.scalars(stmt)), has_more=False)
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return Page(items=rows[:limit], has_more=len(rows) > limit)
