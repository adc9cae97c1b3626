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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from webhooks.changes import stage_change

# `skipped`: the event happened while its endpoint was disabled, so nothing was sent; recovering the
# endpoint sends it.
DeliveryStatus = Literal["pending", "delivered", "failed", "skipped"]
RESPONSE_EXCERPT_BYTES = 8192
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600
# Deliveries waiting for an attempt, scored by when it is due (epoch ms); see webhooks.dispatcher.
DUE_KEY = "dr:webhooks:due"
# Published when another process made deliveries due: every dispatcher looks at once, not at its next poll.
WAKE_CHANNEL = "dr:webhooks:wake"
# Deliveries with an attempt in flight, scored by when its lease runs out (see webhooks.dispatcher): at
# most one attempt per delivery at a time, and a manual retry waits for the one under way.
LEASES_KEY = "dr:webhooks:leases"
# The destination name of a resource's own callback_url (endpoints are named by their `ep_` id).
CALLBACK = "callback"


Data = TypeVar("Data")


class Event(BaseModel, Generic[Data]):
    """A webhook's body, as Standard Webhooks has it: what happened, when, and to what (`data`: the
    resource as the API answers it). `/openapi.json` documents each event type by its parametrised
    model (server/resources.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    timestamp: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    data: Data


def now_ms() -> int:
    """Epoch milliseconds: the scores of the due set."""
    return time.time_ns() // 1_000_000


def iso(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_message(
    msg_id: str,
    account_id: str,
    event_type: str,
    data: dict[str, Any],
    to: Sequence[Destination],
    resource_ids: Sequence[str] = (),
    *,
    request_id: str | None = None,
) -> Message:
    """An event for `to`, its Standard Webhooks body serialised once: signed and sent exactly so;
    `resource_ids` name what it is about, for the delivery log's filters; `request_id` is the request
    that led to it, for the dispatcher's log lines (never sent)."""
    created_at = iso(now_ms())
    body = Event[dict[str, Any]](type=event_type, timestamp=created_at, data=data).model_dump_json()
    return Message(
        msg_id, account_id, event_type, body, created_at, tuple(to), tuple(resource_ids), request_id
    )


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


def batch_messages_key(account_id: str, batch_id: str) -> str:
    """The account's messages about one batch and its images, ordered as its whole index is."""
    return f"dr:account:{account_id}:batch:{batch_id}:messages"


def is_batch_id(resource_id: str) -> bool:
    """Of the resources a message is about, only batches have an index of their messages: an image's
    record names its own message, and an index per image would cost a Redis key per image."""
    return resource_id.startswith("bat_")


def endpoint_pending_key(endpoint_id: str) -> str:
    """The endpoint's pending deliveries (their due-set members), so that deleting it can end them."""
    return f"dr:ep:{endpoint_id}:pending"


def is_endpoint(destination: str) -> bool:
    return destination != CALLBACK


@dataclass(frozen=True)
class Attempt:
    number: int
    at: str
    status_code: int | None
    latency_ms: float
    response_excerpt: str
    error: str | None
    next_attempt_at: str | None = None
    url: str | None = None  # where the request went; None when none was sent (a refusal)
    resent: str | None = None  # why the request went twice (a kept-alive connection closed unanswered)

    @property
    def succeeded(self) -> bool:
        return is_success(self.status_code)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Attempt:
        # Redis' Lua JSON encoder writes 0.0 as 0: the latency is a float whatever the writer.
        return cls(**{**data, "latency_ms": float(data["latency_ms"])})


@dataclass(frozen=True)
class HashIncrement:
    hash_key: str
    field: str
    amount: int | float

    def arguments(self) -> tuple[str, str, str]:
        kind = "float" if isinstance(self.amount, float) else "int"
        return kind, self.field, repr(self.amount)


