"""Who hears of an event: the resource's callback URL and the account's subscribed endpoints."""

from __future__ import annotations

from jobs.store import Store
from webhooks.messages import CALLBACK, Destination


async def destinations(
    store: Store, account_id: str, event_type: str, callback_url: str | None
) -> list[Destination]:
    """Who receives an event: the resource's own callback URL, then every endpoint subscribed to it."""
    found = [Destination(CALLBACK, callback_url)] if callback_url else []
    return found + await store.endpoints.subscribed(account_id, event_type)
