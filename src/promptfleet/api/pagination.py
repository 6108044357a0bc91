"""OpenAI-style list pagination: ``?limit=`` (1 to 100, default 20) and ``?after=`` (the id
of the last item of the previous page); answers carry ``has_more``, ``first_id`` and
``last_id``. A cursor that is not an item of this list (another tenant's included) is a
400 ``invalid_cursor`` that says nothing more."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query

from promptfleet.api.errors import APIError, bad_request

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_CURSOR_CHARS = 200


@dataclass(frozen=True)
class PageParams:
    limit: int
    after: str | None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be between 1 and {MAX_LIMIT}, not {limit}", code="invalid_limit",
                          param="limit")
    return limit


def unknown_cursor(after: str) -> APIError:
    return bad_request("unknown cursor: `after` must be the id of an item of a previous page of this list",
                       code="invalid_cursor", param="after")


def _limit_query(default: int | None) -> Any:
    return Query(description=f"Items per page, 1 to {MAX_LIMIT}" + (f" (default {default})." if default else
                                                                     " (default: all)."),
                 json_schema_extra={"minimum": 1, "maximum": MAX_LIMIT})


_AFTER_QUERY = Query(max_length=MAX_CURSOR_CHARS,
                     description="Cursor: the id of the last item of the previous page (its `last_id`).")


def page_params(limit: Annotated[int | None, _limit_query(DEFAULT_LIMIT)] = None,
                after: Annotated[str | None, _AFTER_QUERY] = None) -> PageParams:
    """The ``limit``/``after`` query parameters (400 for a limit out of range)."""
    return PageParams(limit=check_limit(DEFAULT_LIMIT if limit is None else limit), after=after)


def optional_page_params(limit: Annotated[int | None, _limit_query(None)] = None,
                         after: Annotated[str | None, _AFTER_QUERY] = None) -> tuple[int | None, str | None]:
    """Like ``page_params``, but no ``limit`` means every item (``/v1/models``: the official
    clients read one page of it)."""
    return (None if limit is None else check_limit(limit)), after


PageDep = Annotated[PageParams, Depends(page_params)]
OptionalPageDep = Annotated[tuple[int | None, str | None], Depends(optional_page_params)]


def page_fields(ids: Sequence[str], has_more: bool) -> dict[str, Any]:
    """``has_more``, ``first_id`` and ``last_id`` of a list answer."""
    return {"has_more": has_more, "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}
