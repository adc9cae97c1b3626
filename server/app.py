"""The web process: `uvicorn server.app:app` (the Procfile's `web`).

`app` is built on first access from the environment; tests and `darkroom dev` call `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect

from jobs.logs import configure_logging
from jobs.pipeline import configure_libvips
from jobs.queue import QueuePool
from jobs.retention import staging_max_age
from jobs.settings import Settings
from jobs.storage import BlobStorage, StorageUnavailable, open_storage
from jobs.store import Store
from jobs.uploads import UploadDesk
from server import (
    batches,
    dashboard,
    deliveries,
    docs,
    endpoints,
    health,
    images,
    metrics,
    openapi,
    uploads,
    variants,
)
from server.changes import ChangeFeed
from server.cors import SignedUploadCors
from server.failed_authentications import FailedAuthentications
from server.http_limits import HEADER_GUARD_STATE, STOPPING_STATE, BodyDeadlineMiddleware, HeaderGuard
from server.idempotency import IdempotencyMiddleware, IdempotencyRecords
from server.problems import (
    Problem,
    handle_client_gone,
    handle_http_status,
    handle_problem,
    handle_storage_unavailable,
    handle_store_unavailable,
    handle_unexpected,
)
from server.query import guard_queries
from server.ratelimit import RateLimiter, RateLimitHeaders
from server.request_log import RequestLogMiddleware

# A request waits at most this long for Redis to connect or answer, then gets 503 store_unavailable: a
# Redis that hangs (frozen, or its network gone) must not hang every request with it. The web sends no
# blocking commands, and its slowest script answers in milliseconds.
REDIS_COMMAND_TIMEOUT_SECONDS = 5.0
ANNOUNCE_RETRY_SECONDS = 1.0
# As often as the workers' retention sweep clears their own scratch folders.
SCRATCH_SWEEP_SECONDS = 300.0


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        configure_libvips()
        storage = await open_storage(settings)
        redis = QueuePool.connect(
            settings.require_redis(), settings.queue_name, command_timeout=REDIS_COMMAND_TIMEOUT_SECONDS
        )
        app.state.redis = redis
        app.state.store = Store(redis, message_retention=settings.webhook_retention)
        app.state.rate_limiter = RateLimiter(redis)
        app.state.failed_authentications = FailedAuthentications(app.state.rate_limiter, settings)
        app.state.idempotency = IdempotencyRecords(redis)
        app.state.storage = storage
        app.state.uploads = UploadDesk(settings, redis, app.state.store, storage)
        # Read from Redis when the first upload URL is signed or checked.
        app.state.upload_signing_key = None
        app.state.variant_render_slots = variants.RenderSlots()
        app.state.changes = ChangeFeed(settings.require_redis())
        # Announced now (a task left running into shutdown would be cut off mid-command and leave its
        # connection open); only when Redis is not there yet does a task keep trying.
        announcing = None
        try:
            await app.state.store.announce_public_url(settings.public_url)
        except RedisError:
            announcing = asyncio.create_task(_announce_public_url(app.state.store, settings.public_url))
        sweeping = asyncio.create_task(_sweep_scratch(storage, settings))
        try:
            async with (
                app.state.changes.running(),
                metrics.request_counting(redis) as app.state.request_counts,
            ):
                # uvicorn hands the lifespan state to every connection's protocol (server/http_limits.py).
                yield {
                    HEADER_GUARD_STATE: HeaderGuard.from_settings(settings),
                    STOPPING_STATE: app.state.changes.stop_waiting,
                }
        finally:
            sweeping.cancel()
            if announcing is not None:
                announcing.cancel()
            await redis.aclose(close_connection_pool=True)
            await storage.close()

    app = Starlette(
        routes=guard_queries(
            [
                *health.routes,
                *metrics.routes,
                *openapi.routes,
                *docs.routes,
                *images.routes,
                *uploads.routes,
                *batches.routes,
                *deliveries.routes,
                *endpoints.routes,
                *dashboard.routes,
            ]
        ),
        exception_handlers={
            Problem: handle_problem,
            HTTPException: handle_http_status,
            RedisError: handle_store_unavailable,
            StorageUnavailable: handle_storage_unavailable,
            ClientDisconnect: handle_client_gone,
            Exception: handle_unexpected,
        },
        middleware=[
            Middleware(RequestLogMiddleware),
            Middleware(SignedUploadCors),
            Middleware(RateLimitHeaders),
            # Starlette answers an unhandled exception from its outermost middleware, outside the two
            # above: this one answers it inside them, so that a 500 carries the request's id and its
            # account's rate limits (it re-raises, for the server's log; the outer one, which answers
            # only what fails in the two above, then answers nothing more).
            Middleware(ServerErrorMiddleware, handler=handle_unexpected),
            Middleware(
                BodyDeadlineMiddleware,
                idle_timeout=settings.body_idle_timeout,
                total_timeout=settings.body_timeout,
            ),
            Middleware(IdempotencyMiddleware, settings=settings),
        ],
        lifespan=lifespan,
    )
    # `/v1/images/img_…/` is no route of ours: 404, not a redirect built from the client's Host header.
    app.router.redirect_slashes = False
    app.state.settings = settings
    return app


async def _announce_public_url(store: Store, public_url: str) -> None:
    """Tell workers without DARKROOM_PUBLIC_URL where this web process's links lead: once Redis answers,
    which may be after this process started."""
    while True:
        try:
            await store.announce_public_url(public_url)
            return
        except RedisError:
            await asyncio.sleep(ANNOUNCE_RETRY_SECONDS)


async def _sweep_scratch(storage: BlobStorage, settings: Settings) -> None:
    """Remove what this process's scratch folder holds past the age no job's file reaches, as workers do
    in theirs: a web process on a machine of its own (S3 storage) has no worker beside it to do it, and
    would keep for good what a killed upload left and the originals it kept for a local worker before a
    restart, which nobody takes once the process that counted them is gone."""
    while True:
        with contextlib.suppress(OSError):  # a folder that cannot be read now may be swept next time
            await asyncio.to_thread(storage.remove_staged_before, time.time() - staging_max_age(settings))
        await asyncio.sleep(SCRATCH_SWEEP_SECONDS)


def __getattr__(name: str) -> Any:
    if name == "app":
        settings = Settings.from_env()
        # After uvicorn's own logging set-up, which loading the app follows.
        configure_logging(settings)
        return create_app(settings)
    raise AttributeError(name)
