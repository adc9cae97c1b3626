"""Fair scheduling: one account's upload-to-webhook latency, idle and behind another's backlog. Same run.

    python benchmarks/fairness.py [--backlog 2000] [--samples 40] [--rate 4] [--worker-concurrency W]
        [--bulk-nice N] [--only fair]

It starts what production runs — an embedded redis-server (AOF on), `uvicorn server.app:app` and one
`arq jobs.worker.WorkerSettings` — as child processes (benchmarks/throughput.py's harness), with two
accounts of the default plan, A and B (A's uploads a minute lifted, so that its backlog fills in
seconds; share and rendering at once as the plan has them), each with its own signature-checking
receiver. Photos are small
generated JPEGs (640x480, resized to 512 px wide and re-encoded, as throughput.py does), so a backlog of
thousands drains in a minute or two.

1. Idle: B uploads --samples images, one every 1/--rate s (not waiting for the previous one), and each
   is timed from its upload sent to its signed webhook received, that time split by the image's record
   into upload (sent to created), queued (to started), processing (to completed) and announce (to
   received), and the cores the machine's other processes kept busy meanwhile (`others_cores`, from
   /proc: on a shared machine, a disturbed phase shows there).
2. Loaded: A uploads images, 12 in flight, until --backlog of them are queued (waiting their turn
   included), and goes on topping them up as the workers drain them, 2 in flight (a partner with a
   flood, not a batch); meanwhile B does the same as in 1. The queued count is read again when B's
   last webhook arrives.

B's rate is a partner's steady trickle beside the flood; at --rate near half of what the workers do, B
would be a backlog of its own, waiting its turn behind its own images.

Three modes, each on a service of its own: `fair`, as shipped (fair scheduling and each worker's
express lane); `fair_without_express_lane` (DARKROOM_EXPRESS_LANE=off: one lane, B's image next in line
but behind the renders under way, on cores shared alike); `first_come_first_served`
(DARKROOM_FAIR_SCHEDULING=off). `--only fair` runs the first alone. Prints one JSON object; for each mode
the p50/p99 (ms) idle and loaded, and `p99_ratio` = loaded p99 / idle p99, and for the loaded phase the
images a second the workers finished (A's and B's: what the lanes cost the backlog). Issue 13's goal:
as shipped, p99_ratio ≤ 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from photos import generated_jpegs
from redis.asyncio import Redis
from throughput import (
    BIN,
    Client,
    Receiver,
    Service,
    Stamps,
    benchmark_uploader,
    cycle,
    iso_seconds,
    log,
    machine_busy_seconds,
    percentile,
    processes_total,
    running_service,
    wait_ready,
)

from jobs.queue import queued_jobs
from jobs.settings import Settings

PARTS = ("upload", "queued", "processing", "announce")
# The tail's parts shown, slowest last: what the p99 is made of.
SLOWEST_SHOWN = 3
UPLOADS_IN_FLIGHT = 12
HOLD_IN_FLIGHT = 2
UNLIMITED = ("--uploads-per-minute", "1000000", "--requests-per-minute", "1000000")
MODES = {
    "fair": {},
    "fair_without_express_lane": {"DARKROOM_EXPRESS_LANE": "off"},
    "first_come_first_served": {"DARKROOM_FAIR_SCHEDULING": "off"},
}
# Uploads of the backlog sent between two reads of the queue's length, and how often it is read while
# it is held.
BACKLOG_STEP = 100
BACKLOG_CHECK_SECONDS = 0.5


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 1),
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
    }


@dataclass
class Timings:
    """Seconds from upload sent to webhook received, and that time's parts (ms) by the image's record:
    upload (sent to created), queued (to started), processing (to completed), announce (to received)."""

    total: list[float] = field(default_factory=list)
    parts_ms: dict[str, list[float]] = field(default_factory=dict)
    # Cores the machine's other processes kept busy meanwhile: a disturbed phase shows here.
    others_cores: float = 0.0

    def report(self) -> dict[str, Any]:
        parts = {name: round(statistics.median(values), 1) for name, values in self.parts_ms.items()}
        slowest = sorted(range(len(self.total)), key=self.total.__getitem__)[-SLOWEST_SHOWN:]
        return {
            **summary(self.total),
            "median_parts_ms": parts,
            "slowest_parts_ms": [
                {name: round(values[index], 1) for name, values in self.parts_ms.items()} for index in slowest
            ],
            "others_cores": round(self.others_cores, 2),
        }


async def timed_uploads(client: Client, photos: list[Path], rate: float) -> Timings:
    """Each photo sent one every 1/rate s whatever came back, timed to its webhook."""

    async def one(delay: float, photo: Path) -> Stamps:
        await asyncio.sleep(delay)
        return await client.one(photo)

    timings = Timings()
    cpu_before, busy_before, started = client.service.cpu(), machine_busy_seconds(), time.monotonic()
    sent = await asyncio.gather(*(one(index / rate, photo) for index, photo in enumerate(photos)))
    cpu_after, busy_after, elapsed = client.service.cpu(), machine_busy_seconds(), time.monotonic() - started
    ours = processes_total({name: cpu_after[name] - cpu_before[name] for name in cpu_before})
    timings.others_cores = max(busy_after - busy_before - ours, 0) / elapsed
    for stamps in sent:
        timings.total.append(stamps.received - stamps.sent)
        record = await client.image(stamps.image_id)
        moments = [
            stamps.sent,
            *(iso_seconds(record[name]) for name in ("created_at", "started_at", "completed_at")),
            stamps.received,
        ]
        for name, start, end in zip(PARTS, moments, moments[1:], strict=False):
            timings.parts_ms.setdefault(name, []).append((end - start) * 1000)
    return timings


def lift_rate_limits(service: Service, account_id: str) -> None:
    """A's backlog comes faster than its plan's uploads a minute allow; its other numbers stay."""
    subprocess.run(
        [str(BIN / "darkroom"), "accounts", "update", account_id, *UNLIMITED],
        env=service.env,
        capture_output=True,
        check=True,
    )


def finished(receivers: list[Receiver]) -> int:
    """Images whose webhook has arrived, both accounts'."""
    return sum(len(receiver.arrived) for receiver in receivers)


