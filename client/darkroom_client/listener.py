"""Waiting by webhook: a small receiver of the signed deliveries Darkroom sends to an image's or a
batch's `callback_url`, so `images.wait(id, listener=…)` (and `batches.wait`) returns when the event
arrives instead of polling.

    with WebhookListener("whsec_…") as listener, Darkroom("sk_live_…") as darkroom:
        queued = darkroom.images.upload("photo.jpg", callback_url=listener.callback_url)
        image = darkroom.images.wait(queued.id, listener=listener)

One implementation serves both clients: an HTTP server (standard library) in a thread resolves a
`concurrent.futures.Future` per image or batch; `Darkroom` blocks on it, `AsyncDarkroom` awaits it on
its loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from darkroom_client.errors import WaitTimeout
from darkroom_client.types import Batch, Image
from darkroom_client.webhooks import (
    DEFAULT_TOLERANCE_SECONDS,
    SignatureMismatch,
    WebhookVerificationError,
    check_secret,
    verify_any,
)

# The events that may carry an image or a batch as it ends (a batch completed with its archive still to
# build is not over yet), and how to read it.
FINISHING_EVENTS: dict[str, Callable[[dict[str, Any]], Image | Batch]] = {
    "image.completed": Image.from_json,
    "image.failed": Image.from_json,
    "batch.completed": Batch.from_json,
    "batch.archive.ready": Batch.from_json,
    "batch.archive.failed": Batch.from_json,
}
CALLBACK_PATH = "/darkroom-webhooks"


class WebhookListener:
    """Receives Darkroom's webhooks on `host`:`port` (0: a free port) and remembers how each image and
    batch ended. Deliveries are verified with `secrets` (the account's webhook secret for a `callback_url`;
    several during a rotation): 401 to a wrong signature, 400 to a missing header or a timestamp out of
    `tolerance`, 204 to an authentic delivery, once per `webhook-id` (a redelivery is answered and
    ignored). `accepted`, `duplicates` and `refused` count the deliveries.

    `callback_url` is the URL to give the service: `public_url` when set (the address the service can
    reach, as a tunnel's), else the address listened on. Use it as a context manager (in async code
    too: starting and stopping do not wait on the network), or `start()` and `stop()` it.
    """

    def __init__(
        self,
        secrets: str | Iterable[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    ) -> None:
        self._secrets = [secrets] if isinstance(secrets, str) else list(secrets)
        if not self._secrets:
            raise ValueError("a webhook secret is needed to verify deliveries (whsec_…)")
        for secret in self._secrets:
            check_secret(secret)
        self._tolerance = tolerance
        self._host = host
        self._public_url = public_url
        self._finished: dict[str, Future[Any]] = {}
        self._seen_ids: set[str] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        self.duplicates = 0
        self.refused = 0
        self._server = ThreadingHTTPServer((host, port), _handler_for(self), bind_and_activate=False)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def callback_url(self) -> str:
        if self._public_url is not None:
            return self._public_url
        port: int = self._server.server_address[1]
        return f"http://{self._host}:{port}{CALLBACK_PATH}"

    def start(self) -> Self:
        self._server.server_bind()
        self._server.server_activate()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def finished(self, image_id: str) -> Future[Image]:
        """Resolved with the image when its `image.completed` or `image.failed` event arrives (at once
        if it came already)."""
        return self._ending(image_id)

    def batch_finished(self, batch_id: str) -> Future[Batch]:
        """Resolved with the batch when an event shows it completed with its archive, if it asked for
        one, ready or failed."""
        return self._ending(batch_id)

    def wait_for(self, image_id: str, timeout: float) -> Image:
        """Block until the image's finishing event arrives; `WaitTimeout` after `timeout` seconds.

        A webhook can be lost (the service gives up after its retries, a tunnel drops it): this asks
        the service nothing. `images.wait(id, listener=…)` waits the same way, asking the service now and
        then, and is the one to await with `AsyncDarkroom`."""
        try:
            return self.finished(image_id).result(timeout)
        except FutureTimeout:
            raise WaitTimeout(f"no webhook for image {image_id} within {timeout:g} s") from None

    def receive(self, headers: Mapping[str, str], body: bytes) -> int:
        """The status to answer one delivery with, after noting what it says."""
        try:
            self._verify(headers, body)
            event = json.loads(body)
            read = FINISHING_EVENTS.get(event["type"])
            resource = None if read is None else read(event["data"])
        except SignatureMismatch:
            return self._refuse(401)
        except (WebhookVerificationError, ValueError, KeyError, TypeError):
            return self._refuse(400)
        message_id = {name.lower(): value for name, value in headers.items()}["webhook-id"]
        with self._lock:
            if message_id in self._seen_ids:
                self.duplicates += 1
                return 204
            self._seen_ids.add(message_id)
            self.accepted += 1
            if resource is not None and resource.done:
                finished = self._finished.setdefault(resource.id, Future())
                if not finished.done():
                    finished.set_result(resource)
        return 204

    def _ending(self, resource_id: str) -> Future[Any]:
        with self._lock:
            return self._finished.setdefault(resource_id, Future())

    def _verify(self, headers: Mapping[str, str], body: bytes) -> None:
        if verify_any(self._secrets, headers, body, tolerance=self._tolerance) is None:
            raise SignatureMismatch("signed with none of the listener's secrets")

    def _refuse(self, status: int) -> int:
        with self._lock:
            self.refused += 1
        return status


def _handler_for(listener: WebhookListener) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = listener.receive(dict(self.headers.items()), body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the listener runs inside the partner's program, not as a server of its own."""

    return Handler
