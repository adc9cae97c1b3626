"""What the rate limiter costs an authenticated request: its Redis round trip against a plain one and
against the whole request.

    python benchmarks/rate_limit.py [--round-trips 2000] [--requests 2000] [--concurrency 8]

It starts what production runs (an embedded redis-server, `uvicorn server.app:app`, one idle arq worker)
as child processes (benchmarks/throughput.py's) and one account on a plan it cannot use up, then, in
the same run:

- round trips from this process to that Redis, one at a time, taking turns: `PING`; the limiter's check
  (`RateLimiter.check`, the GCRA script every authenticated request runs); the account lookup every
  authenticated request runs before it (`Store.authenticate`);
- `GET /v1/webhook-secret` (an authenticated GET that reads nothing else), one at a time on one
  keep-alive connection (latency), then --concurrency at a time (requests/s).

There is no switch to run the service without its limiter (it is not meant to be off); its cost is the
check's round trip, set against the GET's latency (`check_share_of_get`) and its extra over a plain
`PING` (the script's own work in Redis). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from throughput import create_account, log, percentile, running_service, wait_ready

from jobs.store import Store
from server.ratelimit import RateLimiter

# One round trip's measure: its awaitable, made anew each time.
Probe = Callable[[], Awaitable[object]]


def summary_us(seconds: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(seconds) * 1e6, 1),
        "p95": round(percentile(seconds, 0.95) * 1e6, 1),
        "mean": round(statistics.fmean(seconds) * 1e6, 1),
    }


async def round_trips(probes: dict[str, Probe], count: int) -> dict[str, list[float]]:
    """Each probe `count` times, taking turns so that the machine's moods fall on all alike."""
    times: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(count):
        for name, probe in probes.items():
            started = time.perf_counter()
            await probe()
            times[name].append(time.perf_counter() - started)
    return times


async def get_latencies(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], count: int
) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            await response.read()
            assert response.status == 200, response.status
        times.append(time.perf_counter() - started)
    return times


async def get_throughput(url: str, headers: dict[str, str], count: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = iter(range(count))

        async def client() -> None:
            for _ in remaining:
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def run(work_dir: Path, trips: int, requests: int, concurrency: int) -> dict[str, Any]:
    with running_service(work_dir, None, None) as service:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, service)
            account = create_account(service.env)
            headers = {"Authorization": f"Bearer {account['api_key']}"}
            redis = Redis.from_url(service.env["REDIS_URL"])
            store = Store(redis)
            limiter = RateLimiter(redis)
            try:
                huge = 10_000_000
                await limiter.check("acc_benchmark", "requests", huge)  # loads the script
                log(f"{trips} round trips of each kind")
                times = await round_trips(
                    {
                        "ping": redis.ping,
                        "rate_limit_check": lambda: limiter.check("acc_benchmark", "requests", huge),
                        "authenticate": lambda: store.authenticate(account["api_key"]),
                    },
                    trips,
                )
            finally:
                await redis.aclose()
            url = f"{service.base_url}/v1/webhook-secret"
            log(f"{requests} GETs one at a time, then {concurrency} at a time")
            await get_latencies(session, url, headers, 50)  # warm-up
            latencies = await get_latencies(session, url, headers, requests)
        per_second = await get_throughput(url, headers, requests, concurrency)
    trips_us = {name: summary_us(values) for name, values in times.items()}
    get_us = summary_us(latencies)
    check, ping = trips_us["rate_limit_check"]["p50"], trips_us["ping"]["p50"]
    return {
        "round_trips": trips,
        "requests": requests,
        "concurrency": concurrency,
        "redis_round_trip_us": trips_us,
        "get_latency_us": get_us,
        "get_requests_per_s": round(per_second, 1),
        "check_extra_over_ping_us": round(check - ping, 1),
        "check_share_of_get": round(check / get_us["p50"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--round-trips", type=int, default=2000, help="Redis round trips of each kind")
    parser.add_argument("--requests", type=int, default=2000, help="GETs, one at a time and concurrently")
    parser.add_argument("--concurrency", type=int, default=8, help="GETs in flight for requests/s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="darkroom-rate-limit-") as folder:
        result = asyncio.run(run(Path(folder), args.round_trips, args.requests, args.concurrency))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
