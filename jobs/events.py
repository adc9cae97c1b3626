"""Events announced by webhook: built once, serialised once, then delivered (and retried) as they are."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.connections import ArqRedis

from jobs.queue import DELIVER_WEBHOOK, enqueue
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


def delivery_job_id(msg_id: str, attempt_number: int) -> str:
    return f"deliver:{msg_id}:{attempt_number}"


async def schedule_delivery(
    redis: ArqRedis, queue_name: str, msg_id: str, attempt_number: int, delay: float | None = None
) -> None:
    await enqueue(
        redis,
        queue_name,
        DELIVER_WEBHOOK,
        msg_id,
        attempt_number,
        job_id=delivery_job_id(msg_id, attempt_number),
        defer_by=delay,
    )


def iso_in(seconds: float) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seconds_until(iso: str) -> float:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
