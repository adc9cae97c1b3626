"""The delivery loop: every worker process sends due webhook deliveries, apart from image jobs.

Deliveries waiting for an attempt sit in one Redis sorted set scored by when they are due. A dispatcher
claims due deliveries with a lease (their score moves to now + lease) and attempts them concurrently; an
attempt ends by removing the delivery (delivered, or failed for good) or by re-scoring it for its next
retry. A worker killed mid-attempt loses nothing: the lease runs out and any worker claims the delivery
again, under the same `webhook-id` (at least once).

Registered endpoints get at most `max_in_flight` attempts at once across every worker (their leases sit
in a per-endpoint sorted set, so a dead worker's run out) and at most `rate_limit` a second.

Deliveries never wait behind image processing: they are not arq jobs and have their own concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError

from webhooks.delivery import AttemptOutcome, post_signed
from webhooks.endpoints import Endpoint, EndpointStore, endpoint_leases_key, valid_secrets
from webhooks.messages import (
    CALLBACK,
    DUE_KEY,
    WAKE_CHANNEL,
    Attempt,
    Delivery,
    DeliveryStatus,
    Message,
    MessageStore,
    due_member,
    event_body,
    iso,
    now_ms,
    parse_due_member,
)
from webhooks.transport import DeliveryClient

log = logging.getLogger("darkroom.webhooks")

SecretsLookup = Callable[[str], Awaitable[Sequence[str] | None]]
# Extra commands for the transaction that records an attempt (e.g. counters), given the pipeline.
AttemptHook = Callable[[object, Attempt], None]
NewId = Callable[[str], str]

# Claim due deliveries, skipping those whose endpoint is at its in-flight limit and pushing those over
# its rate limit to the next second. Returns the claimed members, whether any was held back by a full
# endpoint, and when the next delivery is due.
_CLAIM = """
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[2])
local lease_until = tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local claimed = {}
local full = {}
local held_back = 0
for _, member in ipairs(due) do
  if #claimed >= room then break end
  local destination = string.match(member, ':(.*)$')
  local take = true
  if string.sub(destination, 1, 3) == 'ep_' then
    local leases = 'dr:ep:' .. destination .. ':leases'
    if full[destination] then
      take = false
    else
      redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
      local limits = redis.call('HMGET', 'dr:ep:' .. destination, 'max_in_flight', 'rate_limit')
      if redis.call('ZCARD', leases) >= (tonumber(limits[1]) or 10) then
        full[destination] = true
        take = false
      elseif limits[2] then
        local second = math.floor(now / 1000)
        local counter = 'dr:ep:' .. destination .. ':rate:' .. second
        local sent = redis.call('INCR', counter)
        if sent == 1 then redis.call('PEXPIRE', counter, 2000) end
        if sent > tonumber(limits[2]) then
          take = false
          redis.call('ZADD', KEYS[1], (second + 1) * 1000, member)
        end
      end
      if take then redis.call('ZADD', leases, lease_until, member) end
    end
    if full[destination] then held_back = 1 end
  end
  if take then
    redis.call('ZADD', KEYS[1], lease_until, member)
    table.insert(claimed, member)
  end
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {claimed, held_back, next_due[2] or false}
"""
# How many due deliveries one claim looks through, per free slot, past those of full endpoints.
_SCAN_PER_SLOT = 20
# With deliveries held back by a full endpoint and nothing of ours in flight to wake us, look again this soon.
_HELD_BACK_POLL = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    """When the next attempt is due. `schedule[n]` is the wait after attempt n + 1 fails; past its end
    the delivery fails for good."""

    schedule: tuple[float, ...]
    jitter: float = 0.2  # each wait is scheduled ±20 %, so a receiver's outage does not end in a stampede
    slow_down_seconds: float = 60.0  # a 429 or a timeout waits at least this long
    disable_after_seconds: float = 5 * 24 * 3600  # an endpoint failing this long is disabled

    def delay(self, attempts_made: int, outcome: AttemptOutcome, rng: random.Random) -> float | None:
        index = attempts_made - 1
        if outcome.status_code == 410 or not 0 <= index < len(self.schedule):
            return None
        scheduled = self.schedule[index] * rng.uniform(1 - self.jitter, 1 + self.jitter)
        wait = scheduled
        asked = _retry_after_seconds(outcome.retry_after) if outcome.status_code in (429, 503) else None
        if asked is not None:
            # The receiver's own estimate, within reason: never sooner than planned, never past double.
            wait = min(max(asked, scheduled), 2 * scheduled)
        if outcome.status_code == 429 or outcome.timed_out:
            wait = max(wait, self.slow_down_seconds)
        return wait


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delay-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now_ms() / 1000)


class Dispatcher:
    def __init__(
        self,
        redis: Redis,
        http: DeliveryClient,
        secrets_for: SecretsLookup,
        policy: RetryPolicy,
        *,
        new_id: NewId,
        lease_seconds: float,
        messages: MessageStore | None = None,
        concurrency: int = 50,
        idle_wait: float = 1.0,
        on_attempt: AttemptHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.http = http
        self.messages = messages or MessageStore(redis)
        self.endpoints = EndpointStore(redis)
        self.secrets_for = secrets_for
        self.policy = policy
        self.new_id = new_id
        self.lease_ms = int(lease_seconds * 1000)
        self.concurrency = concurrency
        self.idle_wait = idle_wait
        self.on_attempt = on_attempt
        self.rng = rng or random.Random()
        self._claim = redis.register_script(_CLAIM)
        self._woken = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    def nudge(self) -> None:
        """A delivery became due: look now rather than at the next poll."""
        self._woken.set()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="darkroom-webhook-dispatcher")
        self._listener = asyncio.create_task(self._listen(), name="darkroom-webhook-wake")

    async def stop(self) -> None:
        """Stop claiming; let attempts under way finish (their leases would otherwise hold them back)."""
        for task in (self._loop, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop = self._listener = None
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=self.lease_ms / 1000)

    async def run_until_idle(self) -> None:
        """Deliver until nothing is waiting, retries included (for burst runs and tests)."""
        while True:
            next_due, held_back = await self._claim_and_send()
            if self._in_flight:
                await asyncio.wait(self._in_flight)
                continue
            if held_back:
                await asyncio.sleep(_HELD_BACK_POLL)  # another process holds the endpoint's slots
                continue
            if next_due is None:
                return
            await asyncio.sleep(max(0.0, (next_due - now_ms()) / 1000))

    async def _run(self) -> None:
        while True:
            held_back = False
            try:
                self._woken.clear()
                next_due, held_back = await self._claim_and_send()
            except (RedisError, OSError) as exc:
                log.warning("webhook dispatcher cannot reach Redis (%s); retrying", exc)
                next_due = None
            except Exception:
                # The loop must outlive any one bad turn, or this worker stops sending webhooks.
                log.exception("webhook dispatcher turn failed; retrying")
                next_due = None
            wait = self.idle_wait if next_due is None else (next_due - now_ms()) / 1000
            if held_back:
                wait = min(wait, _HELD_BACK_POLL)
            if len(self._in_flight) >= self.concurrency or (held_back and self._in_flight):
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), self.idle_wait)
            elif wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), min(wait, self.idle_wait))

    async def _listen(self) -> None:
        """Deliveries made due by other processes (a test event, a retry from the API) wake us."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(WAKE_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.nudge()
            except (RedisError, OSError) as exc:
                log.warning("webhook wake-up channel lost (%s); polling until it is back", exc)
                await asyncio.sleep(self.idle_wait)

    async def _claim_and_send(self) -> tuple[float | None, bool]:
        """Start attempts for the due deliveries there is room for; return when the next one is due
        and whether a full endpoint held some back."""
        room = self.concurrency - len(self._in_flight)
        if room <= 0:
            return None, False
        now = now_ms()
        claimed, held_back, next_due = await self._claim(
            keys=[DUE_KEY], args=[now, room, now + self.lease_ms, room * _SCAN_PER_SLOT]
        )
        for raw_member in claimed:
            task = asyncio.create_task(self._attempt(raw_member.decode()))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return (float(next_due) if next_due is not None else None), bool(held_back)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())

    async def _attempt(self, member: str) -> None:
        msg_id, destination = parse_due_member(member)
        found = await self.messages.get_delivery(msg_id, destination)
        if found is None or found[1].status != "pending":
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(DUE_KEY, member)
                if destination != CALLBACK:
                    pipe.zrem(endpoint_leases_key(destination), member)
                await pipe.execute()
            return
        message, delivery = found
        number = len(delivery.attempts) + 1
        started = now_ms()
        endpoint = None
        if destination == CALLBACK:
            url = next(d.url for d in message.destinations if d.name == CALLBACK)
            secrets = await self.secrets_for(message.account_id)
            refusal = None if secrets else "the account no longer exists"
        else:
            endpoint = await self.endpoints.get(destination)
            url = endpoint.url if endpoint else ""
            secrets = valid_secrets(endpoint.secrets, started) if endpoint else []
            refusal = _refusal(endpoint)
        if refusal is not None or not secrets:
            attempt = Attempt(number, iso(started), None, 0.0, "", refusal or "no valid signing secret")
            # Not an attempt on the receiver: the endpoint's health record is left alone.
            await self._record(delivery.with_attempt(attempt, "failed"), attempt, None, None, None)
            return
        outcome = await post_signed(self.http, url, message.id, message.body.encode(), secrets)
        delay = None if outcome.succeeded else self.policy.delay(number, outcome, self.rng)
        next_at = None if delay is None else now_ms() + int(delay * 1000)
        attempt = Attempt(
            number=number,
            at=iso(started),
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            response_excerpt=outcome.response_excerpt,
            error=outcome.error,
            next_attempt_at=None if next_at is None else iso(next_at),
        )
        status: DeliveryStatus = "delivered" if outcome.succeeded else ("pending" if next_at else "failed")
        disable_reason = None if endpoint is None else self._disable_reason(endpoint, outcome, started)
        await self._record(delivery.with_attempt(attempt, status), attempt, next_at, endpoint, disable_reason)

    def _disable_reason(self, endpoint: Endpoint, outcome: AttemptOutcome, moment_ms: int) -> str | None:
        if outcome.succeeded:
            return None
        if outcome.status_code == 410:
            return "the endpoint answered 410 Gone"
        failing_since = endpoint.failing_since_ms
        if (
            failing_since is not None
            and moment_ms - failing_since >= self.policy.disable_after_seconds * 1000
        ):
            days = self.policy.disable_after_seconds / 86400
            return f"every delivery failed for {days:g} days"
        return None

    async def _record(
        self,
        delivery: Delivery,
        attempt: Attempt,
        next_at: int | None,
        endpoint: Endpoint | None,
        disable_reason: str | None,
    ) -> None:
        """Save the attempt, re-score or finish the delivery, give back its endpoint slot and, when
        `endpoint` is given, record the receiver's health: all in one transaction."""
        member = due_member(delivery.msg_id, delivery.destination)
        announcement = None
        if endpoint is not None and disable_reason is not None:
            announcement = await self._disabled_announcement(endpoint, disable_reason)
        async with self.redis.pipeline(transaction=True) as pipe:
            self.messages.stage_delivery(pipe, delivery)
            if next_at is None:
                pipe.zrem(DUE_KEY, member)
            else:
                pipe.zadd(DUE_KEY, {member: next_at})
            if delivery.destination != CALLBACK:
                pipe.zrem(endpoint_leases_key(delivery.destination), member)
            if endpoint is not None:
                if attempt.succeeded:
                    EndpointStore.stage_success(pipe, endpoint.id)
                else:
                    EndpointStore.stage_failure(pipe, endpoint.id, now_ms())
                if disable_reason is not None:
                    EndpointStore.stage_disable(pipe, endpoint.id, disable_reason, now_ms())
                if announcement is not None:
                    self.messages.stage_new(pipe, announcement)
            if self.on_attempt is not None:
                self.on_attempt(pipe, attempt)
            await pipe.execute()
        if announcement is not None:
            self.nudge()

    async def _disabled_announcement(self, endpoint: Endpoint, reason: str) -> Message | None:
        """`endpoint.disabled`, for the account's other endpoints that want it."""
        others = [
            destination
            for destination in await self.endpoints.subscribed(endpoint.account_id, "endpoint.disabled")
            if destination.name != endpoint.id
        ]
        if not others:
            return None
        moment = now_ms()
        data = {
            **endpoint.resource(),
            "status": "disabled",
            "disabled_reason": reason,
            "disabled_at": iso(moment),
        }
        return Message(
            id=self.new_id("msg"),
            account_id=endpoint.account_id,
            event_type="endpoint.disabled",
            body=event_body("endpoint.disabled", data),
            created_at=iso(moment),
            destinations=tuple(others),
        )


def _refusal(endpoint: Endpoint | None) -> str | None:
    if endpoint is None:
        return "the endpoint was deleted"
    if endpoint.status == "disabled":
        return f"the endpoint is disabled ({endpoint.disabled_reason or 'by its owner'})"
    return None
