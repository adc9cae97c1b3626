"""Webhook messages, their deliveries and attempts, kept in Redis for inspection and replay.

A message is one event, serialised once: the body every destination receives byte for byte, under the
message id as `webhook-id`. It goes to each of its destinations — the resource's `callback_url` and
every endpoint subscribed to the event — and each destination has a delivery of its own (status,
attempts, next attempt), in a key of its own so that workers sending to different destinations never
overwrite each other's records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from redis.asyncio import Redis

DeliveryStatus = Literal["pending", "delivered", "failed"]
RESPONSE_EXCERPT_BYTES = 8192
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600
# Deliveries waiting for an attempt, scored by when it is due (epoch ms); see webhooks.dispatcher.
DUE_KEY = "dr:webhooks:due"
# Published when another process made deliveries due: every dispatcher looks at once, not at its next poll.
WAKE_CHANNEL = "dr:webhooks:wake"
# The destination name of a resource's own callback_url (endpoints are named by their `ep_` id).
CALLBACK = "callback"


def now_ms() -> int:
    """Epoch milliseconds: the scores of the due set."""
    return time.time_ns() // 1_000_000


def iso(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_message(
    msg_id: str, account_id: str, event_type: str, data: dict[str, Any], to: Sequence[Destination]
) -> Message:
    """An event for `to`, its Standard Webhooks body serialised once: signed and sent exactly so."""
    created_at = iso(now_ms())
    body = json.dumps({"type": event_type, "timestamp": created_at, "data": data}, separators=(",", ":"))
    return Message(msg_id, account_id, event_type, body, created_at, tuple(to))


def is_success(status_code: int | None) -> bool:
    """A delivery succeeds on any 2xx answer, and on nothing else (redirects included)."""
    return status_code is not None and 200 <= status_code < 300


def message_key(msg_id: str) -> str:
    return f"dr:msg:{msg_id}"


def delivery_key(msg_id: str, destination: str) -> str:
    return f"dr:dlv:{msg_id}:{destination}"


def due_member(msg_id: str, destination: str) -> str:
    return f"{msg_id}:{destination}"


def parse_due_member(member: str) -> tuple[str, str]:
    msg_id, _, destination = member.partition(":")
    return msg_id, destination


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
class Destination:
    """Where a message goes: `name` is CALLBACK or an endpoint id; `url` as it was when the event
    happened (an endpoint's attempts use its current URL)."""

    name: str
    url: str


@dataclass(frozen=True)
class Message:
    id: str
    account_id: str
    event_type: str
    # The body exactly as signed and sent on every attempt: serialised once, never re-encoded.
    body: str
    created_at: str
    destinations: tuple[Destination, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Message:
        data = json.loads(raw)
        data["destinations"] = tuple(Destination(**each) for each in data["destinations"])
        return cls(**data)


@dataclass(frozen=True)
class Delivery:
    msg_id: str
    destination: str
    status: DeliveryStatus = "pending"
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)

    @property
    def next_attempt_at(self) -> str | None:
        last = self.attempts[-1] if self.attempts else None
        return last.next_attempt_at if last is not None and self.status == "pending" else None

    def with_attempt(self, attempt: Attempt, status: DeliveryStatus) -> Delivery:
        return replace(self, attempts=(*self.attempts, attempt), status=status)

    def to_json(self) -> str:
        # Not dataclasses.asdict, which deep-copies every attempt: this runs once per delivery attempt.
        record = {
            "msg_id": self.msg_id,
            "destination": self.destination,
            "status": self.status,
            "attempts": [attempt.__dict__ for attempt in self.attempts],
        }
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Delivery:
        data = json.loads(raw)
        data["attempts"] = tuple(Attempt(**attempt) for attempt in data["attempts"])
        return cls(**data)


def overall_status(deliveries: Sequence[Delivery]) -> DeliveryStatus:
    """Pending while any destination is; failed if any failed for good; else delivered."""
    statuses = {delivery.status for delivery in deliveries}
    if "pending" in statuses:
        return "pending"
    return "failed" if "failed" in statuses else "delivered"


@dataclass(frozen=True)
class LoggedMessage:
    """A message with its deliveries, as the delivery log shows it."""

    message: Message
    deliveries: tuple[Delivery, ...]

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def status(self) -> DeliveryStatus:
        return overall_status(self.deliveries)

    def resource(self) -> dict[str, Any]:
        return message_resource(self.message, self.deliveries)


def message_resource(message: Message, deliveries: Sequence[Delivery]) -> dict[str, Any]:
    by_name = {delivery.destination: delivery for delivery in deliveries}
    every = [by_name.get(d.name) or Delivery(message.id, d.name) for d in message.destinations]
    return {
        "object": "delivery",
        "id": message.id,
        "event_type": message.event_type,
        "status": overall_status(every),
        "created_at": message.created_at,
        "destinations": [
            {
                "endpoint_id": None if destination.name == CALLBACK else destination.name,
                "url": destination.url,
                "status": delivery.status,
                "next_attempt_at": delivery.next_attempt_at,
                "attempts": [asdict(attempt) for attempt in delivery.attempts],
            }
            for destination, delivery in zip(message.destinations, every, strict=True)
        ],
        "payload": json.loads(message.body),
    }


@dataclass(frozen=True)
class MessageFilter:
    status: DeliveryStatus | None = None
    endpoint_id: str | None = None
    event_type: str | None = None
    created_after: str | None = None  # ISO 8601, compared as text (every timestamp here is UTC "…Z")
    created_before: str | None = None

    def admits(self, message: Message, deliveries: Sequence[Delivery]) -> bool:
        if self.event_type is not None and message.event_type != self.event_type:
            return False
        if self.created_after is not None and message.created_at < self.created_after:
            return False
        if self.created_before is not None and message.created_at >= self.created_before:
            return False
        if self.endpoint_id is not None:
            deliveries = [d for d in deliveries if d.destination == self.endpoint_id]
            if not deliveries:
                return False
        return self.status is None or overall_status(deliveries) == self.status


class MessageStore:
    """`oldest_kept_id`, given the retention's start (epoch ms), names the oldest message id still kept:
    ids sort by time, so the account indexes are trimmed by id as messages expire."""

    def __init__(
        self,
        redis: Redis,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        oldest_kept_id: Callable[[int], str] | None = None,
    ) -> None:
        self.redis = redis
        self.retention_seconds = retention_seconds
        self.oldest_kept_id = oldest_kept_id

    async def get(self, msg_id: str) -> Message | None:
        raw = await self.redis.get(message_key(msg_id))
        return None if raw is None else Message.from_json(raw)

    async def get_logged(self, msg_id: str) -> LoggedMessage | None:
        message = await self.get(msg_id)
        if message is None:
            return None
        return LoggedMessage(message, tuple(await self.deliveries_of(message)))

    async def deliveries_of(self, message: Message) -> list[Delivery]:
        keys = [delivery_key(message.id, destination.name) for destination in message.destinations]
        raws = await self.redis.mget(keys) if keys else []
        return [Delivery.from_json(raw) for raw in raws if raw is not None]

    def stage_delivery(self, pipe: Any, delivery: Delivery) -> None:
        pipe.set(
            delivery_key(delivery.msg_id, delivery.destination), delivery.to_json(), ex=self.retention_seconds
        )

    def stage_new(self, pipe: Any, message: Message) -> None:
        """Add a new message, each destination due now, to a caller's transaction, so it commits with
        the event it announces. The account index has one score for all, so it is ordered by id, and
        ids sort by time."""
        index = account_messages_key(message.account_id)
        pipe.set(message_key(message.id), message.to_json(), ex=self.retention_seconds)
        pipe.zadd(index, {message.id: 0})
        due = now_ms()
        if self.oldest_kept_id is not None:
            pipe.zremrangebylex(index, "-", f"({self.oldest_kept_id(due - self.retention_seconds * 1000)}")
        for destination in message.destinations:
            self.stage_delivery(pipe, Delivery(message.id, destination.name))
            pipe.zadd(DUE_KEY, {due_member(message.id, destination.name): due})
        pipe.publish(WAKE_CHANNEL, message.id)

    def stage_redeliver(self, pipe: Any, deliveries: Sequence[Delivery]) -> None:
        """Make finished deliveries pending and due now (a manual retry or an endpoint's recovery);
        their attempt history stays, and numbering goes on from it."""
        due = now_ms()
        for delivery in deliveries:
            self.stage_delivery(pipe, replace(delivery, status="pending"))
            pipe.zadd(DUE_KEY, {due_member(delivery.msg_id, delivery.destination): due})
        pipe.publish(WAKE_CHANNEL, "redeliver")

    async def list_for_account(
        self, account_id: str, *, limit: int, before: str | None, where: MessageFilter
    ) -> list[LoggedMessage]:
        """Newest first; message ids sort by time, so `before` is a cursor."""
        found: list[LoggedMessage] = []
        maximum = f"({before}" if before else "+"
        while len(found) < limit:
            ids = await self.redis.zrevrangebylex(
                account_messages_key(account_id), maximum, "-", start=0, num=limit * 2
            )
            if not ids:
                break
            raws = await self.redis.mget([message_key(i.decode()) for i in ids])
            messages = [Message.from_json(raw) for raw in raws if raw is not None]
            async with self.redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.mget([delivery_key(message.id, d.name) for d in message.destinations] or ["-"])
                every = await pipe.execute()
            for message, raw_deliveries in zip(messages, every, strict=True):
                deliveries = tuple(Delivery.from_json(raw) for raw in raw_deliveries if raw is not None)
                if where.admits(message, deliveries):
                    found.append(LoggedMessage(message, deliveries))
            maximum = f"({ids[-1].decode()}"
        return found[:limit]
