"""A direct upload from a partner's web page, in a real headless Chromium (Debian's): the page, on
another origin, PUTs the photo to the signed URL its server got, and reads the answers, a refusal's
included, through the CORS the signed URLs answer (server/cors.py)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import imagegen
from tests.browser import browse, needs_chromium
from tests.test_docs_browser import LiveWeb
from tests.test_docs_browser import live_web as live_web  # the fixture

pytestmark = needs_chromium

LISTING_PAGE = b"<!doctype html><title>New listing</title><p>Add your photos"


class _ListingSite(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(LISTING_PAGE)))
        self.end_headers()
        self.wfile.write(LISTING_PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def partner_site() -> Iterator[str]:
    """A partner's site, on another origin than Darkroom's (another port of the loopback)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ListingSite)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_partners_page_puts_the_photo_and_reads_every_answer(
    live_web: LiveWeb, partner_site: str, tmp_path: Path
) -> None:
    photo = imagegen.jpeg(64, 48)
    with httpx.Client(base_url=live_web.base_url, headers=live_web.partner.headers) as api:
        declared = {
            "filename": "listing.jpg",
            "content_type": "image/jpeg",
            "size": len(photo),
            "operations": [],
        }
        response = api.post("/v1/uploads", json=declared)
        assert response.status_code == 201, response.text
        created = response.json()
    with browse(live_web.base_url, tmp_path / "chromium-profile", also=[partner_site]) as browsing:
        browsing.page.goto(f"{partner_site}/listings/new")
        answers = browsing.page.evaluate(
            """async ([url, headers, encoded]) => {
                const photo = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                const put = async (body) => {
                    const answer = await fetch(url, {method: "PUT", headers, body});
                    return {status: answer.status, body: await answer.json(),
                            requestId: answer.headers.get("X-Request-Id")};
                };
                return [await put(new Uint8Array([...photo, 1, 2, 3])), await put(photo)];
            }""",
            [created["upload_url"], created["upload_headers"], base64.b64encode(photo).decode()],
        )
        assert browsing.elsewhere == []
        # The browser reports the refusal's status, and nothing else (a CORS refusal would be one).
        assert [error for error in browsing.console_errors if "413" not in error] == []
    refused, landed = answers
    assert refused["status"] == 413
    assert refused["body"]["type"].endswith("/upload_too_large")
    assert landed["status"] == 200
    assert landed["body"]["id"] == created["image"]["id"]
    assert landed["body"]["input"]["format"] == "jpeg"
    assert landed["requestId"]
