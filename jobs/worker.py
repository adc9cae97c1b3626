"""arq worker entry point: `arq jobs.worker.WorkerSettings` (the Procfile's `worker` process).

Task functions are thin: each unpacks arq's ctx and calls a core that tests can drive directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from arq.worker import func

from jobs import notify, processing
from jobs.deps import WorkerDeps
from jobs.pipeline import configure_libvips
from jobs.queue import DELIVER_WEBHOOK, PROCESS_IMAGE, WakeableArqRedis
from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import Store

# arq's pause between queue polls that return at once. An empty queue waits on the wake-up instead, but
# a running job stays in arq's queue until it ends, so while jobs run the worker polls at this pace, and
# work enqueued meanwhile (the next upload, the image's own webhook) waits up to this long to start.
# benchmarks/throughput.py: 0.02 s -> 29 ms p50 overhead per image, 0.005 s -> 10-15 ms.
BUSY_POLL_SECONDS = 0.005


async def process_image(ctx: dict[str, Any], image_id: str) -> None:
    await processing.process_image(ctx["deps"], image_id, ctx["job_try"])


async def deliver_webhook(ctx: dict[str, Any], msg_id: str, attempt_number: int) -> None:
    await notify.deliver_webhook(ctx["deps"], msg_id, attempt_number)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    redis = ctx["redis"]
    configure_libvips()
    storage = LocalStorage(settings.storage_root)
    storage.prepare()
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.webhook_timeout, connect=settings.webhook_connect_timeout),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        follow_redirects=False,
    )
    if isinstance(redis, WakeableArqRedis):
        redis.start_listening()
    ctx["deps"] = WorkerDeps(settings, redis, Store(redis), storage, http)


async def shutdown(ctx: dict[str, Any]) -> None:
    deps: WorkerDeps | None = ctx.get("deps")
    if deps is not None:
        await deps.http.aclose()
    if isinstance(ctx["redis"], WakeableArqRedis):
        await ctx["redis"].stop_listening()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq Worker keyword arguments for these settings (arq accepts a dict as WorkerSettings)."""
    pool = WakeableArqRedis.connect(settings.require_redis(), settings.queue_name)
    return {
        "functions": [
            func(process_image, name=PROCESS_IMAGE, timeout=settings.job_timeout + 30),
            func(deliver_webhook, name=DELIVER_WEBHOOK, timeout=settings.webhook_timeout + 30),
        ],
        "queue_name": settings.queue_name,
        "redis_pool": pool,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        "max_jobs": settings.worker_concurrency,
        "poll_delay": BUSY_POLL_SECONDS,
        # Our cores give up after settings.max_attempts starts and record why; arq must not stop first.
        "max_tries": settings.max_attempts + 1,
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
        return worker_settings(Settings.from_env())
    raise AttributeError(name)
