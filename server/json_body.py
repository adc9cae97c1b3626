"""JSON request bodies and values: capped in size, an object, or a clear problem."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request

from server.problems import Problem
from webhooks.messages import iso

MAX_JSON_BODY_BYTES = 64 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_FORMAT_HINT = 'must be an ISO 8601 time with a zone, like "2026-11-21T10:00:00Z"'


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


def canonical_time(value: object) -> str | None:
    """An ISO 8601 time with a zone, in the resources' own form (UTC, milliseconds, Z): those compare
    correctly as text. None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return iso((moment - _EPOCH) // timedelta(milliseconds=1))