@dataclass
class AttemptCounts:
    """Counters an attempt moves (the service's metrics), taken as a pipeline's HINCRBY and HINCRBYFLOAT
    and applied by the script that records the attempt, only when it records it: a transaction sent again
    after its reply was lost (the worker's pool does that) records the attempt once, and counts it once."""

    increments: list[HashIncrement] = field(default_factory=list)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.increments.append(HashIncrement(name, key, amount))

    def hincrbyfloat(self, name: str, key: str, amount: float) -> None:
        self.increments.append(HashIncrement(name, key, float(amount)))


@dataclass(frozen=True)
class Destination:
    """Where a message goes: `name` is CALLBACK or an endpoint id; `url` as it was when the event
    happened (an endpoint's attempts use its current URL). `disabled_reason` is set for an endpoint that
    was disabled when the event happened: its delivery is recorded `skipped`, not sent, so that
    recovering the endpoint later sends it."""

    name: str
    url: str
    disabled_reason: str | None = None


@dataclass(frozen=True)
class Message:
    id: str
    account_id: str
    event_type: str
    # The body exactly as signed and sent on every attempt: serialised once, never re-encoded.
    body: str
    created_at: str
    destinations: tuple[Destination, ...]
    # The resources it is about: an image and its batch, or a batch (none for messages made before).
    resource_ids: tuple[str, ...] = ()
    # The X-Request-Id of the request that led to it, for the dispatcher's log lines (never sent).
    request_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Message:
        data = json.loads(raw)
        data["destinations"] = tuple(Destination(**each) for each in data["destinations"])
        data["resource_ids"] = tuple(data.get("resource_ids", ()))
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
        # Lua's encoder writes an empty list as {}: iterating either gives no attempts.
        data["attempts"] = tuple(Attempt.from_record(attempt) for attempt in data["attempts"])
        return cls(**data)


def skipped_delivery(message: Message, destination: str, disabled_reason: str) -> Delivery:
    """The record of an event not sent to a disabled endpoint: one attempt that says why (none was made,
    so it has neither URL nor status code), as a refused attempt does."""
    why = f"not sent: the endpoint was disabled ({disabled_reason})"
    return Delivery(message.id, destination, "skipped", (Attempt(1, message.created_at, None, 0.0, "", why),))


def overall_status(deliveries: Sequence[Delivery]) -> DeliveryStatus:
    """Pending while any destination is; failed if any failed for good; skipped if any was not sent (its
    endpoint disabled); else delivered."""
    statuses = {delivery.status for delivery in deliveries}
    return next((status for status in ("pending", "failed", "skipped") if status in statuses), "delivered")


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
    batch_id: str | None = None
    # Only these messages (those an image names), read directly rather than from an index.
    message_ids: tuple[str, ...] | None = None

    def admits(self, message: Message, deliveries: Sequence[Delivery]) -> bool:
        if self.event_type is not None and message.event_type != self.event_type:
            return False
        if self.batch_id is not None and self.batch_id not in message.resource_ids:
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


# Record one attempt's outcome: append it to the delivery's attempts (numbered by its place, so that no
# attempt ever overwrites another's record), set the status, re-score or finish the delivery and give
# back its leases. A retry of a deleted endpoint's delivery would go nowhere: it ends failed instead.
# KEYS: the delivery record, DUE_KEY, LEASES_KEY. ARGV: member, destination, attempt (JSON), status,
# next attempt (epoch ms, for a pending status), retention (seconds). Returns the status recorded.
_RECORD_ATTEMPT = """
local member, destination, status = ARGV[1], ARGV[2], ARGV[4]
local attempt = cjson.decode(ARGV[3])
local endpoint = nil
if destination ~= 'callback' then endpoint = 'dr:ep:' .. destination end
if status == 'pending' and endpoint and redis.call('EXISTS', endpoint) == 0 then
  status = 'failed'
  attempt['next_attempt_at'] = cjson.null
end
local raw = redis.call('GET', KEYS[1])
local record
if raw then
  record = cjson.decode(raw)
else
  record = {msg_id = string.match(member, '^([^:]*)'), destination = destination, attempts = {}}
end
-- The same attempt sent again (its transaction replayed after a lost reply) is recorded once: a
-- delivery has one attempt in flight, so two of its attempts never share a millisecond.
local last = record['attempts'][#record['attempts']]
if not (last and last['at'] == attempt['at']) then
  attempt['number'] = #record['attempts'] + 1
  table.insert(record['attempts'], attempt)
  -- Its counts (AttemptCounts) move with it, so they too are counted once.
  for i = 4, #KEYS do
    local at = 7 + (i - 4) * 3
    local increment = ARGV[at] == 'float' and 'HINCRBYFLOAT' or 'HINCRBY'
    redis.call(increment, KEYS[i], ARGV[at + 1], ARGV[at + 2])
  end
end
record['status'] = status
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', ARGV[6])
redis.call('ZREM', KEYS[3], member)
if endpoint then redis.call('ZREM', endpoint .. ':leases', member) end
if status == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[5], member)
else
  redis.call('ZREM', KEYS[2], member)
  if endpoint then redis.call('SREM', endpoint .. ':pending', member) end
end
return status
"""

