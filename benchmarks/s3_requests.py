"""CPU of the S3 requests an image costs, S3Storage against plain aiobotocore calls, same run.

    python benchmarks/s3_requests.py [--objects 300] [--rounds 3] [--photos corpus|2k|tiny]

An image on S3 costs three requests: the web's PutObject of the original, the worker's GetObject of it
(skipped by a worker on the web's machine, which takes the web's scratch copy) and its PutObject of the
result. This measures them without the renders around them, whose CPU varies
more from run to run than these requests cost (benchmarks/storage.py cannot resolve a few ms per image):
`S3Storage.put_file` then `local_copy` of each photo (staged file in, scratch file out, as the web and
the worker use them), against the same with the client's `put_object` and `get_object`, as
S3Storage made them before its data path went to presigned URLs. Rounds alternate; moto's server is a
separate process on loopback, its CPU measured apart.

Prints one JSON object: per request pair (a put and a get), the median round's CPU ms of this process
and of the S3 server, for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from photos import find_photos
from throughput import cpu_seconds, cycle, log, own_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from jobs.s3storage import S3Storage  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from tests.s3server import CREDENTIALS, REGION, S3Server  # noqa: E402

Pair = Callable[[int, bytes], Awaitable[None]]


def storage_pair(storage: S3Storage) -> Pair:
    async def put_then_get(number: int, data: bytes) -> None:
        staged, sink = storage.open_staging()
        with sink:
            sink.write(data)
        await storage.put_file(staged, f"acc_1/img_{number}/original")
        async with storage.local_copy(f"acc_1/img_{number}/original"):
            pass

    return put_then_get


def client_pair(storage: S3Storage) -> Pair:
    async def put_then_get(number: int, data: bytes) -> None:
        key = storage.object_key(f"acc_1/img_{number}/client")
        staged, sink = storage.open_staging()
        with sink:
            sink.write(data)
        body = await asyncio.to_thread(staged.read_bytes)
        await storage.client.put_object(Bucket=storage.bucket, Key=key, Body=body)
        await asyncio.to_thread(staged.unlink)
        copy = storage.new_staging_path()
        answer = await storage.client.get_object(Bucket=storage.bucket, Key=key)
        with copy.open("wb") as sink:
            async with answer["Body"] as stream:
                async for chunk in stream.iter_chunks(1024 * 1024):
                    await asyncio.to_thread(sink.write, chunk)
        copy.unlink()

    return put_then_get


async def measure(
    settings: Settings, photos: list[bytes], rounds: int, s3_server_pid: int
) -> dict[str, object]:
    storage = S3Storage(settings)
    await storage.prepare()
    pairs = {"s3storage": storage_pair(storage), "aiobotocore": client_pair(storage)}
    cpu_ms: dict[str, list[float]] = {name: [] for name in pairs}
    server_ms: dict[str, list[float]] = {name: [] for name in pairs}
    try:
        for pair in pairs.values():  # warm: imports, pools
            await pair(0, photos[0])
        for round_number in range(rounds):
            for name, pair in pairs.items():
                own, server = own_cpu_seconds(), cpu_seconds(s3_server_pid)
                for number, data in enumerate(photos):
                    await pair(number, data)
                cpu_ms[name].append((own_cpu_seconds() - own) * 1000 / len(photos))
                server_ms[name].append((cpu_seconds(s3_server_pid) - server) * 1000 / len(photos))
                log(f"round {round_number + 1}/{rounds}: {name} {cpu_ms[name][-1]:.2f} ms per put + get")
    finally:
        await storage.close()
    return {
        "cpu_ms_per_put_and_get": {
            name: round(statistics.median(values), 2) for name, values in cpu_ms.items()
        },
        "s3_server_cpu_ms_per_put_and_get": {
            name: round(statistics.median(values), 2) for name, values in server_ms.items()
        },
        "rounds": {name: [round(value, 2) for value in values] for name, values in cpu_ms.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=300, help="put + get pairs per round and client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", choices=["corpus", "2k", "tiny"], default="corpus")
    args = parser.parse_args(argv)

    work_dir = Path(tempfile.mkdtemp(prefix="darkroom-bench-s3-requests-"))
    os.environ.update(CREDENTIALS)
    photo_paths, source = find_photos(work_dir / "photos", args.photos)
    photos = [path.read_bytes() for path in cycle(photo_paths, args.objects)]
    s3_server = S3Server().start()
    try:
        env = {
            "DARKROOM_DATA_DIR": str(work_dir / "data"),
            "DARKROOM_STORAGE_URL": f"s3://{s3_server.new_bucket()}/darkroom",
            "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
            "DARKROOM_S3_REGION": REGION,
        }
        report = asyncio.run(measure(Settings.from_env(env), photos, args.rounds, s3_server.pid))
    finally:
        s3_server.stop()
    report.update(
        objects=args.objects,
        mean_object_bytes=round(statistics.mean(len(photo) for photo in photos)),
        photos=source,
        s3_server="moto (separate process, loopback)",
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
