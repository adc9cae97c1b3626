"""`darkroom webhooks listen`: a local receiver that verifies each delivery and prints it.

It may hold several secrets (the account's callback secret, each endpoint's), so that one listener hears
every event: each delivery is checked against all of them and printed with the label of the one that
signed it. Standard library only, like `webhooks.signing`: it doubles as a reference receiver.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from webhooks.signing import (
    SECRET_PREFIX,
    SignatureMismatch,
    WebhookVerificationError,
    check_secret,
    verify_any,
)

MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class ListenSecret:
    """A secret to verify with, and the label printed beside what it verified ("" for a lone one)."""

    label: str
    secret: str


def listen_secrets(values: Sequence[str]) -> list[ListenSecret]:
    """`--secret` values: `whsec_…`, or `LABEL=whsec_…` (`callback=…`, `ep_01…=…`). Unlabelled ones are
    labelled by their place (`#2`) when there are several. ValueError names a malformed or repeated one."""
    found: list[ListenSecret] = []
    for place, value in enumerate(values, start=1):
        labelled = not value.startswith(SECRET_PREFIX) and "=" in value
        label, secret = value.split("=", 1) if labelled else ("", value)
        if not label and len(values) > 1:
            label = f"#{place}"
        try:
            check_secret(secret)
        except ValueError as exc:
            raise ValueError(f"--secret {label or f'#{place}'}: {exc}") from None
        if any(kept.label == label for kept in found):
            raise ValueError(f"--secret: the label {label!r} is given twice")
        found.append(ListenSecret(label, secret))
    if not found:
        raise ValueError("give at least one --secret")
    return found


def verified_by(secrets: Sequence[ListenSecret], headers: Mapping[str, str], body: bytes) -> ListenSecret:
    """The first secret that verifies the delivery. Otherwise WebhookVerificationError: a malformed or
    stale delivery fails with the first secret as with any; a well-formed one signed otherwise, with all."""
    matched = verify_any([candidate.secret for candidate in secrets], headers, body)
    if matched is not None:
        return secrets[matched]
    if len(secrets) == 1:
        raise SignatureMismatch("no matching signature")
    raise SignatureMismatch(f"no signature matches any of the {len(secrets)} secrets")


def make_handler(secrets: Sequence[ListenSecret], out: TextIO) -> type[BaseHTTPRequestHandler]:
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
                signer = verified_by(secrets, dict(self.headers.items()), body)
            except WebhookVerificationError as exc:
                show(f"✗ rejected {self.headers.get('webhook-id', '?')}: {exc}")
                self._answer(400, str(exc))
                return
            show(_describe(self.headers.get("webhook-id", ""), body, signer.label))
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


def _describe(msg_id: str, body: bytes, label: str) -> str:
    signed_by = f" [{label}]" if label else ""
    try:
        event = json.loads(body)
    except ValueError:
        return f"✓ {msg_id} (body is not JSON){signed_by}"
    data = event.get("data") or {}
    summary = f"✓ {event.get('type', '?')} {msg_id} {data.get('id', '')} {data.get('status', '')}".rstrip()
    return summary + signed_by + "\n" + json.dumps(event, indent=2)


class ListenServer(ThreadingHTTPServer):
    # Darkroom opens up to 10 connections at once to one receiver; the standard library's backlog of 5
    # would reset some of them while the others are being accepted.
    request_queue_size = 64


def serve(
    secrets: Sequence[ListenSecret],
    port: int,
    host: str = "127.0.0.1",
    out: TextIO = sys.stdout,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    with ListenServer((host, port), make_handler(secrets, out)) as server:
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
