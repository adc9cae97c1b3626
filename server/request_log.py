"""Every request has an id, one log line and a count in `/metrics`.

The id is the client's `X-Request-Id` when it is usable (1 to 128 visible ASCII characters), else one
we make (`req_` and a time-sortable id). Every response carries it back in `X-Request-Id`, problem
documents in `request_id` too, and it is stored with what the request creates (images, batches, webhook
messages), so the worker's and the dispatcher's lines about them carry it as well.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.ids import new_id
from webhooks.log_context import bind

REQUEST_ID_HEADER = "X-Request-Id"
# Published in /openapi.json as the header's pattern.
USABLE_REQUEST_ID = r"[\x21-\x7e]{1,128}"
_USABLE_REQUEST_ID = re.compile(USABLE_REQUEST_ID)
# Where a request's id and (once authenticated) account id are kept: the request's state.
REQUEST_ID_STATE = "request_id"
ACCOUNT_ID_STATE = "account_id"

log = logging.getLogger("darkroom.web")


def request_id_of(request: Request) -> str | None:
    """The id of `request` (None only for an app run without RequestLogMiddleware)."""
    value = request.scope.get("state", {}).get(REQUEST_ID_STATE)
    return value if isinstance(value, str) else None


def note_account(request: Request, account_id: str) -> None:
    """The request's log line names the account it was made for."""
    request.scope.setdefault("state", {})[ACCOUNT_ID_STATE] = account_id


def _chosen_request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _USABLE_REQUEST_ID.fullmatch(text) else new_id("req")
    return new_id("req")


class RequestLogMiddleware:
    """Outermost middleware: sees every answer, those of the other middlewares included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _chosen_request_id(scope)
        # Each request gets its own copy of the lifespan state, as the ASGI spec asks of servers: uvicorn
        # copies it, but asgi-lifespan (in-process tests) hands every request the same dict, where one
        # request's id and account would show in another's log line.
        state = scope["state"] = dict(scope.get("state", {}))
        state[REQUEST_ID_STATE] = request_id
        status = 500  # unless a response starts: an exception that escapes every handler
        bytes_in = bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        with bind(request_id=request_id):
            try:
                await self.app(scope, counting_receive, send_with_id)
            finally:
                route = getattr(scope.get("route"), "path", None)
                log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                        "account_id": state.get(ACCOUNT_ID_STATE),
                        "bytes_in": bytes_in,
                        "bytes_out": bytes_out,
                    },
                )
                scope["app"].state.request_counts.count(scope["method"], route, status)