async def queued(redis: Redis) -> int:
    return await queued_jobs(redis, Settings().queue_name)


class Backlog:
    """A's images: uploaded UPLOADS_IN_FLIGHT at a time until `size` are queued, and kept there."""

    def __init__(self, client: Client, photos: list[Path], redis: Redis, size: int) -> None:
        self.client, self.photos, self.redis, self.size = client, photos, redis, size
        self.sent = 0

    async def fill(self, in_flight: int = UPLOADS_IN_FLIGHT) -> None:
        slots = asyncio.Semaphore(in_flight)

        async def send(photo: Path) -> None:
            async with slots:
                await self.client.send(photo)

        while await queued(self.redis) < self.size:
            await asyncio.gather(*(send(photo) for photo in cycle(self.photos, BACKLOG_STEP)))
            self.sent += BACKLOG_STEP

    async def hold(self) -> None:
        """Tops it up as the workers drain it, until cancelled: a few uploads at a time, enough to keep
        up, so that B's uploads do not queue in the web process behind a dozen of A's."""
        while True:
            await self.fill(HOLD_IN_FLIGHT)
            await asyncio.sleep(BACKLOG_CHECK_SECONDS)


async def measure(service: Service, photos: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    redis = Redis.from_url(service.env["REDIS_URL"])
    receivers = [Receiver(""), Receiver("")]
    for receiver in receivers:
        await receiver.start()
    uploader = benchmark_uploader(UPLOADS_IN_FLIGHT)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, service)
            busy = Client(service, session, uploader, receivers[0], photos)
            measured = Client(service, session, uploader, receivers[1], photos)
            lift_rate_limits(service, busy.account["account_id"])
            for photo in photos:  # first requests import lazily, fill pools, warm libvips
                await measured.one(photo)
            samples = cycle(photos, args.samples)
            log("idle")
            idle = await timed_uploads(measured, samples, args.rate)
            log(f"backlog of {args.backlog}")
            started = time.monotonic()
            backlog = Backlog(busy, photos, redis, args.backlog)
            await backlog.fill()
            backlog_at_start = await queued(redis)
            log(f"loaded ({backlog_at_start} queued after {time.monotonic() - started:.1f} s)")
            holding = asyncio.create_task(backlog.hold())
            try:
                finished_before, loaded_from = finished(receivers), time.monotonic()
                loaded = await timed_uploads(measured, samples, args.rate)
                loaded_images_per_second = (finished(receivers) - finished_before) / (
                    time.monotonic() - loaded_from
                )
                backlog_at_end = await queued(redis)
            finally:
                holding.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await holding
    finally:
        await uploader.aclose()
        for receiver in receivers:
            await receiver.stop()
        await redis.aclose()
    return {
        "idle": idle.report(),
        "loaded": loaded.report(),
        "p99_ratio": round(percentile(loaded.total, 0.99) / percentile(idle.total, 0.99), 2),
        "loaded_images_per_second": round(loaded_images_per_second, 1),
        "backlog_uploaded": backlog.sent,
        "backlog_queued_at_start": backlog_at_start,
        "backlog_queued_at_end": backlog_at_end,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=2000, help="A's images queued while B is measured")
    parser.add_argument("--samples", type=int, default=40, help="B's timed uploads per phase")
    parser.add_argument("--rate", type=float, default=4.0, help="B's uploads per second")
    parser.add_argument("--worker-concurrency", type=int, default=None, help="DARKROOM_WORKER_CONCURRENCY")
    parser.add_argument("--bulk-nice", type=int, default=None, help="DARKROOM_BULK_NICE")
    parser.add_argument("--only", choices=list(MODES), action="append", help="only this mode (repeatable)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0))},
        "settings": vars(args),
    }
    common = {} if args.bulk_nice is None else {"DARKROOM_BULK_NICE": str(args.bulk_nice)}
    with tempfile.TemporaryDirectory(prefix="darkroom-fairness-") as scratch:
        photos = generated_jpegs(Path(scratch) / "photos", 640, 480, count=4)
        for mode in args.only or MODES:
            env = {**common, **MODES[mode]}
            log(f"{mode}: {env}")
            work_dir = Path(scratch) / mode
            with running_service(work_dir, args.worker_concurrency, None, extra_env=env) as service:
                results[mode] = asyncio.run(measure(service, photos, args))
    results["goal_met"] = results["fair"]["p99_ratio"] <= 2
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
