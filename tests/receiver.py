"""A real webhook receiver on 127.0.0.1 for tests: verifies with the `standardwebhooks` package.

Its port is bound as soon as it is made but only listens once started, so a receiver not yet started
refuses connections: "connection refused, then it comes up" is `Receiver(...)`, then `.start()`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# A held request is answered at the latest after this long, so a forgotten release cannot hang a test run.
HOLD_LIMIT_SECONDS = 30.0


@dataclass(frozen=True)
class Answer:
    """A scripted reply to one delivery.

    `status` with extra `headers` and `body`, sent after `delay` seconds (to outlast a client's timeout);
    `hold` keeps the request open until `Receiver.release()`; `drop` closes the connection unanswered.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0
    hold: bool = False
    drop: bool = False


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int | None  # None when the connection was dropped unanswered
    received_at: float = 0.0  # time.monotonic() on arrival
    verified_with: tuple[str, ...] = ()  # the trusted secrets whose signature it carries

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def signatures(self) -> list[str]:
        return self.headers["webhook-signature"].split()


class Receiver:
    """Answers 200 to deliveries that verify (400 to others) by default; `script` queues other answers
    for the next deliveries. `trust` adds secrets to verify with: a delivery is verified when one of them
    signed it, and `verified_with` names each that did."""

    def __init__(self, secret: str | None = None) -> None:
        self.secrets: list[str] = [] if secret is None else [secret]
        self.deliveries: list[Delivery] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._script: deque[Answer] = deque()
        self._changed = threading.Condition()
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(), bind_and_activate=False)
        self._server.server_bind()
        # A short poll interval: shutdown() waits for the serving loop to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def trust(self, *secrets: str) -> None:
        self.secrets.extend(secrets)

    def script(self, *answers: int | Answer) -> None:
        self._script.extend(Answer(each) if isinstance(each, int) else each for each in answers)

    def release(self) -> None:
        """Let every held request (and those arriving from now on) be answered."""
        self._released.set()

    def start(self) -> Receiver:
        self._server.server_activate()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._released.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        """Block until `count` deliveries arrived (call through asyncio.to_thread from async tests)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.deliveries) >= count, timeout):
                raise TimeoutError(f"{len(self.deliveries)} of {count} deliveries arrived in {timeout} s")
            return list(self.deliveries)

    async def arrivals(self, count: int) -> list[Delivery]:
        """`wait_for` without blocking the event loop (a dispatcher may be running on it)."""
        return await asyncio.to_thread(self.wait_for, count)

    def _verified_with(self, headers: dict[str, str], body: bytes) -> tuple[str, ...]:
        good = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            good.append(secret)
        return tuple(good)

    def _arrived(self, headers: dict[str, str], body: bytes) -> Answer:
        verified_with = self._verified_with(headers, body)
        verified = bool(verified_with) or not self.secrets
        with self._changed:
            answer = self._script.popleft() if self._script else Answer(200 if verified else 400)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            answered = None if answer.drop else answer.status
            delivery = Delivery(headers, body, verified, answered, time.monotonic(), verified_with)
            self.deliveries.append(delivery)
            self._changed.notify_all()
        return answer

    def _left(self) -> None:
        with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                answer = receiver._arrived({k.lower(): v for k, v in self.headers.items()}, body)
                try:
                    if answer.hold:
                        receiver._released.wait(HOLD_LIMIT_SECONDS)
                    if answer.delay:
                        receiver._stopping.wait(answer.delay)
                    if answer.drop:
                        self.close_connection = True
                        return
                    self._reply(answer)
                finally:
                    receiver._left()

            def _reply(self, answer: Answer) -> None:
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True  # the sender gave up waiting (a timeout under test)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


class SilentOrigins:
    """Loopback servers (one origin each: its own port, on 127.0.0.1, 127.0.0.2, …) that accept
    connections, read whatever comes and never answer: receivers that hang. Runs on the test's loop."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.requested: set[str] = set()  # urls that received bytes
        self._servers: list[asyncio.Server] = []
        self._connections: list[asyncio.StreamWriter] = []
        self._changed = asyncio.Event()

    async def start(self, count: int) -> SilentOrigins:
        for n in range(count):
            host = f"127.0.0.{1 + n % 4}"
            server = await asyncio.start_server(self._swallower(len(self.urls)), host, 0)
            self.urls.append(f"http://{host}:{server.sockets[0].getsockname()[1]}/hooks")
            self._servers.append(server)
        return self

    def _swallower(
        self, index: int
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._connections.append(writer)
            while await reader.read(65536):
                self.requested.add(self.urls[index])
                self._changed.set()

        return swallow

    async def wait_all_requested(self) -> None:
        while len(self.requested) < len(self.urls):
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        """Stop listening and drop every connection, so the attempts hanging on them end now."""
        for server in self._servers:
            server.close()
        for writer in self._connections:
            writer.transport.abort()
        for server in self._servers:
            await server.wait_closed()
