"""Webhook messages and their delivery attempts, kept in Redis for inspection and replay."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from redis.asyncio import Redis

MessageStatus = Literal["pending", "delivered", "failed"]
RESPONSE_EXCERPT_BYTES = 8192
RETENTION_SECONDS = 30 * 24 * 3600
# Messages waiting for an attempt, scored by when it is due (epoch ms); see webhooks.dispatcher.
DUE_KEY = "dr:webhooks:due"


def now_ms() -> int:
    """Epoch milliseconds: the scores of the due set."""
    return time.time_ns() // 1_000_000


def is_success(status_code: int | None) -> bool:
    """A delivery succeeds on any 2xx answer, and on nothing else (redirects included)."""
    return status_code is not None and 200 <= status_code < 300


def message_key(msg_id: str) -> str:
    return f"dr:msg:{msg_id}"


def account_messages_key(account_id: str) -> str:
    return f"dr:account:{account_id}:messages"


@dataclass(frozen=True)
class Attempt:
    number: int
    at: str
    status_code: int | None
    latency_ms: float
    response_excerpt: str
    error: str | None
    next_attempt_at: str | None = None

    @property
    def succeeded(self) -> bool:
        return is_success(self.status_code)


@dataclass(frozen=True)
class Message:
    id: str
    account_id: str
    event_type: str
    url: str
    # The body exactly as signed and sent on every attempt: serialised once, never re-encoded.
    body: str
    created_at: str
    status: MessageStatus = "pending"
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)

    def with_attempt(self, attempt: Attempt, status: MessageStatus) -> Message:
        return replace(self, attempts=(*self.attempts, attempt), status=status)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Message:
        data = json.loads(raw)
        data["attempts"] = tuple(Attempt(**attempt) for attempt in data["attempts"])
        return cls(**data)

    def resource(self) -> dict[str, Any]:
        last = self.attempts[-1] if self.attempts else None
        return {
            "object": "delivery",
            "id": self.id,
            "event_type": self.event_type,
            "url": self.url,
            "status": self.status,
            "created_at": self.created_at,
            "next_attempt_at": last.next_attempt_at if last and self.status == "pending" else None,
            "attempts": [asdict(attempt) for attempt in self.attempts],
            "payload": json.loads(self.body),
        }


class MessageStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def get(self, msg_id: str) -> Message | None:
        raw = await self.redis.get(message_key(msg_id))
        return None if raw is None else Message.from_json(raw)

    def stage_save(self, pipe: Any, message: Message) -> None:
        pipe.set(message_key(message.id), message.to_json(), ex=RETENTION_SECONDS)

    def stage_new(self, pipe: Any, message: Message) -> None:
        """Add a new message, due now, to a caller's transaction, so it commits with the event it announces.

        The account index has one score for all, so it is ordered by id, and ids sort by time."""
        self.stage_save(pipe, message)
        pipe.zadd(account_messages_key(message.account_id), {message.id: 0})
        pipe.zadd(DUE_KEY, {message.id: now_ms()})

    async def list_for_account(
        self, account_id: str, *, limit: int, before: str | None, status: str | None
    ) -> list[Message]:
        """Newest first; message ids sort by time, so `before` is a cursor."""
        found: list[Message] = []
        maximum = f"({before}" if before else "+"
        while len(found) < limit:
            ids = await self.redis.zrevrangebylex(
                account_messages_key(account_id), maximum, "-", start=0, num=limit * 2
            )
            if not ids:
                break
            raws = await self.redis.mget([message_key(i.decode()) for i in ids])
            for raw in raws:
                if raw is None:
                    continue
                message = Message.from_json(raw)
                if status is None or message.status == status:
                    found.append(message)
            maximum = f"({ids[-1].decode()}"
        return found[:limit]
