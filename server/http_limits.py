"""Limits on how a client sends a request, applied where the bytes arrive.

uvicorn's httptools protocol takes a header block of any size at any pace, and a connection that sends
nothing is kept forever: 2,000 half-sent headers hold 2,000 connections, and a 150 MB header is parsed
(and copied) in full before the app sees it. `LimitedHttpToolsProtocol` is that protocol with three
limits per web process, chosen by the app's lifespan (its ASGI lifespan state, which uvicorn hands every
connection) from Settings:

- a header block larger than `max_header_bytes` is answered 431 and the connection closed;
- a header block not complete within `header_timeout` seconds of the connection (or, on a kept-alive
  connection, of the request's first byte) closes the connection;
- at most `max_pending_connections` connections may be waiting for their header block: one more closes
  the oldest, so a crowd of slow clients can never keep a fresh, quick request out.

The body is the app's to read, so its limits live in `BodyDeadlineMiddleware`: a body that stalls
longer than `body_idle_timeout`, or takes longer than `body_timeout` in all, answers 408.

The Procfile selects the protocol with `--http server.http_limits:LimitedHttpToolsProtocol`: uvicorn
picks the protocol class before it imports the app, so nothing the app module does can change it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from jobs.settings import Settings
from server.problems import Problem

# What the Procfile's and `darkroom dev`'s `--http` name.
WEB_PROTOCOL = "server.http_limits:LimitedHttpToolsProtocol"
# The key under which the app's lifespan state carries the process's HeaderGuard.
HEADER_GUARD_STATE = "darkroom.header_guard"
# The lifespan state's callable that tells the app's waiting requests the server is stopping.
STOPPING_STATE = "darkroom.stopping"


@dataclass(eq=False)
class HeaderGuard:
    """One web process's header limits and the connections still sending a header block, oldest first."""

    max_header_bytes: int
    header_timeout: float
    max_pending_connections: int
    # A dict keeps insertion order: the first key is the connection that has waited longest.
    _pending: dict[LimitedHttpToolsProtocol, None] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> HeaderGuard:
        return cls(settings.max_header_bytes, settings.header_timeout, settings.max_pending_connections)

    def admit(self, connection: LimitedHttpToolsProtocol) -> None:
        """`connection` starts a header block; if that is one too many waiting, the longest waiting goes."""
        while len(self._pending) >= self.max_pending_connections:
            next(iter(self._pending)).drop()  # which releases it
        self._pending[connection] = None

    def release(self, connection: LimitedHttpToolsProtocol) -> None:
        self._pending.pop(connection, None)

    def is_pending(self, connection: LimitedHttpToolsProtocol) -> bool:
        return connection in self._pending


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under the process's HeaderGuard (none when the app gives none)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard: HeaderGuard | None = app_state.get(HEADER_GUARD_STATE)
        self._header_bytes = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_header()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_arrived()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # uvicorn stops (SIGTERM, Ctrl-C) and waits for every request under way: one that only waits (a
        # long poll, a dashboard stream) is told to answer now, with what it has.
        stopping: Callable[[], None] | None = self.app_state.get(STOPPING_STATE)
        if stopping is not None:
            stopping()
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._guard is not None and self._guard.is_pending(self):
            self._header_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: the chunk that completes a header block may carry the start of the body.
        guard = self._guard
        if (
            guard is not None
            and guard.is_pending(self)
            and self._header_bytes > guard.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._header_arrived()
            self._refuse_large_header(guard.max_header_bytes)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        # The next request on a kept-alive connection: its header block gets the same limits.
        if self._guard is not None and not self._guard.is_pending(self):
            self._await_header()

    def on_headers_complete(self) -> None:
        self._header_arrived()
        guard = self._guard
        # Counted again as parsed: a block that arrives whole is complete before data_received counts it.
        parsed = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if guard is not None and parsed > guard.max_header_bytes:
            self._refuse_large_header(guard.max_header_bytes)
            return
        super().on_headers_complete()

    # Once refused, the rest of what the parser reads from this connection is no request of ours.
    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def drop(self) -> None:
        """Close the connection before its header block arrived (too slow, or one too many waiting)."""
        self._header_arrived()
        self.transport.close()

    def _await_header(self) -> None:
        guard = self._guard
        if guard is None:
            return
        self._header_bytes = 0
        guard.admit(self)
        self._header_deadline = self.loop.call_later(guard.header_timeout, self.drop)

    def _header_arrived(self) -> None:
        if self._guard is not None:
            self._guard.release(self)
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _refuse_large_header(self, limit: int) -> None:
        self._refused = True
        detail = f"the request's header block is larger than {limit:,} bytes"
        self._answer_and_close(
            b"431 Request Header Fields Too Large", Problem(431, "header_too_large", detail)
        )

    def send_400_response(self, msg: str) -> None:
        """What the parser cannot read (a bad Content-Length, an empty Transfer-Encoding, …) is answered
        as every other error is, a problem document, not uvicorn's plain text."""
        detail = f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})"
        self._answer_and_close(b"400 Bad Request", Problem(400, "malformed_request", detail))

    def _answer_and_close(self, status: bytes, problem: Problem) -> None:
        body = json.dumps(problem.body()).encode()
        self.transport.write(
            b"".join(
                [
                    b"HTTP/1.1 " + status + b"\r\n",
                    b"content-type: application/problem+json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()


class BodyDeadlineMiddleware:
    """Answers 408 when a request body stalls for `idle_timeout` seconds or is still arriving after
    `total_timeout`: the connection (and the upload's staging file) is not held by a client that
    stopped sending."""

    def __init__(self, app: ASGIApp, idle_timeout: float, total_timeout: float) -> None:
        self.app = app
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.total_timeout
        body_complete = False

        async def receive_in_time() -> Message:
            nonlocal body_complete
            if body_complete:
                # Past the body, receive() only waits for a disconnect, for as long as a response streams.
                return await receive()
            remaining = deadline - time.monotonic()
            stalled = remaining > self.idle_timeout
            try:
                async with asyncio.timeout(max(min(self.idle_timeout, remaining), 0)):
                    message = await receive()
            except TimeoutError:
                raise Problem(
                    408,
                    "request_timeout",
                    f"the request body stopped arriving for {self.idle_timeout:g} s"
                    if stalled
                    else f"the request body took longer than {self.total_timeout:g} s to arrive",
                    headers={"Connection": "close"},
                ) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)
