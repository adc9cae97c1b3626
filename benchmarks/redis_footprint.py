"""Redis bytes per 1,000 images, and what the retention sweep gives back.

    python benchmarks/redis_footprint.py [--images 1000]

An embedded redis-server (no AOF) holds one account; --images completed images are saved through the
service's own `Store` calls (upload transaction, then the finishing one, without webhook messages), as a
partner's listing photos: resize + convert, a callback URL, a small metadata object, a file name. arq's
job keys are removed as a worker removes them once the job ends, so what is measured is what stays.

Measured, with `INFO memory` used_memory deltas and `MEMORY USAGE` of the keys:
- `with_retention`: the records as stored now (`expires_at` in the JSON, an entry in
  `dr:images:expiring`);
- `without_retention`: the same records without them, as before retention existed (the baseline);
- `after_sweep`: what remains once `jobs.retention.sweep_expired` has deleted them all, and how fast
  it went (no files to delete: Redis round trips only).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from jobs.ids import new_id
from jobs.queue import QueuePool
from jobs.records import ImageRecord, InputInfo, OutputInfo
from jobs.retention import sweep_expired
from jobs.settings import Settings
from jobs.store import EXPIRING_IMAGES_KEY, Store
from jobs.worker import build_deps, close_deps
from server.embedded_redis import EmbeddedRedis
from webhooks.messages import iso, now_ms

OPERATIONS = [
    {"type": "resize", "params": {"width": 800, "fit": "inside", "enlarge": False, "background": "#ffffff"}},
    {"type": "convert", "params": {"format": "webp", "quality": 80}},
]


def completed_image(account_id: str, retention_s: int | None) -> tuple[ImageRecord, ImageRecord]:
    """An image as uploaded, and as finished."""
    image_id = new_id("img")
    moment = now_ms()
    queued = ImageRecord(
        id=image_id,
        account_id=account_id,
        status="queued",
        operations=OPERATIONS,
        input=InputInfo("jpeg", 6000, 4000, 1, 8_123_456, "DSC_0042.jpg"),
        original_key=f"{account_id}/{image_id}/original",
        created_at=iso(moment),
        callback_url="https://partner.example/hooks/darkroom",
        metadata={"listing_id": "L-1042"},
        expires_at=None if retention_s is None else iso(moment + retention_s * 1000),
    )
    finished = queued.evolve(
        status="completed",
        attempts=1,
        started_at=iso(moment + 5),
        completed_at=iso(moment + 900),
        output=OutputInfo("webp", 800, 533, 61_234, f"{account_id}/{image_id}/output.webp"),
    )
    return queued, finished


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def key_bytes(redis: Redis, pattern: str) -> int:
    total = 0
    async for key in redis.scan_iter(match=pattern, count=1000):
        total += int(await redis.memory_usage(key, samples=0) or 0)
    return total


async def save(
    store: Store, settings: Settings, account_id: str, count: int, retention_s: int | None
) -> None:
    for _ in range(count):
        queued, finished = completed_image(account_id, retention_s)
        await store.save_new_images([queued], settings.queue_name)
        await store.finish_image(finished, None, previous=queued)
    # What a worker removes when each job ends (the queue, its jobs waiting their turn, arq's records).
    ended = [
        k
        for pattern in (f"{settings.queue_name}*", "arq:*")
        async for k in store.redis.scan_iter(match=pattern)
    ]
    await store.redis.delete(*ended)


async def measure(settings: Settings, count: int, retention_s: int | None) -> dict[str, Any]:
    redis = Redis.from_url(settings.redis_url)
    await redis.flushall()
    store = Store(redis)
    account_id = (await store.create_account("footprint")).account.id
    before = await used_memory(redis)
    await save(store, settings, account_id, count, retention_s)
    grown = await used_memory(redis) - before
    per_thousand = 1000 / count
    records = await key_bytes(redis, "dr:image:*")
    sample = await redis.get(next(iter([k async for k in redis.scan_iter(match="dr:image:*", count=10)])))
    result = {
        "used_memory_bytes_per_1000_images": round(grown * per_thousand),
        "record_keys_bytes_per_1000": round(records * per_thousand),
        "account_index_bytes_per_1000": round(
            int(await redis.memory_usage(f"dr:account:{account_id}:images", samples=0) or 0) * per_thousand
        ),
        "expiring_index_bytes_per_1000": round(
            int(await redis.memory_usage(EXPIRING_IMAGES_KEY, samples=0) or 0) * per_thousand
        ),
        "record_json_bytes": len(sample or b""),
    }
    if retention_s is not None:
        pool = QueuePool.connect(settings.redis_url, settings.queue_name)
        deps = await build_deps(settings, pool)
        try:
            started = time.perf_counter()
            swept = await sweep_expired(deps, now_ms() + retention_s * 1000 + 1000)
            sweep_seconds = time.perf_counter() - started
        finally:
            await close_deps(deps)
            await pool.aclose()
        result["after_sweep"] = {
            "images_swept": swept.images,
            "sweep_images_per_s": round(swept.images / sweep_seconds),
            "used_memory_bytes_left": await used_memory(redis) - before,
            "dr_image_keys_left": len([k async for k in redis.scan_iter(match="dr:image:*")]),
        }
    await redis.aclose()
    return result


async def main(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch, EmbeddedRedis(None, appendonly=False) as server:
        data = Path(scratch)
        settings = Settings(redis_url=server.url, data_dir=data, storage_url=data.as_uri())
        baseline = await measure(settings, count, None)
        retained = await measure(settings, count, settings.image_retention)
    sample_id = "img_" + "0" * 26
    derivable = len(f'"original_key":"acc_{"0" * 26}/{sample_id}/original",') + len(
        f',"key":"acc_{"0" * 26}/{sample_id}/output.webp"'
    )
    return {
        "images": count,
        "without_retention": baseline,
        "with_retention": retained,
        "retention_overhead_bytes_per_1000": retained["used_memory_bytes_per_1000_images"]
        - baseline["used_memory_bytes_per_1000_images"],
        "derivable_storage_key_bytes_per_record": derivable,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    print(json.dumps(asyncio.run(main(parser.parse_args().images)), indent=2))
