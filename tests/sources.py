"""A real HTTP server on 127.0.0.1 for `source_url` tests: each path answers as scripted, in order.

Each answer closes its connection (HTTP/1.0 style), so a body sent without Content-Length ends there.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A stalled answer is given up at the latest after this long, so a test that fails cannot hang the run.
STALL_LIMIT_SECONDS = 30.0


@dataclass(frozen=True)
class Reply:
    """`status` with `headers` and `body`; `content_length=False` sends no Content-Length (the body ends
    when the connection closes); `stall_after` sends that many body bytes, then the rest only once the
    server is released."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True
    stall_after: int | None = None


class SourceServer:
    """`tls` serves https with that server context (the handshake on the accepting thread)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.arrived_at: list[float] = []  # time.monotonic() of each request, in order
        self._replies: dict[str, deque[Reply]] = defaultdict(deque)
        self._released = threading.Event()
        self._arrived = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.scheme = "http" if tls is None else "https"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def serve(self, path: str, *replies: Reply) -> str:
        """Answer `path` with `replies` in turn, the last one from then on; its URL."""
        self._replies[path].extend(replies)
        return self.url(path)

    def hits(self, path: str) -> int:
        return sum(1 for requested, _ in self.requests if requested == path)

    def wait_for_hits(self, path: str, count: int, timeout: float = 10.0) -> None:
        """Block until `path` was requested `count` times (call through asyncio.to_thread)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: self.hits(path) >= count, timeout):
                raise TimeoutError(f"{path} was requested {self.hits(path)} of {count} times")

    def start(self) -> SourceServer:
        self._thread.start()
        return self

    def release(self) -> None:
        """Let stalled answers go on."""
        self._released.set()

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def _next(self, path: str) -> Reply:
        replies = self._replies.get(path)
        if not replies:
            return Reply(404, b"not here")
        return replies.popleft() if len(replies) > 1 else replies[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._arrived:
                    server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                    server.arrived_at.append(time.monotonic())
                    server._arrived.notify_all()
                reply = server._next(self.path)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if reply.stall_after is None:
                    self.wfile.write(reply.body)
                    return
                self.wfile.write(reply.body[: reply.stall_after])
                self.wfile.flush()
                if server._released.wait(STALL_LIMIT_SECONDS):
                    self.wfile.write(reply.body[reply.stall_after :])

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
