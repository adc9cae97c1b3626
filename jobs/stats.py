"""Service-wide counters in one Redis hash, so `/metrics` on any web process sees every worker's work.

Counts are bumped inside the transactions that make the change, so a re-run job never counts twice.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from webhooks.messages import Attempt

STATS_KEY = "dr:stats"


def count(pipe: Any, name: str, amount: int = 1) -> None:
    pipe.hincrby(STATS_KEY, name, amount)


def count_finished(pipe: Any, status: str, error_code: str | None) -> None:
    count(pipe, f"images_{status}")
    if error_code is not None:
        count(pipe, f"images_failed_by_code:{error_code}")


def count_attempt(pipe: Any, attempt: Attempt) -> None:
    count(pipe, f"webhook_attempts:{'delivered' if attempt.succeeded else 'failed'}")


async def read(redis: Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = await redis.hgetall(STATS_KEY)  # type: ignore[misc]
    return {name.decode(): int(value) for name, value in raw.items()}
