"""A real webhook receiver on 127.0.0.1 for tests: verifies with the `standardwebhooks` package."""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """Answers 200 by default; `script` queues other answers for the next deliveries."""

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self._script: deque[int] = deque()
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # A short poll interval: shutdown() waits for the serving loop to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def script(self, *statuses: int) -> None:
        self._script.extend(statuses)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        """Block until `count` deliveries arrived (call through asyncio.to_thread from async tests)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.deliveries) >= count, timeout):
                raise TimeoutError(f"{len(self.deliveries)} of {count} deliveries arrived in {timeout} s")
            return list(self.deliveries)

    def _record(self, headers: dict[str, str], body: bytes) -> int:
        verified = True
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                verified = False
        status = self._script.popleft() if self._script else (200 if verified else 400)
        with self._changed:
            self.deliveries.append(Delivery(headers, body, verified, status))
            self._changed.notify_all()
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver._record({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
