"""A web page may send a direct upload's bytes itself: the upload's signed URLs answer CORS.

They carry their own authority, a signature that expires, and no cookie or API key rides on them, so any
origin may use them (`Access-Control-Allow-Origin: *`, never with credentials), as a bucket's presigned
URLs are used; and a page can read the answer, a refusal's problem included. The rest of the API answers
no CORS: its key is a server's secret, never a web page's.
"""

from __future__ import annotations

import re

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# `PUT /v1/uploads/{id}/content`, and `GET …/landed`, where the bucket sends a form POSTed to it.
_SIGNED_UPLOAD_URL = re.compile(r"/v1/uploads/[^/]+/(content|landed)")
_METHOD = {"content": "PUT", "landed": "GET"}
# A browser asks again after this long at most (Chromium keeps an answer 2 hours, Firefox a day).
PREFLIGHT_MAX_AGE_SECONDS = 3600
ALLOWED_REQUEST_HEADERS = "Content-Type, X-Request-Id"
EXPOSED_RESPONSE_HEADERS = "Location, Retry-After, X-Request-Id"
_ANSWER_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", EXPOSED_RESPONSE_HEADERS.encode()),
]


class SignedUploadCors:
    """Answers the preflight of a signed upload URL, and lets any page read what the URL answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        signed = _SIGNED_UPLOAD_URL.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if signed is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            method = _METHOD[signed[1]]
            preflight = Response(
                status_code=204,
                headers={
                    "Allow": f"{method}, OPTIONS",
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Allow-Methods": method,
                    "Access-Control-Allow-Headers": ALLOWED_REQUEST_HEADERS,
                    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_SECONDS),
                },
            )
            await preflight(scope, receive, send)
            return

        async def send_readable(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_ANSWER_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_readable)
