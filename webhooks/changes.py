"""Change notifications: every transaction that changes an account's images, batches or webhook
deliveries also PUBLISHes on the account's channel, so whoever waits for a change (a long poll, the
dashboard's live tables; server/changes.py) hears of it as it commits, and never of one that did not.

Here, at the bottom of the packages (server → jobs → webhooks), because the webhook message store
announces its own changes too. A notification is `{kind}:{id}`: small, and only a hint to read again;
Redis pub/sub delivers at most once, so a listener that lost its connection reads everything again.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

ChangeKind = Literal["image", "batch", "delivery"]
CHANGE_KINDS: frozenset[str] = frozenset(get_args(ChangeKind))
CHANGES_CHANNEL_PREFIX = "dr:changes:"


def changes_channel(account_id: str) -> str:
    return CHANGES_CHANNEL_PREFIX + account_id


def stage_change(pipe: Any, account_id: str, kind: ChangeKind, resource_id: str) -> None:
    """Announce, in the caller's transaction (or script, see Store.staged_commands), that the account's
    `kind` resource `resource_id` changed."""
    pipe.publish(changes_channel(account_id), f"{kind}:{resource_id}")


def parse_change(payload: bytes | str) -> tuple[str, str] | None:
    """`(kind, id)` of a notification, or None for one this version does not know."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    kind, _, resource_id = text.partition(":")
    return (kind, resource_id) if kind in CHANGE_KINDS and resource_id else None
