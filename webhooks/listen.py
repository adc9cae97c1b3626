"""`darkroom webhooks listen`: a local receiver that verifies each delivery and prints it.

Standard library only, like `webhooks.signing`: it doubles as a reference receiver.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from webhooks.signing import WebhookVerificationError, verify

MAX_BODY_BYTES = 10 * 1024 * 1024


def make_handler(secret: str, out: TextIO) -> type[BaseHTTPRequestHandler]:
    # Deliveries arrive on threads of their own: each one's lines go out whole, in one write.
    printing = threading.Lock()

    def show(text: str) -> None:
        with printing:
            out.write(text + "\n")
            out.flush()

    class Handler(BaseHTTPRequestHandler):
        server_version = "darkroom-listen"

        def do_POST(self) -> None:
            raw_length = self.headers.get("content-length") or "0"
            if not (raw_length.isascii() and raw_length.isdigit()):  # "-5", "abc", "²"
                self.close_connection = True  # where this request's body ends is unknown
                self._answer(400, "invalid Content-Length")
                return
            length = int(raw_length)
            if length > MAX_BODY_BYTES:
                self._answer(413, "body too large")
                return
            body = self.rfile.read(length)
            try:
                verify(secret, dict(self.headers.items()), body)
            except WebhookVerificationError as exc:
                show(f"✗ rejected {self.headers.get('webhook-id', '?')}: {exc}")
                self._answer(400, str(exc))
                return
            show(_describe(self.headers.get("webhook-id", ""), body))
            self._answer(200, "ok")

        def _answer(self, status: int, text: str) -> None:
            payload = text.encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the verified deliveries are the output."""

    return Handler


def _describe(msg_id: str, body: bytes) -> str:
    try:
        event = json.loads(body)
    except ValueError:
        return f"✓ {msg_id} (body is not JSON)"
    data = event.get("data") or {}
    summary = f"✓ {event.get('type', '?')} {msg_id} {data.get('id', '')} {data.get('status', '')}".rstrip()
    return summary + "\n" + json.dumps(event, indent=2)


class ListenServer(ThreadingHTTPServer):
    # Darkroom opens up to 10 connections at once to one receiver; the standard library's backlog of 5
    # would reset some of them while the others are being accepted.
    request_queue_size = 64


def serve(
    secret: str,
    port: int,
    host: str = "127.0.0.1",
    out: TextIO = sys.stdout,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    with ListenServer((host, port), make_handler(secret, out)) as server:
        bound_port = server.server_address[1]
        print(
            f"Listening for Darkroom webhooks on http://{host}:{bound_port}/ (Ctrl-C to stop)",
            file=out,
            flush=True,
        )
        if on_ready is not None:
            on_ready(bound_port)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever(poll_interval=0.1)
