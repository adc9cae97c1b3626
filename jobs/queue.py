"""The arq queue, woken by Redis pub/sub so a job starts milliseconds after it is enqueued.

arq polls its queue (0.5 s by default). Producers here publish on a channel after each enqueue; the
worker's pool turns an empty poll into a wait for that signal, bounded by `idle_wait`, so an idle
worker neither spins nor sleeps through new work, and deferred retries still start on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Self

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("darkroom.queue")

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
    def connect(cls, redis_url: str, queue_name: str) -> Self:
        pool = cls(ConnectionPool.from_url(redis_url), default_queue_name=queue_name)
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


class WakeableArqRedis(QueuePool):
    """The worker's pool: arq's queue poll waits for a wake-up instead of returning empty."""

    def __init__(self, *args: Any, idle_wait: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_wait = idle_wait
        self._woken = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._startable_script = self.register_script(_STARTABLE_JOBS)

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
            except (RedisConnectionError, OSError) as exc:
                log.warning("wake-up channel lost (%s); polling until it is back", exc)
                self._woken.set()
                await asyncio.sleep(self.idle_wait)
