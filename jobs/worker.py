"""arq worker entry point: `arq jobs.worker.WorkerSettings` (the Procfile's `worker` process).

Task functions are thin: each unpacks arq's ctx and calls a core that tests can drive directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.cron import cron
from arq.worker import Retry, func
from redis.exceptions import RedisError

from jobs import archive, processing, retention, stats
from jobs.batches import BUILD_ARCHIVE, SWEEP_ARCHIVES
from jobs.bulk_lane import BulkLane, bulk_lane_command, end_with_the_worker, lower_priority
from jobs.deps import CLEAN_STOPS_FORGIVEN, WorkerDeps
from jobs.fetch import SourceFetcher
from jobs.ids import new_id
from jobs.logs import log_config
from jobs.pipeline import configure_libvips
from jobs.queue import PROCESS_IMAGE, Lane, QueuePool, WakeableArqRedis
from jobs.settings import Settings
from jobs.storage import StorageUnavailable, WaitForStorage, most_storage_waits, open_storage
from jobs.store import Store
from jobs.uploads import SWEEP_UPLOADS, UploadDesk
from webhooks.dispatcher import Dispatcher, RetryPolicy, lease_seconds_for
from webhooks.log_context import bind
from webhooks.messages import RESPONSE_EXCERPT_BYTES
from webhooks.transport import DeliveryClient

log = logging.getLogger("darkroom.worker")

# How often a worker with every job slot taken looks for a freed one. (A worker with a free slot and
# nothing startable waits on the queue's wake-up instead: jobs/queue.py.)
BUSY_POLL_SECONDS = 0.005
REDIS_RETRY_SECONDS = 2
# Jobs per render slot with S3 storage (see jobs_at_once).
S3_JOBS_PER_RENDER = 2
# Webhook attempts in flight per worker process for receivers that answer promptly (slow and new ones
# have lanes of their own: webhooks.lanes), and connections to one origin.
WEBHOOK_CONCURRENCY = 50
WEBHOOK_CONNECTIONS_PER_ORIGIN = 10
# When the sweeps run (minutes of the hour): expired archives, images and batches go within 5 minutes.
SWEEP_MINUTES = frozenset(range(0, 60, 5))
# A sweep's time limit, under the interval so runs never overlap. Without one arq would count its
# default 300 s, and lock every job at least that long.
SWEEP_TIMEOUT_SECONDS = 240
UPLOAD_SWEEP_TIMEOUT_SECONDS = 50
# arq's time limit on a task beyond the core's own deadline, so the core records its timeout first.
TASK_TIMEOUT_GRACE_SECONDS = 30
# How much longer than its task's time limit arq holds a job's lock (arq's own margin).
LOCK_MARGIN_SECONDS = 10
# The `arq` command's options that log as the settings say (otherwise arq sets up its own lines only).
WORKER_LOG_ARGS = ("--custom-log-dict", "jobs.worker.LOG_CONFIG")
# How long a worker without DARKROOM_PUBLIC_URL, started beside the web, waits for the web's address.
PUBLIC_URL_POLL_SECONDS = 0.2
PUBLIC_URL_POLLS = 150  # 30 s


def image_task_timeout(settings: Settings) -> float:
    return settings.job_timeout + TASK_TIMEOUT_GRACE_SECONDS


def archive_task_timeout(settings: Settings) -> float:
    return settings.archive_timeout + TASK_TIMEOUT_GRACE_SECONDS


async def hold_lock_for(ctx: dict[str, Any], task_timeout: float) -> None:
    """arq locks every job for its longest task's time limit (an archive build's hour, or a sweep's),
    and a job whose worker died runs again only once its lock expires: each task sets its own lock, as
    arq would with that task alone."""
    deps: WorkerDeps = ctx["deps"]
    lock_ms = int((task_timeout + LOCK_MARGIN_SECONDS) * 1000)
    await deps.redis.pexpire(in_progress_key_prefix + ctx["job_id"], lock_ms)


@contextlib.asynccontextmanager
async def run_again_when_transient(deps: WorkerDeps, subject_id: str) -> AsyncIterator[None]:
    """A job that raises is failed for good by arq, which would leave its image `processing` (or its
    archive `building`); Redis failing is worth another try instead (the cores are safe to re-run). So
    is arq's time limit running out while the job waits for Redis to come back: the limit is for the
    work, and the job's own deadline could not record a timeout without Redis either. A full storage
    is waited out the same way, at the delay the core chose."""
    try:
        yield
    except RedisError as exc:
        raise Retry(defer=REDIS_RETRY_SECONDS) from exc
    except WaitForStorage as wait:
        raise Retry(defer=wait.delay) from wait
    except StorageUnavailable as exc:
        # Only where a core had nothing to put back (tidying up after a job): retried like Redis failing.
        raise Retry(defer=REDIS_RETRY_SECONDS) from exc
    except asyncio.CancelledError:
        if isinstance(deps.redis, WakeableArqRedis) and deps.redis.outage.under_way:
            raise Retry(defer=REDIS_RETRY_SECONDS) from None
        # Stopped, not crashed: a worker shutting down (a deploy, Ctrl-C) cancels its jobs, and arq
        # runs them again; three deploys must not fail an image as `worker_crashed`.
        await deps.note_clean_stop(subject_id)
        raise


async def process_image(ctx: dict[str, Any], image_id: str) -> None:
    deps: WorkerDeps = ctx["deps"]
    lane = deps.redis.lane
    with bind(lane=None if lane is Lane.ALL else lane.value):
        async with run_again_when_transient(deps, image_id):
            await hold_lock_for(ctx, image_task_timeout(deps.settings))
            await processing.process_image(deps, image_id, ctx["job_try"])
            # Ended for good (a run to come raised above instead): the account's next image may start.
            await deps.redis.release_slot(ctx["job_id"])


async def build_archive(ctx: dict[str, Any], batch_id: str) -> None:
    async with run_again_when_transient(ctx["deps"], batch_id):
        await hold_lock_for(ctx, archive_task_timeout(ctx["deps"].settings))
        await archive.build_archive(ctx["deps"], batch_id, ctx["job_try"])


def job_tries(settings: Settings) -> int:
    """arq's limit on a job's runs: our cores give up after settings.max_attempts starts that crashed
    the worker and record why, and runs that waited for storage or were stopped by a shutdown (up to
    CLEAN_STOPS_FORGIVEN) do not count; arq must not stop first."""
    return (
        settings.max_attempts + 1 + most_storage_waits(settings.storage_full_give_up) + CLEAN_STOPS_FORGIVEN
    )


async def sweep_archives(ctx: dict[str, Any]) -> None:
    await archive.sweep_archives(ctx["deps"])


async def sweep_expired(ctx: dict[str, Any]) -> None:
    await retention.sweep_expired(ctx["deps"])


async def sweep_uploads(ctx: dict[str, Any]) -> None:
    deps: WorkerDeps = ctx["deps"]
    await UploadDesk(deps.settings, deps.redis, deps.store, deps.storage).sweep()


async def build_deps(settings: Settings, redis: QueuePool) -> WorkerDeps:
    """Everything the task cores use, made once per worker process (tests build it the same way)."""
    configure_libvips()
    storage = await open_storage(settings)
    http = DeliveryClient(
        connect_timeout=settings.webhook_connect_timeout,
        total_timeout=settings.webhook_timeout,
        max_response_bytes=RESPONSE_EXCERPT_BYTES,
        max_connections_per_origin=WEBHOOK_CONNECTIONS_PER_ORIGIN,
        allow_private=settings.allow_private_callbacks,
    )
    store = Store(redis, message_retention=settings.webhook_retention)
    policy = RetryPolicy(
        settings.retry_schedule,
        jitter=settings.retry_jitter,
        slow_down_seconds=settings.webhook_slow_down_seconds,
        disable_after_seconds=settings.endpoint_disable_after,
    )
    dispatcher = Dispatcher(
        redis,
        http,
        store.webhook_secrets,
        policy,
        new_id=new_id,
        messages=store.messages,
        lease_seconds=lease_seconds_for(settings.webhook_timeout),
        concurrency=WEBHOOK_CONCURRENCY,
        on_attempt=stats.count_attempt,
    )
    return WorkerDeps(
        settings,
        redis,
        store,
        storage,
        http,
        dispatcher,
        SourceFetcher(settings),
        asyncio.Semaphore(settings.worker_concurrency),
    )


async def close_deps(deps: WorkerDeps) -> None:
    await deps.dispatcher.stop()
    await deps.http.aclose()
    await deps.storage.close()
    await deps.sources.aclose()


async def links_from_the_web(settings: Settings, store: Store) -> Settings:
    """A worker serves no HTTP: without DARKROOM_PUBLIC_URL, the links it puts in webhooks use the base a
    web process announced (its own DARKROOM_PUBLIC_URL, or localhost and its PORT), not the worker's own
    PORT. Started beside the web, it waits for that a little; then it falls back to its own default."""
    if settings.public_url_configured:
        return settings
    for _ in range(PUBLIC_URL_POLLS):
        if (announced := await store.announced_public_url()) is not None:
            break
        await asyncio.sleep(PUBLIC_URL_POLL_SECONDS)
    else:
        log.warning(
            "DARKROOM_PUBLIC_URL is not set and no web process has announced its address: links in "
            "webhooks use %s; set DARKROOM_PUBLIC_URL",
            settings.public_url,
        )
        return settings
    log.info("DARKROOM_PUBLIC_URL is not set: links in webhooks use %s, as the web announced", announced)
    return replace(settings, public_url=announced)


async def startup(ctx: dict[str, Any]) -> None:
    settings = await links_from_the_web(ctx["settings"], Store(ctx["redis"]))
    deps = await build_deps(settings, ctx["redis"])
    await deps.storage.take_handoffs()
    lane = deps.redis.lane
    if lane is not Lane.BULK:
        # The express lane's dispatcher sends the bulk lane's webhooks too (each image's is announced
        # on Redis): at the bulk lane's priority, a single photo's webhook could wait behind a backlog.
        deps.dispatcher.start()
    if isinstance(deps.redis, WakeableArqRedis):
        deps.redis.start_listening()
        # on_startup runs in arq's main loop: outages are waited out while it polls.
        main_loop = asyncio.current_task()
        if main_loop is not None:
            deps.redis.ride_outages_while(main_loop)
    ctx["deps"] = deps
    if lane is Lane.EXPRESS:
        ctx["bulk_lane"] = BulkLane(bulk_lane_command(WORKER_LOG_ARGS))
        ctx["bulk_lane"].start()


async def shutdown(ctx: dict[str, Any]) -> None:
    bulk_lane: BulkLane | None = ctx.get("bulk_lane")
    if bulk_lane is not None:
        await bulk_lane.stop()
    # Stopped before arq reached Redis at start (it was down), the worker has no pool in ctx yet.
    if isinstance(ctx.get("redis"), WakeableArqRedis):
        await ctx["redis"].stop_listening()
    deps: WorkerDeps | None = ctx.get("deps")
    if deps is not None:
        await close_deps(deps)


def jobs_at_once(settings: Settings) -> int:
    """The jobs arq runs at once: as many as renders (DARKROOM_WORKER_CONCURRENCY), twice as many with
    S3 storage, where a job waits on the bucket before its render (the original) and after it (the
    result): the other jobs' renders keep the CPUs busy meanwhile, while `render_slots` holds the
    renders, and so the memory they take, to the setting (benchmarks/storage.py, the S3 service alone
    on one core: 0.88 of it busy with 4 jobs, 0.98 with 8)."""
    return settings.worker_concurrency * (S3_JOBS_PER_RENDER if settings.uses_s3 else 1)


def worker_settings(settings: Settings, lane: Lane = Lane.ALL) -> dict[str, Any]:
    """arq Worker keyword arguments for these settings (arq accepts a dict as WorkerSettings): a worker
    taking the queue's jobs of `lane`; the express lane starts the bulk lane beside it."""
    pool = WakeableArqRedis.connect(
        settings.require_redis(), settings.queue_name, fair=settings.fair_scheduling, lane=lane
    )
    return {
        "functions": [
            func(process_image, name=PROCESS_IMAGE, timeout=image_task_timeout(settings)),
            func(build_archive, name=BUILD_ARCHIVE, timeout=archive_task_timeout(settings)),
        ],
        "cron_jobs": [
            *(
                cron(task, name=name, minute=set(SWEEP_MINUTES), second=0, timeout=SWEEP_TIMEOUT_SECONDS)
                for task, name in ((sweep_archives, SWEEP_ARCHIVES), (sweep_expired, retention.SWEEP_EXPIRED))
            ),
            # Every minute: a batch waiting on an upload never sent completes soon after its URL expires.
            cron(sweep_uploads, name=SWEEP_UPLOADS, second=0, timeout=UPLOAD_SWEEP_TIMEOUT_SECONDS),
        ],
        "queue_name": settings.queue_name,
        "redis_pool": pool,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        "max_jobs": jobs_at_once(settings),
        "poll_delay": BUSY_POLL_SECONDS,
        "max_tries": job_tries(settings),
        "keep_result": 3600,
    }


def _use_uvloop() -> None:
    """The `arq` command's worker runs on the loop current when it is built: make that uvloop, as
    uvicorn does for the web process (a faster loop for the Redis and HTTP traffic around each image)."""
    try:
        import uvloop
    except ImportError:  # uvloop does not build everywhere (e.g. Windows); asyncio's loop works too
        return
    asyncio.set_event_loop(uvloop.new_event_loop())


def __getattr__(name: str) -> Any:
    # Built on first access, so importing this module reads no environment.
    if name == "WorkerSettings":
        _use_uvloop()
        settings = Settings.from_env()
        lanes = settings.express_lane and settings.fair_scheduling
        return worker_settings(settings, Lane.EXPRESS if lanes else Lane.ALL)
    if name == "BulkWorkerSettings":
        settings = Settings.from_env()
        end_with_the_worker()
        lower_priority(settings.bulk_nice)
        _use_uvloop()
        return worker_settings(settings, Lane.BULK)
    if name == "LOG_CONFIG":
        return log_config(Settings.from_env())
    raise AttributeError(name)
