"""The delivery loop: every worker process sends due webhook deliveries, apart from image jobs.

Deliveries waiting for an attempt sit in one Redis sorted set scored by when they are due. A dispatcher
claims due deliveries with a lease (their score moves to now + lease) and attempts them concurrently; an
attempt ends by removing the delivery (delivered, or failed for good) or by re-scoring it for its next
retry. A worker killed mid-attempt loses nothing: the lease runs out and any worker claims the delivery
again, under the same `webhook-id` (at least once).

A delivery has at most one attempt in flight: its lease also sits in one sorted set of leases, which a
manual retry respects. Registered endpoints get at most `max_in_flight` attempts at once across every
worker (their leases sit in a per-endpoint sorted set, so a dead worker's run out) and at most
`rate_limit` a second. A worker splits its attempt slots into lanes by how each origin's attempts went
(webhooks.lanes): origins that answer promptly have slots that hanging or slow ones never hold for longer
than a second, however many of those there are.

Deliveries never wait behind image processing: they are not arq jobs and have their own concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from webhooks.delivery import AttemptOutcome, post_signed
from webhooks.endpoints import (
    PARKED_ENDPOINTS_KEY,
    PARKED_ORIGINS_KEY,
    Endpoint,
    EndpointStore,
    endpoint_leases_key,
    valid_secrets,
)
from webhooks.lanes import ATTEMPTS_PER_CONNECTION, SLOW_AFTER_SECONDS, OriginLanes, Running
from webhooks.log_context import bind
from webhooks.messages import (
    CALLBACK,
    DUE_KEY,
    LEASES_KEY,
    WAKE_CHANNEL,
    Attempt,
    AttemptCounts,
    Delivery,
    DeliveryStatus,
    Message,
    MessageStore,
    endpoint_pending_key,
    is_endpoint,
    iso,
    new_message,
    now_ms,
    parse_due_member,
)
from webhooks.transport import DeliveryClient

log = logging.getLogger("darkroom.webhooks")

SecretsLookup = Callable[[str], Awaitable[Sequence[str] | None]]
# Counts an attempt moves (jobs/stats.py), added to the AttemptCounts given; with the delivery as it was
# before the attempt (a delivery sent again keeps its earlier attempts).
AttemptHook = Callable[[AttemptCounts, Message, Delivery, Attempt], None]
NewId = Callable[[str], str]

# Claim due deliveries, at most `room`, with a lease: their due score moves to the lease's end and
# LEASES_KEY holds it, so that a manual retry never starts a second attempt beside one under way (and a
# delivery made due again meanwhile is put back, not claimed twice).
#
# Two limits keep one slow receiver's backlog from standing in front of everyone else's deliveries: an
# endpoint's `max_in_flight` across every worker (its leases sit in `dr:ep:{id}:leases`), and this process's
# lanes (webhooks.lanes): each origin (scheme, host and port) takes this process's attempt slots from the lane
# its past attempts earned (fast, new or slow: ARGV[5..7] free in each), within its lane's per-origin limit
# (ARGV[10..12]), and a fast origin with ARGV[9] or more in flight leaves the fast lane's last ARGV[8]
# slots to quieter ones. ARGV[13..] are (origin, lane, attempts in flight) of the
# origins this process remembers; any other is new, with none. A delivery over either limit is parked:
# moved, with its score, from the due set to the endpoint's or the origin's parked set. Each claim first
# returns parked deliveries to the due set, oldest first, as their endpoint or origin has room (an attempt
# finished or went slow, a dead worker's lease ran out, or this is another process, with slots of its own):
# they keep their old scores, so they come before younger deliveries and never starve. NX: one made due
# again meanwhile (a retry) keeps its place. Deliveries over an endpoint's rate limit wait for the next
# second.
#
# A callback's URL is read from its message record, whose destinations Message.to_json writes as
# {"name":"callback","url":"..."} (a quote inside the JSON body string is always escaped, so the body
# never matches). A URL that yields no origin just goes without the origin limit.
#
# Returns the claimed members, each one's origin, how many deliveries stay parked, when the next delivery
# is due, and each claimed delivery's message, delivery and endpoint records (so an attempt starts
# without another round trip, and never on a stale copy of an endpoint its owner just deleted or
# disabled). Key layouts: webhooks.messages, webhooks.endpoints.
_CLAIM = """
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[2])
local lease_until = tonumber(ARGV[3])
local lane_room = {fast = tonumber(ARGV[5]), new = tonumber(ARGV[6]), slow = tonumber(ARGV[7])}
local fast_reserve, busy_from = tonumber(ARGV[8]), tonumber(ARGV[9])
local per_origin = {fast = tonumber(ARGV[10]), new = tonumber(ARGV[11]), slow = tonumber(ARGV[12])}
local due_key, parked_endpoints, leases, parked_origins = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local lane_of, mine = {}, {}
for i = 13, #ARGV, 3 do
  lane_of[ARGV[i]] = ARGV[i + 1]
  mine[ARGV[i]] = tonumber(ARGV[i + 2])
