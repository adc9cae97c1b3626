"""Events announced by webhook: built once, serialised once, then delivered (and retried) as they are."""

from __future__ import annotations

import json
from typing import Any

from jobs.records import utc_now
from webhooks.messages import Message


def event_body(event_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "timestamp": utc_now(), "data": data}, separators=(",", ":"))


def new_message(msg_id: str, account_id: str, url: str, event_type: str, data: dict[str, Any]) -> Message:
    return Message(
        id=msg_id,
        account_id=account_id,
        event_type=event_type,
        url=url,
        body=event_body(event_type, data),
        created_at=utc_now(),
    )
