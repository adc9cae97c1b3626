"""Redis bytes held per response kept for an Idempotency-Key.

    python benchmarks/idempotency_footprint.py [--uploads 200]

An embedded redis-server (no AOF) and the web app in this process (its lifespan run, local storage in a
scratch folder) take --uploads multipart image uploads as a partner sends them (resize + convert, a
callback URL, a small metadata object), twice: without Idempotency-Key, then each with its own key. The
second run's `used_memory` growth less the first's is what the kept responses cost; `MEMORY USAGE` of the
`idempotency:*` keys says the same per key. Then uploads without and with a key take turns: the medians
show what a key adds (an API key lookup, the claim and the keeping: three Redis round trips on loopback).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pyvips
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from jobs.settings import Settings
from jobs.store import Store
from server.app import create_app
from server.embedded_redis import EmbeddedRedis

FIELDS = {
    "operations": json.dumps(
        [{"type": "resize", "params": {"width": 800}}, {"type": "convert", "params": {"format": "webp"}}]
    ),
    "callback_url": "http://127.0.0.1:9/hooks/darkroom",
    "metadata": json.dumps({"listing_id": "L-1042"}),
}


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


PHOTO = pyvips.Image.black(64, 48).jpegsave_buffer()


async def upload(http: httpx.AsyncClient, api_key: str, *, with_key: bool) -> bytes:
    headers = {"Authorization": f"Bearer {api_key}"}
    if with_key:
        headers["Idempotency-Key"] = str(uuid.uuid4())
    response = await http.post(
        "/v1/images", headers=headers, files={"file": ("DSC_0042.jpg", PHOTO, "image/jpeg")}, data=FIELDS
    )
    assert response.status_code == 202, response.text
    return response.content


async def median_ms(http: httpx.AsyncClient, api_key: str, count: int) -> dict[bool, float]:
    """Median milliseconds per upload without and with a key, taking turns (this machine's load moves)."""
    took: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(count):
        for with_key in (False, True):
            started = time.perf_counter()
            await upload(http, api_key, with_key=with_key)
            took[with_key].append((time.perf_counter() - started) * 1000)
    return {with_key: statistics.median(times) for with_key, times in took.items()}


async def main(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch, EmbeddedRedis(None, appendonly=False) as server:
        data = Path(scratch)
        settings = Settings(
            redis_url=server.url,
            data_dir=data,
            storage_url=data.as_uri(),
            public_url="https://api.example",
            allow_private_callbacks=True,
        )
        redis = Redis.from_url(server.url)
        api_key = (await Store(redis).create_account("footprint")).api_key
        app = create_app(settings)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://darkroom") as http:
                before = await used_memory(redis)
                for _ in range(count):
                    await upload(http, api_key, with_key=False)
                without_keys = await used_memory(redis) - before
                before = await used_memory(redis)
                for _ in range(count):
                    body = await upload(http, api_key, with_key=True)
                with_keys = await used_memory(redis) - before
                key_bytes = [
                    int(await redis.memory_usage(key, samples=0) or 0)
                    async for key in redis.scan_iter(match="idempotency:*", count=1000)
                ]
                timing = await median_ms(http, api_key, count)
        await redis.aclose()
    return {
        "uploads": count,
        "response_body_bytes": len(body),
        "used_memory_bytes_per_kept_response": round((with_keys - without_keys) / count),
        "memory_usage_bytes_per_key": round(sum(key_bytes) / len(key_bytes)),
        "used_memory_bytes_per_image_without_key": round(without_keys / count),
        "median_ms_per_upload_without_key": round(timing[False], 2),
        "median_ms_per_upload_with_key": round(timing[True], 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=200)
    print(json.dumps(asyncio.run(main(parser.parse_args().uploads)), indent=2))