end
-- Slots promised to parked deliveries returned to the due set by this claim, by lane.
local promised = {fast = 0, new = 0, slow = 0}

local function origin_of(url)
  local scheme, authority = string.match(url or '', '^(%a[%w+.-]*)://([^/?#]*)')
  if not scheme then return '' end
  scheme = string.lower(scheme)
  authority = string.lower((string.gsub(authority, '^.*@', '')))
  local host, port = string.match(authority, '^(%[.*%]):?(%d*)$')
  if not host then host, port = string.match(authority, '^([^:]*):?(%d*)$') end
  if not host or host == '' then return '' end
  if port == '' then port = (scheme == 'https') and '443' or '80' end
  return scheme .. '://' .. host .. ':' .. port
end

local function endpoint_room(endpoint)
  local endpoint_leases = 'dr:ep:' .. endpoint .. ':leases'
  redis.call('ZREMRANGEBYSCORE', endpoint_leases, '-inf', now)
  local limit = tonumber(redis.call('HGET', 'dr:ep:' .. endpoint, 'max_in_flight')) or 10
  return limit - redis.call('ZCARD', endpoint_leases)
end

local function lane(origin)
  if origin == '' then return 'fast' end  -- refused without a request: no receiver's slot
  return lane_of[origin] or 'new'
end

local function origin_room(origin)
  local own_lane = lane(origin)
  local in_flight = mine[origin] or 0
  local free = lane_room[own_lane] - promised[own_lane]
  if own_lane == 'fast' and in_flight >= busy_from then free = free - fast_reserve end
  if origin == '' then return free end
  return math.min(free, per_origin[own_lane] - in_flight)
end

local function promise(origin, count)
  local own_lane = lane(origin)
  promised[own_lane] = promised[own_lane] + count
end

local function park(parked, index, name, member, score)
  redis.call('ZREM', due_key, member)
  redis.call('ZADD', parked, score, member)
  redis.call('SADD', index, name)
end

