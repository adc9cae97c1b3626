"""Conditional requests (RFC 9110 §13) shared by the downloads that carry an ETag."""

from __future__ import annotations

import re

from starlette.requests import Request

_ENTITY_TAG = re.compile(r'(?:W/)?("[^"]*")')


def none_match(request: Request, etag: str) -> bool:
    """`If-None-Match` says the client holds `etag` (§13.1.2): `*`, or any listed tag equal to ours
    under the weak comparison. Such a GET answers 304."""
    header = ",".join(request.headers.getlist("if-none-match")).strip()
    if not header:
        return False
    return header == "*" or etag in _ENTITY_TAG.findall(header)
