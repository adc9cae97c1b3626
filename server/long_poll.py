"""Long polling: `GET /v1/images/{id}` and `GET /v1/batches/{id}` with `Prefer: wait=N` (RFC 7240) answer
as soon as the resource is settled (an image completed or failed; a batch completed with its archive, if
any, ready or failed), or after N seconds with its state then, 200 either way, with
`Preference-Applied: wait=N`. Up to DARKROOM_LONG_POLL_MAX_WAIT seconds (25 by default: below the 30 s
that routers such as Heroku's allow before a response starts, so a long poll needs no proxy setting, and a
web process shutting down waits for none longer than for a dashboard stream); 0 turns long polls off, and
`Prefer: wait` is then ignored as RFC 7240 lets a server ignore a preference.

While it waits, a request holds no Redis connection: it re-reads the resource only when the process's
change feed (server/changes.py) hears that it changed. It counts once against the rate limit, as the
request it is.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from jobs.settings import Settings
from server.auth import require_account
from server.changes import ChangeFeed, Watch
from server.json_response import JSONResponse

PREFERENCE_APPLIED = "Preference-Applied"
# One preference of a Prefer field (RFC 7240 §2): `wait=N`, N delta-seconds, the value maybe quoted.
_WAIT = re.compile(r'^\s*wait\s*=\s*"?(\d{1,10})"?\s*$', re.IGNORECASE)

Resource = TypeVar("Resource")


def requested_wait(request: Request) -> int | None:
    """The seconds a `Prefer: wait=N` asks for, capped at the setting; None without one (or with long
    polls off)."""
    settings: Settings = request.app.state.settings
    if settings.long_poll_max_wait == 0:
        return None
    for field in request.headers.getlist("prefer"):
        for preference in field.split(","):
            found = _WAIT.match(preference.split(";", 1)[0])
            if found:
                return min(int(found[1]), settings.long_poll_max_wait)
    return None


async def settled_response(
    request: Request,
    id_parameter: str,
    read: Callable[[Request, str], Awaitable[Resource]],
    settled: Callable[[Resource], bool],
    render: Callable[[Resource], dict[str, Any]],
) -> Response:
    """The account's resource named by the path parameter `id_parameter`, as `read` (given the request and
    the account id) finds it: once `settled` by it or when the wait asked for has passed (at once without
    one), with the header that says a wait was applied."""
    account = await require_account(request)
    wait = requested_wait(request)
    if wait is None:
        return JSONResponse(render(await read(request, account.id)))
    feed: ChangeFeed = request.app.state.changes
    resource_id = request.path_params[id_parameter]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    # Watching before the first read: a change committed after it is heard.
    async with feed.watching(account.id, lambda _kind, changed_id: changed_id == resource_id) as watch:
        # A client that gives up (its own timeout, a closed tab) ends the wait: nobody is left to answer.
        gone = asyncio.create_task(_client_gone(request, watch))
        try:
            resource = await read(request, account.id)
            while (
                not settled(resource)
                and (left := deadline - loop.time()) > 0
                and not feed.stopping.is_set()
                and not gone.done()
            ):
                if await watch.changed(left):
                    resource = await read(request, account.id)
        finally:
            gone.cancel()
    return JSONResponse(render(resource), headers={PREFERENCE_APPLIED: f"wait={wait}"})


async def _client_gone(request: Request, watch: Watch) -> None:
    """Returns, waking `watch`, once the client has disconnected (a GET's body is read: what comes next
    on it can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    watch.hear_everything()
