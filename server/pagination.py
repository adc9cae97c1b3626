"""Cursor pagination shared by every list route: `?limit=&cursor=` in, `{data, has_more, next_cursor}` out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import Field

from server.json_response import JSONResponse
from server.models import Hint
from server.query import ASCII_INTEGER, BLANK_IS_ABSENT, BatchId, ImageId, MessageId, QueryModel

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class HasId(Protocol):
    @property
    def id(self) -> str: ...


Item = TypeVar("Item", bound=HasId)


CURSOR_HINT = Hint("must be the next_cursor of a previous page")


class PageQuery(QueryModel):
    """`?limit=&cursor=`, which every list takes; each list's model names the ids its cursor holds."""

    limit: Annotated[
        int, Field(ge=1, le=MAX_PAGE_SIZE, description="How many items a page holds"), ASCII_INTEGER
    ] = DEFAULT_PAGE_SIZE
    # The id of the last item of the previous page: ids sort by creation time (jobs.ids).
    cursor: Annotated[str | None, CURSOR_HINT] = None


_CURSOR_DESCRIPTION = Field(description="The previous page's next_cursor")
ImageCursor = Annotated[ImageId | None, BLANK_IS_ABSENT, CURSOR_HINT, _CURSOR_DESCRIPTION]
BatchCursor = Annotated[BatchId | None, BLANK_IS_ABSENT, CURSOR_HINT, _CURSOR_DESCRIPTION]
MessageCursor = Annotated[MessageId | None, BLANK_IS_ABSENT, CURSOR_HINT, _CURSOR_DESCRIPTION]


async def page_response(
    page: PageQuery,
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
