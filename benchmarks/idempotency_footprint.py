"""Redis bytes held per response kept for an Idempotency-Key.

    python benchmarks/idempotency_footprint.py [--uploads 200]

An embedded redis-server (no AOF) and the web app in this process (its lifespan run, local storage in a
scratch folder) take --uploads multipart image uploads as a partner sends them (resize + convert, a
callback URL, a small metadata object), twice: without Idempotency-Key, then each with its own key. The
second run's `used_memory` growth less the first's is what the kept responses cost; `MEMORY USAGE` of the
`idempotency:*` keys says the same per key. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
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


async def upload_all(http: httpx.AsyncClient, api_key: str, count: int, *, with_keys: bool) -> int:
    """Bytes of the last response's body."""
    photo = pyvips.Image.black(64, 48).jpegsave_buffer()
    body = b""
    for _ in range(count):
        headers = {"Authorization": f"Bearer {api_key}"}
        if with_keys:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        response = await http.post(
            "/v1/images", headers=headers, files={"file": ("DSC_0042.jpg", photo, "image/jpeg")}, data=FIELDS
        )
        assert response.status_code == 202, response.text
        body = response.content
    return len(body)


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
                await upload_all(http, api_key, count, with_keys=False)
                without_keys = await used_memory(redis) - before
                before = await used_memory(redis)
                body_bytes = await upload_all(http, api_key, count, with_keys=True)
                with_keys = await used_memory(redis) - before
        key_bytes = [
            int(await redis.memory_usage(key, samples=0) or 0)
            async for key in redis.scan_iter(match="idempotency:*", count=1000)
        ]
        await redis.aclose()
    return {
        "uploads": count,
        "response_body_bytes": body_bytes,
        "used_memory_bytes_per_kept_response": round((with_keys - without_keys) / count),
        "memory_usage_bytes_per_key": round(sum(key_bytes) / len(key_bytes)),
        "used_memory_bytes_per_image_without_key": round(without_keys / count),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=200)
    print(json.dumps(asyncio.run(main(parser.parse_args().uploads)), indent=2))
