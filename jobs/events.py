"""Events announced by webhook: built once, serialised once, then delivered (and retried) as they are."""

from __future__ import annotations

from typing import Any

from jobs.records import utc_now
from jobs.store import Store
from webhooks.messages import CALLBACK, Destination, Message, event_body


async def destinations(
    store: Store, account_id: str, event_type: str, callback_url: str | None
) -> list[Destination]:
    """Who receives an event: the resource's own callback URL, then every endpoint subscribed to it."""
    found = [Destination(CALLBACK, callback_url)] if callback_url else []
    return found + await store.endpoints.subscribed(account_id, event_type)


def new_message(
    msg_id: str, account_id: str, event_type: str, data: dict[str, Any], to: list[Destination]
) -> Message:
    return Message(
        id=msg_id,
        account_id=account_id,
        event_type=event_type,
        body=event_body(event_type, data),
        created_at=utc_now(),
        destinations=tuple(to),
    )
