"""What a process is working on (a request, an image, a webhook message), added to each of its log lines.

Bound per asyncio task: a request's, a job's and a delivery attempt's fields never leak into another's
lines, and a task started while some are bound (a render's thread, an attempt) inherits them. It lives in
`webhooks/`, the package every other one may import, so the dispatcher binds its fields too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

# The default is shared, but never changed: `bind` sets a new dict each time.
_bound: ContextVar[dict[str, object]] = ContextVar("darkroom_log_context", default={})  # noqa: B039


@contextlib.contextmanager
def bind(**fields: object) -> Iterator[None]:
    """Add `fields` (those not None) to every line logged within the block, in this task and those it
    starts."""
    given = {name: value for name, value in fields.items() if value is not None}
    token = _bound.set({**_bound.get(), **given})
    try:
        yield
    finally:
        _bound.reset(token)


def bound() -> dict[str, object]:
    """The fields bound where this is called."""
    return _bound.get()