local function unpark_all(index, prefix, room_of, on_return)
  local left_parked = 0
  for _, name in ipairs(redis.call('SMEMBERS', index)) do
    local parked = prefix .. name .. ':parked'
    local free = room_of(name)
    if free > 0 then
      local returning = redis.call('ZRANGE', parked, 0, free - 1, 'WITHSCORES')
      for i = 1, #returning, 2 do
        redis.call('ZADD', due_key, 'NX', returning[i + 1], returning[i])
        redis.call('ZREM', parked, returning[i])
      end
      if on_return then on_return(name, #returning / 2) end
    end
    local left = redis.call('ZCARD', parked)
    if left == 0 then redis.call('SREM', index, name) end
    left_parked = left_parked + left
  end
  return left_parked
end

redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local still_parked = unpark_all(parked_endpoints, 'dr:ep:', endpoint_room)
  + unpark_all(parked_origins, 'dr:origin:', origin_room, promise)
promised = {fast = 0, new = 0, slow = 0}  -- from here on, slots are taken as deliveries are claimed

local due = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
local claimed, origins = {}, {}
local endpoint_free = {}
local messages_read = {}
for i = 1, #due, 2 do
  if #claimed >= room then break end
  local member, score = due[i], due[i + 1]
  local msg_id, destination = string.match(member, '^([^:]*):(.*)$')
  local take = true
  local held = redis.call('ZSCORE', leases, member)
  if held then
    -- An attempt is under way (the delivery was made due again meanwhile): it waits for that one.
    redis.call('ZADD', due_key, held, member)
    take = false
  end
  local endpoint, url = nil, nil
  if take and destination == 'callback' then
    local raw = redis.call('GET', 'dr:msg:' .. msg_id)
    if raw then
      messages_read[msg_id] = raw
      url = string.match(raw, '{"name":"callback","url":"([^"]*)"')
    end
  elseif take then
    url = redis.call('HGET', 'dr:ep:' .. destination, 'url')
    if url then endpoint = destination end  -- else deleted: the attempt records that, sending nothing
  end
  local origin = origin_of(url)
  if take and endpoint then
    if endpoint_free[endpoint] == nil then endpoint_free[endpoint] = endpoint_room(endpoint) end
    if endpoint_free[endpoint] <= 0 then
      park('dr:ep:' .. endpoint .. ':parked', parked_endpoints, endpoint, member, score)
      still_parked = still_parked + 1
      take = false
    end
  end
  if take and origin_room(origin) <= 0 then
    park('dr:origin:' .. origin .. ':parked', parked_origins, origin, member, score)
    still_parked = still_parked + 1
    take = false
  end
  if take and endpoint then
    local rate_limit = tonumber(redis.call('HGET', 'dr:ep:' .. endpoint, 'rate_limit'))
    if rate_limit then
      local second = math.floor(now / 1000)
      local counter = 'dr:ep:' .. endpoint .. ':rate:' .. second
      local sent = redis.call('INCR', counter)
      if sent == 1 then redis.call('PEXPIRE', counter, 2000) end
      if sent > rate_limit then
        take = false
        redis.call('ZADD', due_key, (second + 1) * 1000, member)
      end
    end
  end
  if take then
    if endpoint then
      redis.call('ZADD', 'dr:ep:' .. endpoint .. ':leases', lease_until, member)
      endpoint_free[endpoint] = endpoint_free[endpoint] - 1
    end
    mine[origin] = (mine[origin] or 0) + 1
    lane_room[lane(origin)] = lane_room[lane(origin)] - 1
    redis.call('ZADD', due_key, lease_until, member)
    redis.call('ZADD', leases, lease_until, member)
    table.insert(claimed, member)
    table.insert(origins, origin)
  end
end
local next_due = redis.call('ZRANGE', due_key, 0, 0, 'WITHSCORES')
local records = {}
for _, member in ipairs(claimed) do
  local msg_id, destination = string.match(member, '^([^:]*):(.*)$')
  table.insert(records, messages_read[msg_id] or redis.call('GET', 'dr:msg:' .. msg_id) or false)
  table.insert(records, redis.call('GET', 'dr:dlv:' .. msg_id .. ':' .. destination) or false)
  if destination ~= 'callback' then
    table.insert(records, redis.call('HGETALL', 'dr:ep:' .. destination))
  else
    table.insert(records, false)
  end
end
return {claimed, origins, still_parked, next_due[2] or false, records}
"""
# How many due deliveries one claim looks through, per free slot (those of full endpoints get parked).
_SCAN_PER_SLOT = 4
# With deliveries parked behind another process's attempts, look again this soon.
_PARKED_POLL = 0.05
# How long a stopping dispatcher waits for a claim under way (a round trip to Redis).
_STOP_CLAIM_SECONDS = 5.0


def lease_seconds_for(attempt_timeout: float) -> float:
    """A lease longer than any attempt can take, so one that runs out means its worker died. The
    connection pool does not count waiting for a connection against an attempt's timeout, and an attempt
    may wait for the others ahead of it on its origin's connections before it takes its own time; one
    more covers recording it, and an origin spelled two ways sharing one pool."""
    return (ATTEMPTS_PER_CONNECTION + 1) * attempt_timeout + 5


@dataclass(frozen=True)
class _Claimed:
    """One claimed delivery, with the records the claim read for it."""

    member: str
    origin: str  # "" when its URL names none (the attempt records why)
    raw_message: bytes | None
    raw_delivery: bytes | None
    endpoint: Endpoint | None


@dataclass(frozen=True)
class _Claim:
    deliveries: list[_Claimed]
    parked: int  # deliveries waiting for a slot of their endpoint or origin
    next_due_ms: float | None


@dataclass(frozen=True)
class RetryPolicy:
    """When the next attempt is due. `schedule[n]` is the wait after attempt n + 1 fails; past its end
    the delivery fails for good."""

    schedule: tuple[float, ...]
    jitter: float = 0.2  # each wait is scheduled ±20 %, so a receiver's outage does not end in a stampede
    slow_down_seconds: float = 60.0  # a 429 without Retry-After, or a timeout, waits at least this long
    disable_after_seconds: float = 5 * 24 * 3600  # an endpoint failing this long is disabled

    def delay(self, attempts_made: int, outcome: AttemptOutcome, rng: random.Random) -> float | None:
        """The scheduled wait ±jitter, or longer when the receiver asked for more: a 429 or 503's
        `Retry-After` (at most the schedule's longest delay), else the slow-down after a 429 or a
        timeout. What was asked is a floor: never sooner, and up to `jitter` later, so deliveries turned
        away together do not all come back in the same second."""
        index = attempts_made - 1
        if outcome.status_code == 410 or not 0 <= index < len(self.schedule):
            return None
        scheduled = self.schedule[index] * rng.uniform(1 - self.jitter, 1 + self.jitter)
        asked = _retry_after_seconds(outcome.retry_after) if outcome.status_code in (429, 503) else None
        spread = rng.uniform(1, 1 + self.jitter)
        if asked is not None:
            # Spread, then capped: a receiver asking for years waits the longest delay, not 20 % past it.
            return max(scheduled, min(asked * spread, max(self.schedule)))
        if outcome.status_code == 429 or outcome.timed_out:
            return max(scheduled, self.slow_down_seconds * spread)
        return scheduled


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
        self.idle_wait = idle_wait
        self.on_attempt = on_attempt
        self.rng = rng or random.Random()
        self._claim = redis.register_script(_CLAIM)
        self._account_secrets = _RecentSecrets(secrets_for)
        self._woken = asyncio.Event()
        self._lanes = OriginLanes(concurrency, http.max_connections_per_origin)
        self._in_flight: dict[asyncio.Task[None], tuple[Running, asyncio.TimerHandle]] = {}
        self._loop: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False
        self._uncommitted: list[tuple[Callable[[Any], None], asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None

    def nudge(self) -> None:
        """A delivery became due, or a slot freed: look now rather than at the next poll."""
        self._woken.set()

    def start(self) -> None:
        self._stopping = False
        self._loop = asyncio.create_task(self._run(), name="darkroom-webhook-dispatcher")
        self._listener = asyncio.create_task(self._listen(), name="darkroom-webhook-wake")

    async def stop(self) -> None:
        """Stop claiming; let attempts under way finish (their leases would otherwise hold them back).
        A claim under way finishes too, and its attempts start: cancelled between Redis's answer and
        our reading of it, its deliveries would wait out their lease."""
        self._stopping = True
        self._woken.set()
        if self._loop is not None:
            _, still_claiming = await asyncio.wait({self._loop}, timeout=_STOP_CLAIM_SECONDS)
            if still_claiming:  # Redis stopped answering; a claim it made waits out its lease
                self._loop.cancel()
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
            next_due, parked = await self._claim_and_send()
            if self._in_flight:
                await asyncio.wait(self._in_flight)
                continue
            if parked:
                await asyncio.sleep(_PARKED_POLL)  # another process holds the endpoint's slots
                continue
            if next_due is None:
                return
            # Not past idle_wait: what is due next may be another process's lease on a delivery it
            # finishes in milliseconds, not a minute from now.
            await asyncio.sleep(min(max(0.0, (next_due - now_ms()) / 1000), self.idle_wait))

    async def _run(self) -> None:
        while not self._stopping:
            parked = False
            try:
                self._woken.clear()
                next_due, parked = await self._claim_and_send()
            except (RedisError, OSError) as exc:
                log.warning("webhook dispatcher cannot reach Redis (%s); retrying", exc)
                next_due = None
            except Exception:
                # The loop must outlive any one bad turn, or this worker stops sending webhooks.
                log.exception("webhook dispatcher turn failed; retrying")
                next_due = None
            wait = self.idle_wait if next_due is None else (next_due - now_ms()) / 1000
            if parked:
                wait = min(wait, _PARKED_POLL)
            if self._lanes.full():
                wait = self.idle_wait  # nothing can start before an attempt of ours ends or goes slow
            if wait > 0:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation (stop())
                # that comes as the event is set, and the loop would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, self.idle_wait)):
                        await self._woken.wait()

    async def _listen(self) -> None:
        """Deliveries made due by other processes (a test event, a retry from the API) wake us."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(WAKE_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.nudge()
            except (RedisError, OSError):
                # The worker's pool waits out an outage (and logs it once for the process) before
                # answering a PING; then subscribe again. Meanwhile the loop polls every idle_wait.
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.ping()
                await asyncio.sleep(self.idle_wait)

    async def _claim_due(self, room: int) -> _Claim:
        """Claim up to `room` due deliveries (see _CLAIM)."""
        now = now_ms()
        claimed, origins, parked, next_due, records = await self._claim(
            keys=[DUE_KEY, PARKED_ENDPOINTS_KEY, LEASES_KEY, PARKED_ORIGINS_KEY],
            args=[now, room, now + self.lease_ms, room * _SCAN_PER_SLOT, *self._lanes.claim_arguments()],
        )
        deliveries = []
        for index, (member, origin) in enumerate(zip(claimed, origins, strict=True)):
            raw_message, raw_delivery, raw_endpoint = records[3 * index : 3 * index + 3]
            endpoint = Endpoint.from_fields(raw_endpoint) if raw_endpoint else None
            deliveries.append(_Claimed(member.decode(), origin.decode(), raw_message, raw_delivery, endpoint))
        return _Claim(deliveries, int(parked), float(next_due) if next_due is not None else None)

    async def _claim_and_send(self) -> tuple[float | None, bool]:
        """Start attempts for the due deliveries there is room for; return when the next one is due
        and whether deliveries are parked behind busy endpoints or origins."""
        room = sum(self._lanes.room().values())
        if room <= 0:
            return None, False
        claim = await self._claim_due(room)
        loop = asyncio.get_running_loop()
        for claimed in claim.deliveries:
            task = asyncio.create_task(self._attempt(claimed))
            running = self._lanes.started(claimed.origin)
            self._in_flight[task] = (running, loop.call_later(SLOW_AFTER_SECONDS, self._overdue, running))
            task.add_done_callback(self._finished)
        return claim.next_due_ms, bool(claim.parked)

    def _overdue(self, running: Running) -> None:
        # Its slot moved to the slow lane: a prompt origin's delivery may take the one it leaves.
        self._lanes.overdue(running)
        self._woken.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        entry = self._in_flight.pop(task, None)
        if entry is not None:
            running, overdue_timer = entry
            overdue_timer.cancel()
            self._lanes.finished(running)
        # A slot of ours, of its origin and of its endpoint is free: claim again now.
        self._woken.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())

    async def _attempt(self, claimed: _Claimed) -> None:
        member = claimed.member
        _, destination = parse_due_member(member)
        raw_delivery, raw_message = claimed.raw_delivery, claimed.raw_message
        delivery = None if raw_delivery is None else Delivery.from_json(raw_delivery)
        if raw_message is None or delivery is None or delivery.status != "pending":
            # Finished meanwhile (or expired): nothing to send, only the claim to give back.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(DUE_KEY, member)
                pipe.zrem(LEASES_KEY, member)
                if is_endpoint(destination):
                    pipe.zrem(endpoint_leases_key(destination), member)
                    pipe.srem(endpoint_pending_key(destination), member)
                await pipe.execute()
            return
        message = Message.from_json(raw_message)
        with bind(msg_id=message.id, request_id=message.request_id, **_subject_of(message)):
            await self._attempt_message(claimed, destination, delivery, message)

    async def _attempt_message(
        self, claimed: _Claimed, destination: str, delivery: Delivery, message: Message
    ) -> None:
        endpoint = claimed.endpoint
        number = len(delivery.attempts) + 1
        started = now_ms()
        if destination == CALLBACK:
            url = next(d.url for d in message.destinations if d.name == CALLBACK)
            secrets = await self._account_secrets.get(message.account_id)
            refusal = None if secrets else "the account no longer exists"
        else:
            url = endpoint.url if endpoint else ""
            secrets = valid_secrets(endpoint.secrets, started) if endpoint else []
            refusal = _refusal(endpoint)
        if refusal is not None or not secrets:
            attempt = Attempt(number, iso(started), None, 0.0, "", refusal or "no valid signing secret")
            # Not an attempt on the receiver: the endpoint's health record is left alone.
            await self._record(message, delivery, attempt, "failed", None, None, None)
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
            url=url,
            resent=outcome.resent,
        )
        status: DeliveryStatus = "delivered" if outcome.succeeded else ("pending" if next_at else "failed")
        disable_reason = None if endpoint is None else self._disable_reason(endpoint, outcome, started)
        await self._record(message, delivery, attempt, status, next_at, endpoint, disable_reason)

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
            return f"every delivery failed for {_duration(self.policy.disable_after_seconds)}"
        return None

    async def _record(
        self,
        message: Message,
        delivery: Delivery,
        attempt: Attempt,
        status: DeliveryStatus,
        next_at: int | None,
        endpoint: Endpoint | None,
        disable_reason: str | None,
    ) -> None:
        """Append the attempt, re-score or finish the delivery, give back its leases and, when
        `endpoint` is given, record the receiver's health: all in one transaction (shared with the
        attempts that finish meanwhile; see `_commit`)."""
        log.info(
            "webhook attempt %d to %s: %s",
            attempt.number,
            delivery.destination,
            attempt.status_code or attempt.error,
            extra={
                "destination": delivery.destination,
                "attempt": attempt.number,
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "outcome": status,
                "error": attempt.error,
            },
        )
        announcement = None
        if (
            endpoint is not None
            and disable_reason is not None
            and await self.endpoints.disable(endpoint.id, disable_reason)
        ):
            announcement = await self._disabled_announcement(endpoint, disable_reason)

        counts = AttemptCounts()
        if self.on_attempt is not None:
            self.on_attempt(counts, message, delivery, attempt)

        def stage(pipe: Any) -> None:
            self.messages.stage_attempt(pipe, message.account_id, delivery, attempt, status, next_at, counts)
            # The failure record changes only when the run of failures starts or ends.
            if endpoint is not None and attempt.succeeded and endpoint.failing_since_ms is not None:
                EndpointStore.stage_success(pipe, endpoint.id)
            elif endpoint is not None and not attempt.succeeded and endpoint.failing_since_ms is None:
                EndpointStore.stage_failure(pipe, endpoint.id, now_ms())
            if announcement is not None:
                self.messages.stage_new(pipe, announcement)

        await self._commit(stage)
        if announcement is not None:
            self.nudge()

    async def _commit(self, stage: Callable[[Any], None]) -> None:
        """Run `stage`'s commands in a transaction. Attempts that finish while one commit is under way
        share the next: one round trip records many, which is most of a delivery's cost at volume."""
        done = asyncio.get_running_loop().create_future()
        self._uncommitted.append((stage, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_pending())
        await done

    async def _commit_pending(self) -> None:
        while self._uncommitted:
            batch, self._uncommitted = self._uncommitted, []
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for stage, _ in batch:
                        stage(pipe)
                    await pipe.execute()
            except Exception as exc:  # each waiting attempt sees it, as it would have alone
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

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
        return new_message(self.new_id("msg"), endpoint.account_id, "endpoint.disabled", data, others)


# How long an account's looked-up callback secrets are reused. Thousands of deliveries a second for the same
# few accounts would otherwise look them up each time; a rotated-out secret stays valid for hours.
_RECENT_SECONDS = 0.25


class _RecentSecrets:
    """Callback secrets per account, remembered for _RECENT_SECONDS."""

    def __init__(self, lookup: SecretsLookup) -> None:
        self.lookup = lookup
        self._remembered: dict[str, tuple[float, Sequence[str] | None]] = {}

    async def get(self, account_id: str) -> Sequence[str] | None:
        moment = time.monotonic()
        remembered = self._remembered.get(account_id)
        if remembered is not None and remembered[0] > moment:
            return remembered[1]
        secrets = await self.lookup(account_id)
        if len(self._remembered) > 10_000:
            self._remembered = {k: v for k, v in self._remembered.items() if v[0] > moment}
        self._remembered[account_id] = (moment + _RECENT_SECONDS, secrets)
        return secrets


def _subject_of(message: Message) -> dict[str, str]:
    """The image and batch an event is about, for the log lines of its deliveries."""
    prefixes = {"img": "image_id", "bat": "batch_id"}
    named = ((prefixes.get(resource.partition("_")[0]), resource) for resource in message.resource_ids)
    return {field: resource for field, resource in named if field is not None}


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} seconds"


def _refusal(endpoint: Endpoint | None) -> str | None:
    if endpoint is None:
        return "the endpoint was deleted"
    if endpoint.status == "disabled":
        return f"the endpoint is disabled ({endpoint.disabled_reason or 'by its owner'})"
    return None
