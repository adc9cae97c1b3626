"""Who hears of an event: the resource's callback URL and the account's subscribed endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobs.ids import new_id
from jobs.store import Store
from webhooks.messages import CALLBACK, Destination


async def destinations(
    store: Store, account_id: str, event_type: str, callback_url: str | None
) -> list[Destination]:
    """Who receives an event: the resource's own callback URL, then every endpoint subscribed to it."""
    found = [Destination(CALLBACK, callback_url)] if callback_url else []
    return found + await store.endpoints.subscribed(account_id, event_type)


def image_announcement(to: Sequence[Destination]) -> dict[str, Any]:
    """The fields of an image's terminal record naming the message that announces it and whom to (none
    when nobody is to hear of it)."""
    return {
        "event_message_id": new_id("msg") if to else None,
        "event_destinations": tuple(destination.name for destination in to),
    }
