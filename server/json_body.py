"""JSON request bodies: capped in size, an object, or a clear problem."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from server.problems import Problem

MAX_JSON_BODY_BYTES = 64 * 1024


async def read_json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` when `optional`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_JSON_BODY_BYTES:
            raise Problem(413, "body_too_large", f"a JSON body is at most {MAX_JSON_BODY_BYTES} bytes")
    if not body.strip():
        if optional:
            return {}
        raise Problem(422, "body_required", "send a JSON object (Content-Type: application/json)")
    if content_type not in ("application/json", ""):
        raise Problem(415, "unsupported_media_type", "send the body as application/json")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise Problem(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise Problem(422, "invalid_json", "the body must be a JSON object")
    return value
