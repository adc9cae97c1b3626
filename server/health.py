"""`/healthz` (the process answers) and `/readyz` (Redis and storage are reachable, storage has room)."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.storage import BlobStorage
from server.resources import Health, Readiness, ReadinessChecks

# A storage that does not answer within this is as good as unreachable to a load balancer.
STORAGE_CHECK_SECONDS = 5.0
# Polled by every load balancer: the same bytes every time.
_ALIVE = Health(status="ok").model_dump_json()


async def healthz(request: Request) -> Response:
    return Response(_ALIVE, media_type="application/json")


async def readyz(request: Request) -> Response:
    try:
        await asyncio.wait_for(request.app.state.redis.ping(), timeout=2)
        redis = "ok"
    except (RedisError, OSError, TimeoutError) as exc:
        redis = f"unreachable: {type(exc).__name__}"
    storage: BlobStorage = request.app.state.storage
    try:
        stored = await asyncio.wait_for(storage.check(), timeout=STORAGE_CHECK_SECONDS)
    except TimeoutError:
        stored = f"unreachable: no answer within {STORAGE_CHECK_SECONDS:g} s"
    space = await storage_space_check(storage, request.app.state.settings.min_free_bytes)
    checks = ReadinessChecks(redis=redis, storage=stored, storage_space=space)
    ready = all(value == "ok" for value in checks.model_dump().values())
    readiness = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return Response(
        readiness.model_dump_json(), status_code=200 if ready else 503, media_type="application/json"
    )


async def storage_space_check(storage: BlobStorage, min_free_bytes: int) -> str:
    """Not ready with less free storage than DARKROOM_MIN_FREE_BYTES: uploads would soon fail (507), so
    a load balancer should send them to a process whose storage has room."""
    try:
        free = await asyncio.to_thread(storage.free_bytes)
    except OSError as exc:
        return f"unknown: {exc.strerror or type(exc).__name__}"
    if free < min_free_bytes:
        return f"low: {free} bytes free, under DARKROOM_MIN_FREE_BYTES ({min_free_bytes})"
    return "ok"


routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
