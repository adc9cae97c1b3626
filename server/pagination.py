"""Cursor pagination shared by every list route: `?limit=&cursor=` in, `{data, has_more, next_cursor}` out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse

from jobs.ids import is_id
from jobs.params import FieldError
from server.problems import validation_problem

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class HasId(Protocol):
    @property
    def id(self) -> str: ...


Item = TypeVar("Item", bound=HasId)


@dataclass(frozen=True)
class PageRequest:
    limit: int
    # The id of the last item of the previous page: ids sort by creation time (jobs.ids).
    cursor: str | None


def parse_page(
    query: QueryParams, id_prefix: str, filters: dict[str, Sequence[str]]
) -> tuple[PageRequest, dict[str, str | None]]:
    """Validate `limit`, `cursor` and enumerated filters together, so every problem is reported at once.

    Each parameter is taken once: `?status=failed&status=completed` is refused rather than read as one of
    them, or as both, silently."""
    errors = [
        FieldError(name, "must be given at most once")
        for name in sorted(set(query.keys()))
        if len(query.getlist(name)) > 1
    ]
    limit = DEFAULT_PAGE_SIZE
    raw_limit = query.get("limit")
    if raw_limit is not None:
        if raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= MAX_PAGE_SIZE:
            limit = int(raw_limit)
        else:
            errors.append(FieldError("limit", f"must be an integer from 1 to {MAX_PAGE_SIZE}"))
    cursor = query.get("cursor") or None
    if cursor is not None and not is_id(id_prefix, cursor):
        errors.append(FieldError("cursor", "must be the next_cursor of a previous page"))
    chosen: dict[str, str | None] = {}
    for name, allowed in filters.items():
        value = query.get(name) or None
        if value is not None and value not in allowed:
            errors.append(FieldError(name, f"must be one of: {', '.join(allowed)}"))
        chosen[name] = value
    if errors:
        raise validation_problem(errors)
    return PageRequest(limit, cursor), chosen


async def page_response(
    page: PageRequest,
    fetch: Callable[[int, str | None], Awaitable[list[Item]]],
    render: Callable[[Item], dict[str, Any]],
) -> JSONResponse:
    """Fetch one more item than the page holds, to know whether another page follows."""
    items = await fetch(page.limit + 1, page.cursor)
    shown, has_more = items[: page.limit], len(items) > page.limit
    return JSONResponse(
        {
            "object": "list",
            "data": [render(item) for item in shown],
            "has_more": has_more,
            "next_cursor": shown[-1].id if has_more else None,
        }
    )
