"""The arq queue, woken by Redis pub/sub so a job starts milliseconds after it is enqueued, and shared
fairly between accounts.

arq polls its queue (0.5 s by default). Producers here publish on a channel after each enqueue; the
worker's pool turns an empty poll into a wait for that signal, bounded by `idle_wait`, so an idle
worker neither spins nor sleeps through new work, and deferred retries still start on time.

Fair scheduling (start-time fair queueing on arq's sorted set). An image's job first waits in its
account's list (`{queue}:fair:waiting:{account}`); a worker's poll admits it into arq's queue while the
account has fewer than its plan's `max_processing` jobs admitted (`…:admitted:{account}`), scored by a
virtual-time start tag: where the account's previous job's tag ends (its tag plus 5040/share), or the
queue's clock if that is later. Tags are negative scores (from -2^52), so they sort before every
real-timed job and among themselves interleave the accounts in proportion to their shares; the clock
follows the tag of the job last picked, so an account that was idle starts level with the others (its
first image next in line), neither with credit saved up nor behind their backlogs. A poll picks due
real-timed jobs (retries, archives, sweeps) first, then tagged ones. The slot is given back when the job
ends for good (`release_slot`), so an account never holds more than `max_processing` images in the
queue or in processing; a job run again (a dead worker, a retry) keeps the slot it has.

Lanes. Order alone cannot keep a single photo from waiting behind a backlog: the workers' slots and
cores are busy with the backlog's images when it comes. So a job admitted while its account had
nothing else waiting or in processing is an express job, tagged below the others (from -2^53), and a
worker process runs two lanes (jobs/worker.py): the express lane takes only express jobs, so it has a
free slot when one comes, and the bulk lane, a child process at a lower CPU priority, takes the rest;
an express render then has the cores nearly to itself. The express lane marks itself present at each
poll; while it is not (not started, or every slot busy for a while), the bulk lane takes express jobs
too. A worker with lanes off (`Lane.ALL`) takes every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, Self, TypeVar, cast

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from jobs.plans import DEFAULT_TIER, TIERS
from jobs.records import ACCOUNT_KEY_PREFIX

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


class Lane(StrEnum):
    """Which of the queue's jobs a worker's poll takes (see the module's docstring)."""

    ALL = "all"
    EXPRESS = "express"
    BULK = "bulk"


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


def _fair_key(queue_name: str, name: str) -> str:
    return f"{queue_name}:fair:{name}"


def waiting_jobs_key(queue_name: str, account_id: str) -> str:
    """The account's jobs not admitted yet, oldest first (scored by when they were queued)."""
    return _fair_key(queue_name, f"waiting:{account_id}")


def admitted_jobs_key(queue_name: str, account_id: str) -> str:
    """The account's jobs admitted into arq's queue and not ended yet: its slots in use."""
    return _fair_key(queue_name, f"admitted:{account_id}")


def stage_image_job(pipe: Any, queue_name: str, image_id: str, account_id: str) -> None:
    """Queue an image's job inside the caller's transaction, so the job exists exactly when its image
    does: in its account's waiting list, for the next poll to admit. Only for an id no job has had (a
    new record's): unlike `enqueue`, nothing checks for an earlier job of that id. Plain commands, so
    that a Lua script can replay them (Store._commit_if_unchanged). arq's own job (as `enqueue_job`
    writes it) is kept aside until its admission, so that a long wait cannot expire it."""
    now = timestamp_ms()
    job_id = process_job_id(image_id)
    pipe.hset(_fair_key(queue_name, "jobs"), job_id, serialize_job(PROCESS_IMAGE, (image_id,), {}, None, now))
    pipe.zadd(waiting_jobs_key(queue_name, account_id), {job_id: now})
    pipe.sadd(_fair_key(queue_name, "ready"), account_id)
    pipe.publish(wake_channel(queue_name), b"1")


async def queued_jobs(redis: Redis, queue_name: str) -> int:
    """Jobs in the queue (due, deferred or running) or waiting for their admission into it."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(queue_name)
        pipe.hlen(_fair_key(queue_name, "jobs"))
        queued, waiting = await pipe.execute()
    return int(queued) + int(waiting)


# The job ended for good: its account's slot is free, and a poll may admit the account's next job.
# Idempotent: a job that ends twice (run again after its worker died) frees one slot.
_RELEASE_SLOT = """
local queue, job = KEYS[1], ARGV[1]
local owners = queue .. ':fair:owners'
local account = redis.call('HGET', owners, job)
if not account then return 0 end
redis.call('HDEL', owners, job)
redis.call('SREM', queue .. ':fair:admitted:' .. account, job)
if redis.call('ZCARD', queue .. ':fair:waiting:' .. account) > 0 then
  redis.call('SADD', queue .. ':fair:ready', account)
end
return 1
"""

# Scores are doubles: exact integers up to 2^53, so the tags (-2^52 + virtual time) stay exact. Lua's
# tostring would print them in exponent form, losing digits: numbers go back to Redis through '%.0f'.
# 5040 = 7!: the tag steps of shares 1 to 10 are whole numbers.
_ADMIT_AND_PICK = """
local queue, now, limit, running_prefix = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local job_prefix, job_ttl, account_prefix, wake = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local fair, default_max, default_share = ARGV[8] == '1', tonumber(ARGV[9]), tonumber(ARGV[10])
local reclaim_every_ms, offer_ms, lane, express_present_ms = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local BASE, UNIT = 4503599627370496, 5040
local fair_prefix = queue .. ':fair:'
local express_present = fair_prefix .. 'express-lane'
local ready, payloads, owners = fair_prefix .. 'ready', fair_prefix .. 'jobs', fair_prefix .. 'owners'
local tags, clock_key = fair_prefix .. 'tags', fair_prefix .. 'clock'
local clock = tonumber(redis.call('GET', clock_key) or '0')

local function plan_of(account)
  local raw = redis.call('GET', account_prefix .. account)
  local plan = raw and cjson.decode(raw).plan
  if type(plan) == 'table' then return plan.max_processing, plan.share end
  return default_max, default_share
end

-- A job that ended without giving its slot back (arq gave up on it: its time limit, a crash past
-- its tries) is no longer in arq's queue, where every admitted job stays until it ends.
if fair and redis.call('SET', fair_prefix .. 'reclaimed', '1', 'NX', 'PX', reclaim_every_ms) then
  local owned = redis.call('HGETALL', owners)
  for i = 1, #owned, 2 do
    local job, account = owned[i], owned[i + 1]
    if not redis.call('ZSCORE', queue, job) then
      redis.call('HDEL', owners, job)
      redis.call('SREM', fair_prefix .. 'admitted:' .. account, job)
      redis.call('SADD', ready, account)
    end
  end
end

local admitted = 0
for _, account in ipairs(redis.call('SMEMBERS', ready)) do
  local waiting, slots = fair_prefix .. 'waiting:' .. account, fair_prefix .. 'admitted:' .. account
  local max_processing, share = plan_of(account)
  local room = fair and max_processing - redis.call('SCARD', slots) or math.huge
  local step = math.max(1, math.floor(UNIT / share + 0.5))
  -- The account's next start tag: where its last admitted job ends, or the clock if that is later.
  local tag = math.max(tonumber(redis.call('HGET', tags, account) or '0'), clock)
  -- Express: nothing else of the account's waiting or in processing (tested for its first job only).
  local express = fair and redis.call('SCARD', slots) == 0
  while room > 0 do
    local oldest = redis.call('ZPOPMIN', waiting)
    if #oldest == 0 then break end
    local job, queued_at = oldest[1], oldest[2]
    local payload = redis.call('HGET', payloads, job)
    express = express and redis.call('ZCARD', waiting) == 0
    if payload then
      redis.call('HDEL', payloads, job)
      redis.call('PSETEX', job_prefix .. job, job_ttl, payload)
      if fair then
        local below = express and 2 * BASE or BASE
        redis.call('ZADD', queue, string.format('%.0f', tag - below), job)
        tag = tag + step
        redis.call('SADD', slots, job)
        redis.call('HSET', owners, job, account)
      else
        redis.call('ZADD', queue, queued_at, job)
      end
      admitted = admitted + 1
      room = room - 1
    end
  end
  if fair then redis.call('HSET', tags, account, string.format('%.0f', tag)) end
  -- Back in `ready` when one of its slots is given back (or it queues another job).
  redis.call('SREM', ready, account)
end

-- arq keeps a running job in its queue until it ends, so its poll returns the running jobs too and a
-- busy worker would never wait. Only jobs due and not running: real-timed ones first, then tagged.
-- Nor those just handed to another worker's poll, not claimed yet: workers polling together each get
-- one of their own instead of all the same (the claim's WATCH would leave all but one with nothing).
local startable, picked_tag = {}, nil
local function collect(low, high)
  local offset = 0
  while #startable < limit do
    local due = redis.call('ZRANGEBYSCORE', queue, low, high, 'WITHSCORES', 'LIMIT', offset, 100)
    if #due == 0 then return end
    for i = 1, #due, 2 do
      local offered = queue .. ':offered:' .. due[i]
      if redis.call('EXISTS', running_prefix .. due[i], offered) == 0 then
        redis.call('SET', offered, '1', 'PX', offer_ms)
        startable[#startable + 1] = due[i]
        local score = tonumber(due[i + 1])
        if score < 0 then
          local tag = score < -BASE and score + 2 * BASE or score + BASE
          picked_tag = math.max(picked_tag or tag, tag)
        end
        if #startable >= limit then return end
      end
    end
    offset = offset + #due / 2
  end
end
local express_jobs, bulk_jobs = '(' .. string.format('%.0f', -BASE), string.format('%.0f', -BASE)
if lane == 'express' then
  redis.call('SET', express_present, '1', 'PX', express_present_ms)
  collect('-inf', express_jobs)
elseif lane == 'bulk' then
  collect('0', now)
  if redis.call('EXISTS', express_present) == 0 then collect('-inf', express_jobs) end
  collect(bulk_jobs, '(0')
else
  collect('0', now)
  collect('-inf', '(0')
end
if picked_tag and picked_tag > clock then
  redis.call('SET', clock_key, string.format('%.0f', picked_tag))
end
if admitted > #startable then redis.call('PUBLISH', wake, '1') end
local next_due = redis.call('ZRANGEBYSCORE', queue, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {startable, next_due[2] or false}
"""
# How often a poll looks for slots held by jobs that ended without giving them back.
RECLAIM_EVERY_MS = 60_000
# Jobs a poll hands arq. arq works through the whole list, waiting for a free slot before each, so a
# longer list would be started in the order of its poll however the queue changed meanwhile (a new
# account's image would wait behind it): one, and arq polls again as soon as a slot is free.
JOBS_PER_POLL = 1
# How long a job handed to a poll is kept from the others' polls: ample for arq to claim it (one round
# trip); should the worker not, the job is handed out again after that.
OFFER_MS = 200
# How long an express lane counts as present after its last poll: a few of its idle waits. Its polls
# stop while every slot of it is busy; after this the bulk lane takes express jobs too.
EXPRESS_PRESENT_MS = 2_000


class _HiredisPacking:
    """Commands packed by hiredis, in C, as redis-py's synchronous client packs them when hiredis is
    installed; its asyncio client packs them in Python, which costs about 1 us an argument, and a script
    applying an image's staged writes takes some 40 (a direct upload's create pays that on its one
    round trip)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


class QueuePool(ArqRedis):
    """arq's pool, for producers and for a worker that polls: its poll of the queue admits waiting
    jobs, fairly between accounts (or, with `fair` off, all of them, in the order they came)."""

    def __init__(self, *args: Any, fair: bool = True, lane: Lane = Lane.ALL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fair = fair
        self.lane = lane
        self._admit_and_pick_script = self.register_script(_ADMIT_AND_PICK)
        self._release_slot_script = self.register_script(_RELEASE_SLOT)

    async def close(self, close_connection_pool: bool | None = None) -> None:
        """arq's Worker.close still calls redis-py's deprecated `close`."""
        await self.aclose(close_connection_pool)

    @classmethod
    def connect(
        cls,
        redis_url: str,
        queue_name: str,
        *,
        command_timeout: float | None = None,
        fair: bool = True,
        lane: Lane = Lane.ALL,
    ) -> Self:
        """`command_timeout` bounds connecting and each reply (None: wait as long as Redis takes)."""
        connections = ConnectionPool.from_url(
            redis_url, socket_timeout=command_timeout, socket_connect_timeout=command_timeout
        )
        # Whichever connection the URL's scheme chose (TCP, TLS, a unix socket), packing in C.
        connections.connection_class = cast(
            type[AbstractConnection],
            type(
                f"Hiredis{connections.connection_class.__name__}",
                (_HiredisPacking, connections.connection_class),
                {},
            ),
        )
        pool = cls(connections, default_queue_name=queue_name, fair=fair, lane=lane)
        pool.auto_close_connection_pool = True  # this client owns its connections: aclose() ends them
        return pool

    async def zrangebyscore(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        """arq's poll of the queue: admits waiting jobs, then the jobs to start."""
        if name != self.default_queue_name:
            return await super().zrangebyscore(name, *args, **kwargs)
        startable, _ = await self._startable(name)
        return startable

    async def zcard(self, name: Any) -> Any:
        """arq's count of the queue (a burst worker stops at 0; /metrics): waiting jobs included."""
        if name != self.default_queue_name:
            return await super().zcard(name)
        return await queued_jobs(self, name)

    async def release_slot(self, job_id: str) -> None:
        """The job ended for good (not to run again): its account may have its next job admitted."""
        await self._release_slot_script(keys=[self.default_queue_name], args=[job_id])

    async def _startable(self, queue_name: str) -> tuple[list[bytes], float | None]:
        """Admits waiting jobs; then due jobs not running yet, and the score of the next deferred one
        (one round trip)."""
        default_plan = TIERS[DEFAULT_TIER]
        startable, next_due = await self._admit_and_pick_script(
            keys=[queue_name],
            args=[
                timestamp_ms(),
                JOBS_PER_POLL,
                in_progress_key_prefix,
                job_key_prefix,
                expires_extra_ms,
                ACCOUNT_KEY_PREFIX,
                wake_channel(queue_name),
                int(self.fair),
                default_plan.max_processing,
                default_plan.share,
                RECLAIM_EVERY_MS,
                OFFER_MS,
                self.lane.value,
                EXPRESS_PRESENT_MS,
            ],
        )
        return list(startable), float(next_due) if next_due else None


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
        self._woken.clear()
        startable, next_due = await self._startable(name)
        if startable:
            return startable
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), self._wait_for(next_due))
        startable, _ = await self._startable(name)
        return startable

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
