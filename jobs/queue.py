"""The arq queue, woken by Redis pub/sub so a job starts milliseconds after it is enqueued.

arq polls its queue (0.5 s by default). Producers here publish on a channel after each enqueue; the
worker's pool turns an empty poll into a wait for that signal, bounded by `idle_wait`, so an idle
worker neither spins nor sleeps through new work, and deferred retries still start on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import ConnectionPool
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

log = logging.getLogger("darkroom.queue")

T = TypeVar("T")

# Waits between tries while Redis is unreachable: doubling from the first, at most the cap, each one
# between half and all of that (jitter), so a fleet of workers does not reconnect in step.
OUTAGE_FIRST_WAIT_SECONDS = 0.05
OUTAGE_WAIT_CAP_SECONDS = 2.0
# Also what a server replaying its AOF answers (BusyLoadingError is a ConnectionError).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError)
# Set inside each watched transaction of the worker's pool, so that its outcome can be read back when
# the connection dies under EXEC (see OutageRidingPipeline).
APPLIED_MARKER_PREFIX = "dr:applied:"
APPLIED_MARKER_TTL_MS = 600_000

PROCESS_IMAGE = "process_image"


def wake_channel(queue_name: str) -> str:
    return f"{queue_name}:wake"


async def enqueue(
    redis: ArqRedis, queue_name: str, function: str, *args: Any, job_id: str, defer_by: float | None = None
) -> None:
    """Enqueue once per `job_id` (arq ignores a duplicate while the job or its result exists)."""
    await redis.enqueue_job(function, *args, _job_id=job_id, _queue_name=queue_name, _defer_by=defer_by)
    if not defer_by:
        await redis.publish(wake_channel(queue_name), b"1")


def process_job_id(image_id: str) -> str:
    return f"process:{image_id}"


def stage_new_job(pipe: Any, queue_name: str, function: str, *args: Any, job_id: str) -> None:
    """Queue a job, due now, inside the caller's transaction, so the job exists exactly when what it
    works on does. Only for an id no job has had (a new record's): unlike `enqueue`, nothing checks for
    an earlier job of that id. The job is arq's own, as `enqueue_job` writes it."""
    now = timestamp_ms()
    pipe.psetex(job_key_prefix + job_id, expires_extra_ms, serialize_job(function, args, {}, None, now))
    pipe.zadd(queue_name, {job_id: now})
    pipe.publish(wake_channel(queue_name), b"1")


class QueuePool(ArqRedis):
    """arq's pool, for producers and for a worker that polls."""

    async def close(self, close_connection_pool: bool | None = None) -> None:
        """arq's Worker.close still calls redis-py's deprecated `close`."""
        await self.aclose(close_connection_pool)

    @classmethod
    def connect(cls, redis_url: str, queue_name: str, *, command_timeout: float | None = None) -> Self:
        """`command_timeout` bounds connecting and each reply (None: wait as long as Redis takes)."""
        connections = ConnectionPool.from_url(
            redis_url, socket_timeout=command_timeout, socket_connect_timeout=command_timeout
        )
        pool = cls(connections, default_queue_name=queue_name)
        pool.auto_close_connection_pool = True  # this client owns its connections: aclose() ends them
        return pool


# arq keeps a running job in its queue until it ends, so its poll returns the running jobs too and a
# busy worker would never wait. This returns only jobs that are due and not running, and when there are
# none, when the next deferred job is due.
_STARTABLE_JOBS = """
local queue, now, limit, running_prefix = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local startable, offset = {}, 0
while #startable < limit do
  local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', offset, 100)
  if #due == 0 then break end
  for _, id in ipairs(due) do
    if redis.call('EXISTS', running_prefix .. id) == 0 then
      startable[#startable + 1] = id
      if #startable >= limit then break end
    end
  end
  offset = offset + #due
end
local next_due = redis.call('ZRANGEBYSCORE', queue, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {startable, next_due[2] or false}
"""


def outage_wait(failures: int) -> float:
    """How long to wait after the `failures`-th failed try in a row (capped exponential, equal jitter)."""
    ceiling = min(OUTAGE_WAIT_CAP_SECONDS, OUTAGE_FIRST_WAIT_SECONDS * 2 ** (failures - 1))
    return random.uniform(ceiling / 2, ceiling)


class RedisOutage:
    """Whether Redis is reachable, as every command of one process sees it: one log line when it is
    lost and one when it is back, however many commands wait meanwhile."""

    def __init__(self) -> None:
        self.lost_at: float | None = None

    @property
    def under_way(self) -> bool:
        return self.lost_at is not None

    def lost(self, error: Exception) -> None:
        if self.lost_at is None:
            self.lost_at = time.monotonic()
            log.error("Redis is unreachable (%s); waiting for it, work resumes when it is back", error)

    def back(self) -> None:
        if self.lost_at is not None:
            log.warning("Redis is reachable again after %.1f s; carrying on", time.monotonic() - self.lost_at)
            self.lost_at = None

    async def ride(self, attempt: Callable[[], Awaitable[T]], riding: Callable[[], bool]) -> T:
        """`attempt()` until Redis answers it, waiting between tries while `riding()` holds."""
        failures = 0
        while True:
            try:
                result = await attempt()
            except _UNREACHABLE as error:
                if not riding():
                    raise
                failures += 1
                self.lost(error)
                await asyncio.sleep(outage_wait(failures))
            else:
                if failures:
                    self.back()
                return result


class OutageRidingPipeline(Pipeline):
    """A pipeline of the worker's pool: Redis going away makes it wait, not fail.

    A transaction is sent again once Redis is back. A WATCH cannot survive its connection: after an
    outage the keys are watched again (so the reads that follow still answer), but the transaction fails
    with WatchError, as if they had changed, and the caller reads again as it would then; one cut off
    under EXEC is reported as Redis left it (see _execute_watched)."""

    def __init__(self, pool: WakeableArqRedis, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = pool
        self._watched: list[Any] = []
        self._watch_lost = False

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] == "WATCH":
            self._watched.extend(args[1:])
        watched = list(self._watched)  # redis-py resets the pipeline when its connection dies
        immediate = super().immediate_execute_command

        async def attempt() -> Any:
            if self._watch_lost and not self.watching:
                # Watched again, so that the reads until MULTI are still answered at once.
                await immediate("WATCH", *watched)  # type: ignore[no-untyped-call]
            try:
                return await immediate(*args, **options)  # type: ignore[no-untyped-call]
            except WatchError as lost:  # redis-py's word for a connection that died under a WATCH
                self._watched, self._watch_lost = watched, True
                raise RedisConnectionError(str(lost)) from lost

        return await self._pool.outage.ride(attempt, self._pool.riding)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self._watch_lost:
            await self.reset()
            raise WatchError("Redis went away while keys were watched; they may have changed")
        if self.watching and self.explicit_transaction:
            return await self._execute_watched(raise_on_error)
        stack, scripts, explicit = list(self.command_stack), set(self.scripts), self.explicit_transaction
        send = super().execute

        async def attempt() -> list[Any]:
            # A failed execute resets the pipeline: each try sends the same commands.
            self.command_stack, self.scripts, self.explicit_transaction = list(stack), set(scripts), explicit
            result: list[Any] = await send(raise_on_error)
            return result

        return await self._pool.outage.ride(attempt, self._pool.riding)

    async def _execute_watched(self, raise_on_error: bool) -> list[Any]:
        """An optimistic transaction is sent once. Its connection dying after EXEC went out leaves open
        whether Redis applied it (e.g. arq's claim of a job: taken as not applied, the job would stay
        locked by nobody), so it also sets a marker, which answers that once Redis is back."""
        marker = f"{APPLIED_MARKER_PREFIX}{secrets.token_hex(8)}"
        self.set(marker, b"1", px=APPLIED_MARKER_TTL_MS)
        replies = len(self.command_stack) - 1
        try:
            results: list[Any] = await super().execute(raise_on_error)
        except WatchError as refused:
            if not isinstance(refused.__context__, _UNREACHABLE):
                raise  # a watched key changed: the caller reads again
            if not await self._pool.exists(marker):
                raise
            # Applied before Redis went away; its replies are lost (callers of a watched transaction
            # here and in arq read none of them).
            return [None] * replies
        return results[:-1]

    async def reset(self) -> None:
        await super().reset()  # type: ignore[no-untyped-call]
        self._watched = []
        self._watch_lost = False


class WakeableArqRedis(QueuePool):
    """The worker's pool: arq's queue poll waits for a wake-up instead of returning empty, and every
    command waits out a Redis outage (arq's own loop, the job cores, the webhook dispatcher), so the
    worker carries on once Redis is back instead of exiting."""

    def __init__(self, *args: Any, idle_wait: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_wait = idle_wait
        self.outage = RedisOutage()
        self._ride_while: asyncio.Task[Any] | None = None
        self._woken = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._startable_script = self.register_script(_STARTABLE_JOBS)

    def ride_outages_while(self, task: asyncio.Task[Any]) -> None:
        """Wait out outages only while `task` (the worker's main loop) runs: once arq is shutting down,
        a command fails at once rather than holding the exit until Redis is back."""
        self._ride_while = task

    def riding(self) -> bool:
        return self._ride_while is None or not self._ride_while.done()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        send = super().execute_command
        return await self.outage.ride(lambda: send(*args, **options), self.riding)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> OutageRidingPipeline:
        return OutageRidingPipeline(
            self, self.connection_pool, self.response_callbacks, transaction, shard_hint
        )

    def start_listening(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="darkroom-queue-wake")

    async def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def zrangebyscore(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        if self._listener is None or name != self.default_queue_name:
            return await super().zrangebyscore(name, *args, **kwargs)
        limit = int(kwargs.get("num") or 100)
        self._woken.clear()
        startable, next_due = await self._startable(name, limit)
        if startable:
            return startable
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), self._wait_for(next_due))
        startable, _ = await self._startable(name, limit)
        return startable

    async def _startable(self, queue_name: str, limit: int) -> tuple[list[bytes], float | None]:
        """Due jobs not running yet, and the score of the next deferred one (one round trip)."""
        startable, next_due = await self._startable_script(
            keys=[queue_name], args=[timestamp_ms(), limit, in_progress_key_prefix]
        )
        return list(startable), float(next_due) if next_due else None

    def _wait_for(self, next_due: float | None) -> float:
        """Until the next deferred job is due (a retry starts on time), at most `idle_wait`."""
        if next_due is None:
            return self.idle_wait
        return min(self.idle_wait, max(0.0, (next_due - timestamp_ms()) / 1000))

    async def _listen(self) -> None:
        channel = wake_channel(self.default_queue_name)
        while True:
            try:
                async with self.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._woken.set()
            except (RedisConnectionError, OSError):
                self._woken.set()
                # Waits out an outage (logging it once for the whole process), then subscribes again.
                with contextlib.suppress(RedisConnectionError, OSError):
                    await self.ping()
                await asyncio.sleep(self.idle_wait)
