"""The delivery loop: every worker process sends due webhook messages, apart from image jobs.

Messages waiting for an attempt sit in one Redis sorted set scored by when they are due. A dispatcher
claims due messages with a lease (their score moves to now + lease) and attempts them concurrently; an
attempt ends by removing the message (delivered, or the schedule is spent) or by re-scoring it for its
next retry. A worker killed mid-attempt loses nothing: the lease runs out and any worker claims the
message again, under the same `webhook-id` (at least once).

Deliveries never wait behind image processing: they are not arq jobs and have their own concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError

from webhooks.delivery import post_signed, retry_delay
from webhooks.messages import DUE_KEY, Attempt, Message, MessageStatus, MessageStore, now_ms
from webhooks.transport import DeliveryClient

log = logging.getLogger("darkroom.webhooks")

SecretsLookup = Callable[[str], Awaitable[Sequence[str] | None]]
# Extra commands for the transaction that records an attempt (e.g. counters), given the pipeline.
AttemptHook = Callable[[object, Attempt], None]

_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {due, next_due[2] or false}
"""


def _iso(epoch_ms: int) -> str:
    return (
        datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Dispatcher:
    def __init__(
        self,
        redis: Redis,
        http: DeliveryClient,
        secrets_for: SecretsLookup,
        retry_schedule: Sequence[float],
        *,
        lease_seconds: float,
        concurrency: int = 50,
        idle_wait: float = 1.0,
        on_attempt: AttemptHook | None = None,
    ) -> None:
        self.redis = redis
        self.http = http
        self.messages = MessageStore(redis)
        self.secrets_for = secrets_for
        self.retry_schedule = tuple(retry_schedule)
        self.lease_ms = int(lease_seconds * 1000)
        self.concurrency = concurrency
        self.idle_wait = idle_wait
        self.on_attempt = on_attempt
        self._claim = redis.register_script(_CLAIM)
        self._woken = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def nudge(self) -> None:
        """A message became due: look now rather than at the next poll."""
        self._woken.set()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="darkroom-webhook-dispatcher")

    async def stop(self) -> None:
        """Stop claiming; let attempts under way finish (their leases would otherwise hold them back)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=self.lease_ms / 1000)

    async def run_until_idle(self) -> None:
        """Deliver until no message is waiting, retries included (for burst runs and tests)."""
        while True:
            next_due = await self._claim_and_send()
            if self._in_flight:
                await asyncio.wait(self._in_flight)
                continue
            if next_due is None:
                return
            await asyncio.sleep(max(0.0, (next_due - now_ms()) / 1000))

    async def _run(self) -> None:
        while True:
            try:
                self._woken.clear()
                next_due = await self._claim_and_send()
            except (RedisError, OSError) as exc:
                log.warning("webhook dispatcher cannot reach Redis (%s); retrying", exc)
                next_due = None
            except Exception:
                # The loop must outlive any one bad turn, or this worker stops sending webhooks.
                log.exception("webhook dispatcher turn failed; retrying")
                next_due = None
            wait = self.idle_wait if next_due is None else (next_due - now_ms()) / 1000
            if len(self._in_flight) >= self.concurrency:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            elif wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), min(wait, self.idle_wait))

    async def _claim_and_send(self) -> float | None:
        """Start attempts for the due messages there is room for; return when the next one is due."""
        room = self.concurrency - len(self._in_flight)
        if room <= 0:
            return None
        now = now_ms()
        claimed, next_due = await self._claim(keys=[DUE_KEY], args=[now, room, now + self.lease_ms])
        for raw_id in claimed:
            task = asyncio.create_task(self._attempt(raw_id.decode()))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return float(next_due) if next_due is not None else None

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())

    async def _attempt(self, msg_id: str) -> None:
        message = await self.messages.get(msg_id)
        if message is None or message.status != "pending":
            await self.redis.zrem(DUE_KEY, msg_id)
            return
        number = len(message.attempts) + 1
        started = now_ms()
        secrets = await self.secrets_for(message.account_id)
        if not secrets:
            attempt = Attempt(number, _iso(started), None, 0.0, "", "the account no longer exists")
            await self._record(message.with_attempt(attempt, "failed"), attempt, None)
            return
        outcome = await post_signed(self.http, message.url, message.id, message.body.encode(), secrets)
        delay = None if outcome.succeeded else retry_delay(self.retry_schedule, number)
        next_at = None if delay is None else now_ms() + int(delay * 1000)
        attempt = Attempt(
            number=number,
            at=_iso(started),
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            response_excerpt=outcome.response_excerpt,
            error=outcome.error,
            next_attempt_at=None if next_at is None else _iso(next_at),
        )
        status: MessageStatus = "delivered" if outcome.succeeded else ("pending" if next_at else "failed")
        await self._record(message.with_attempt(attempt, status), attempt, next_at)

    async def _record(self, message: Message, attempt: Attempt, next_at: int | None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self.messages.stage_save(pipe, message)
            if next_at is None:
                pipe.zrem(DUE_KEY, message.id)
            else:
                pipe.zadd(DUE_KEY, {message.id: next_at})
            if self.on_attempt is not None:
                self.on_attempt(pipe, attempt)
            await pipe.execute()