# Make a delivery due now (a manual retry, an endpoint's recovery), unless an attempt holds its lease:
# a second attempt beside it would send the same message twice at once. A finished delivery becomes
# pending again, its attempts kept; one waiting for its next retry is brought forward (ZADD LT never
# moves an earlier due time later).
# KEYS: the delivery record, DUE_KEY, LEASES_KEY. ARGV: member, destination, now (epoch ms).
# Returns 'due', 'in_flight' or 'gone' (the record expired).
_REDELIVER = """
local member, destination, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease = redis.call('ZSCORE', KEYS[3], member)
if lease and tonumber(lease) > now then return 'in_flight' end
local raw = redis.call('GET', KEYS[1])
if not raw then return 'gone' end
local record = cjson.decode(raw)
if record['status'] ~= 'pending' then
  record['status'] = 'pending'
  redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
  if destination ~= 'callback' then redis.call('SADD', 'dr:ep:' .. destination .. ':pending', member) end
end
redis.call('ZADD', KEYS[2], 'LT', now, member)
return 'due'
"""

RedeliveryOutcome = Literal["due", "in_flight", "gone"]


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

    def stage_new(self, pipe: Any, message: Message) -> None:
        """Add a new message, each destination due now, to a caller's transaction, so it commits with
        the event it announces. The account's indexes (all its messages; those about a batch) have one
        score for all, so they are ordered by id, and ids sort by time. A batch's index lives as long as
        its newest message."""
        pipe.set(message_key(message.id), message.to_json(), ex=self.retention_seconds)
        due = now_ms()
        indexes = [account_messages_key(message.account_id)]
        for batch_id in filter(is_batch_id, message.resource_ids):
            indexes.append(batch_messages_key(message.account_id, batch_id))
            pipe.expire(indexes[-1], self.retention_seconds)
        oldest = (
            None if self.oldest_kept_id is None else self.oldest_kept_id(due - self.retention_seconds * 1000)
        )
        for index in indexes:
            pipe.zadd(index, {message.id: 0})
            if oldest is not None:
                pipe.zremrangebylex(index, "-", f"({oldest}")
        for destination in message.destinations:
            member = due_member(message.id, destination.name)
            if destination.disabled_reason is not None:
                pipe.set(
                    delivery_key(message.id, destination.name),
                    skipped_delivery(message, destination.name, destination.disabled_reason).to_json(),
                    ex=self.retention_seconds,
                )
                continue
            pipe.set(
                delivery_key(message.id, destination.name),
                Delivery(message.id, destination.name).to_json(),
                ex=self.retention_seconds,
            )
            pipe.zadd(DUE_KEY, {member: due})
            if is_endpoint(destination.name):
                pipe.sadd(endpoint_pending_key(destination.name), member)
        pipe.publish(WAKE_CHANNEL, message.id)
        stage_change(pipe, message.account_id, "delivery", message.id)

    def stage_attempt(
        self,
        pipe: Any,
        account_id: str,
        delivery: Delivery,
        attempt: Attempt,
        status: DeliveryStatus,
        next_at: int | None,
        counts: AttemptCounts | None = None,
    ) -> None:
        """Record an attempt and what follows it (see _RECORD_ATTEMPT) in a caller's transaction, and
        apply `counts` with it."""
        member = due_member(delivery.msg_id, delivery.destination)
        increments = [] if counts is None else counts.increments
        pipe.eval(
            _RECORD_ATTEMPT,
            3 + len(increments),
            delivery_key(delivery.msg_id, delivery.destination),
            DUE_KEY,
            LEASES_KEY,
            *(increment.hash_key for increment in increments),
            member,
            delivery.destination,
            attempt.to_json(),
            status,
            "" if next_at is None else str(next_at),
            str(self.retention_seconds),
            *(part for increment in increments for part in increment.arguments()),
        )
        stage_change(pipe, account_id, "delivery", delivery.msg_id)

    def stage_redeliver(self, pipe: Any, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Make deliveries due now (a manual retry or an endpoint's recovery), except those with an
        attempt under way; their attempt history stays, and numbering goes on from it. The pipeline's
        results hold each one's RedeliveryOutcome, in order."""
        due = now_ms()
        for delivery in deliveries:
            pipe.eval(
                _REDELIVER,
                3,
                delivery_key(delivery.msg_id, delivery.destination),
                DUE_KEY,
                LEASES_KEY,
                due_member(delivery.msg_id, delivery.destination),
                delivery.destination,
                str(due),
            )
        pipe.publish(WAKE_CHANNEL, "redeliver")
        for msg_id in dict.fromkeys(delivery.msg_id for delivery in deliveries):
            stage_change(pipe, account_id, "delivery", msg_id)

    async def redeliver(self, account_id: str, deliveries: Sequence[Delivery]) -> list[RedeliveryOutcome]:
        """`stage_redeliver` on its own; what became of each delivery."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.stage_redeliver(pipe, account_id, deliveries)
            results = await pipe.execute()
        return [result.decode() for result in results[: len(deliveries)]]

    async def list_for_account(
        self, account_id: str, *, limit: int, before: str | None, where: MessageFilter
    ) -> list[LoggedMessage]:
        """Newest first; message ids sort by time, so `before` is a cursor. Those about a batch are read
        from its own index, the few `where` names directly: neither is picked out of all the account's."""
        if where.message_ids is not None:
            named = sorted((i for i in where.message_ids if before is None or i < before), reverse=True)
            return (await self._logged(named, where))[:limit]
        found: list[LoggedMessage] = []
        maximum = f"({before}" if before else "+"
        index = (
            account_messages_key(account_id)
            if where.batch_id is None
            else batch_messages_key(account_id, where.batch_id)
        )
        while len(found) < limit:
            ids = await self.redis.zrevrangebylex(index, maximum, "-", start=0, num=limit * 2)
            if not ids:
                break
            found += await self._logged([i.decode() for i in ids], where)
            maximum = f"({ids[-1].decode()}"
        return found[:limit]

    async def _logged(self, msg_ids: Sequence[str], where: MessageFilter) -> list[LoggedMessage]:
        """Those of the messages still kept that `where` admits, with their deliveries, in order."""
        if not msg_ids:
            return []
        raws = await self.redis.mget([message_key(msg_id) for msg_id in msg_ids])
        messages = [Message.from_json(raw) for raw in raws if raw is not None]
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.mget([delivery_key(message.id, d.name) for d in message.destinations] or ["-"])
            every = await pipe.execute()
        logged = []
        for message, raw_deliveries in zip(messages, every, strict=True):
            deliveries = tuple(Delivery.from_json(raw) for raw in raw_deliveries if raw is not None)
            if where.admits(message, deliveries):
                logged.append(LoggedMessage(message, deliveries))
        return logged
