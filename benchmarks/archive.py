"""Batch archive assembly against a plain file copy of the same bytes, in the same run.

    python benchmarks/archive.py [--files 1000] [--mean-mb 1.5] [--rounds 4] [--dir /tmp]

It lays out what a finished batch leaves behind: an embedded redis-server (no AOF) and local storage
holding --files results of realistic JPEG sizes (log-normal around --mean-mb, 0.3 to 4 MB; random bytes
between JPEG markers, so incompressible, as JPEG data is), recorded as the completed images of one
sealed, completed batch through the service's own `Batches` and `Store` calls. Then, --rounds times:

- copy: this process reads every result and appends it to one file with `shutil.copyfileobj`;
- assemble: a child process does what a worker does for the `build_archive` job — `build_deps`, then
  the `jobs.archive.build_archive` core: read the batch's records, stream every result into a ZIP in
  staging, commit it, record it ready. Its time runs from the call to its return. Its memory: VmRSS once
  idle (after start-up), then the peak (VmHWM) over the build, the peak reset through
  /proc/self/clear_refs at the start so that start-up's own peak does not count.

Each timed run starts after `sync` with the sources in the page cache (both read the same files), after
one untimed run of each; the two take turns going first, and outputs are deleted after each. The first
archive is checked: every entry's CRC. The
disk must hold the results and one output at a time; the script checks `df` first and removes
everything it wrote. Prints one JSON object. Issue 5's goals: assembly ≥ 0.7 x the copy's throughput;
the assembling process' peak RSS ≤ 64 MB above its idle size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from jobs.archive import archive_key
from jobs.batches import Batches
from jobs.ids import new_id
from jobs.queue import QueuePool
from jobs.records import ArchiveSpec, ArchiveState, BatchRecord, ImageRecord, InputInfo, OutputInfo, utc_now
from jobs.settings import Settings
from jobs.store import Store, batch_key
from server.embedded_redis import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
MIN_FILE_BYTES, MAX_FILE_BYTES = 300_000, 4_000_000
SIGMA = 0.45  # spread of the log-normal sizes: most photos within about 0.6x to 1.6x of the mean
DISK_MARGIN_BYTES = 512 * MB
RECORD_CHUNK = 100
GOAL_RATIO = 0.7
GOAL_RSS_GROWTH_MB = 64.0

# The assembling process: a worker's start-up, then the job's core, with its own memory readings.
ASSEMBLE = r"""
import asyncio, json, resource, sys, time
from jobs import archive
from jobs.queue import QueuePool
from jobs.settings import Settings
from jobs.worker import build_deps, close_deps

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False

async def main(redis_url, storage_url, batch_id):
    settings = Settings(redis_url=redis_url, storage_url=storage_url, public_url="http://bench")
    redis = QueuePool.connect(redis_url, settings.queue_name)
    deps = await build_deps(settings, redis)
    await deps.store.redis.ping()
    idle_kb = status_kb("VmRSS")
    reset = reset_peak()
    peak_before_kb = status_kb("VmHWM")
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await archive.build_archive(deps, batch_id, 1)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = status_kb("VmHWM")
    await close_deps(deps)
    await redis.aclose()
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime")),
        "idle_rss_kb": idle_kb,
        "peak_reset": reset,
        "peak_before_kb": peak_before_kb,
        "peak_kb": peak_kb,
    }))

asyncio.run(main(*sys.argv[1:]))
"""


@dataclass(frozen=True)
class Results:
    paths: list[Path]
    total_bytes: int


def file_sizes(count: int, mean_bytes: float, rng: random.Random) -> list[int]:
    # A log-normal with this mean: exp(mu + sigma²/2) = mean.
    mu = math.log(mean_bytes) - SIGMA**2 / 2
    return [
        min(MAX_FILE_BYTES, max(MIN_FILE_BYTES, round(rng.lognormvariate(mu, SIGMA)))) for _ in range(count)
    ]


def write_result(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as sink:
        sink.write(b"\xff\xd8\xff\xe0")
        left = size - 6
        while left > 0:
            chunk = min(left, 4 * MB)
            sink.write(rng.randbytes(chunk))
            left -= chunk
        sink.write(b"\xff\xd9")


def check_disk(directory: Path, sizes: list[int]) -> dict[str, int]:
    """The results and one output at a time, plus a margin; refuse to start otherwise."""
    needed = 2 * sum(sizes) + DISK_MARGIN_BYTES
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise SystemExit(f"{directory}: {free / MB:,.0f} MB free, {needed / MB:,.0f} MB needed")
    return {"free_bytes": free, "needed_bytes": needed}


async def lay_out_batch(settings: Settings, sizes: list[int], rng: random.Random) -> tuple[str, str, Results]:
    """A completed batch of completed images whose results are the generated files; (account, batch)."""
    redis = QueuePool.connect(settings.redis_url, settings.queue_name)
    store = Store(redis)
    batches = Batches(store, redis, settings)
    account = (await store.create_account("bench")).account.id
    batch = BatchRecord(new_id("bat"), account, utc_now(), archive=ArchiveSpec())
    await batches.create(batch)
    images: list[ImageRecord] = []
    paths: list[Path] = []
    for index, size in enumerate(sizes):
        image_id = new_id("img")
        key = f"{account}/{image_id}/output.jpg"
        path = settings.storage_root / key
        write_result(path, size, rng)
        paths.append(path)
        images.append(
            ImageRecord(
                id=image_id,
                account_id=account,
                status="queued",
                operations=[],
                input=InputInfo("jpeg", 4000, 3000, 1, size, f"IMG_{index:04d}.jpg"),
                original_key=f"{account}/{image_id}/original",
                created_at=utc_now(),
                batch_id=batch.id,
                output=OutputInfo("jpeg", 4000, 3000, size, key),
            )
        )
    for start in range(0, len(images), RECORD_CHUNK):
        await batches.add_images(batch.id, images[start : start + RECORD_CHUNK])
    for image in images:
        await store.finish_image(image.evolve(status="completed", completed_at=utc_now()), None)
    sealed = await batches.seal(batch.id)
    assert sealed.status == "completed", sealed.status
    await redis.aclose()
    return account, batch.id, Results(paths, sum(sizes))


def copy_round(results: Results, destination: Path) -> float:
    os.sync()
    started = time.perf_counter()
    with destination.open("wb") as sink:
        for path in results.paths:
            with path.open("rb") as source:
                shutil.copyfileobj(source, sink)
    seconds = time.perf_counter() - started
    destination.unlink()
    return seconds


def assemble_round(settings: Settings, batch_id: str) -> dict[str, Any]:
    os.sync()
    done = subprocess.run(
        [sys.executable, "-c", ASSEMBLE, settings.redis_url, settings.storage_url, batch_id],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the assembling process failed:\n{done.stdout}\n{done.stderr}")
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


async def archive_state(settings: Settings, batch_id: str) -> ArchiveState | None:
    redis = Redis.from_url(settings.redis_url)
    try:
        batch = BatchRecord.from_hash(await redis.hgetall(batch_key(batch_id)))  # type: ignore[misc]
    finally:
        await redis.aclose()
    return None if batch is None else batch.archive_state


async def reset_archive(settings: Settings, batch_id: str) -> None:
    """Back to pending, as if the batch had just completed: the next round builds it again."""
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.hset(batch_key(batch_id), "archive", ArchiveState().to_json())
    finally:
        await redis.aclose()


def check_archive(path: Path, files: int) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        broken = archive.testzip()
        stored = all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist()[:-1])
    return {
        "entries": len(names),
        "expected_entries": files + 1,
        "crc_ok": broken is None,
        "all_stored": stored,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="darkroom-archive-bench-", dir=args.dir))
    rng = random.Random(args.seed)
    sizes = file_sizes(args.files, args.mean_mb * MB, rng)
    try:
        disk = check_disk(work, sizes)
        with EmbeddedRedis(None, appendonly=False) as redis_server:
            data = work / "data"
            settings = Settings(redis_url=redis_server.url, data_dir=data, storage_url=data.as_uri())
            (data / ".staging").mkdir(parents=True)
            generating = time.perf_counter()
            account, batch_id, results = await lay_out_batch(settings, sizes, rng)
            generated_seconds = time.perf_counter() - generating
            built = settings.storage_root / archive_key(BatchRecord(batch_id, account, ""))

            async def build() -> dict[str, Any]:
                measured = assemble_round(settings, batch_id)
                state = await archive_state(settings, batch_id)
                assert state is not None and state.status == "ready", state
                measured["archive_bytes"] = built.stat().st_size
                if not checked:
                    checked.update(check_archive(built, args.files))
                built.unlink()  # as the copy's output is: each run finds the same free memory
                await reset_archive(settings, batch_id)
                return measured

            # Untimed: the first large writes after generating the results pay for the page cache's
            # growth, whichever of the two runs first. The first archive is checked.
            checked: dict[str, Any] = {}
            copy_round(results, work / "copy.bin")
            archive_bytes = (await build())["archive_bytes"]
            copies: list[float] = []
            builds: list[dict[str, Any]] = []
            for round_number in range(args.rounds):
                # Taking turns at going first, so that neither always runs in the other's wake.
                if round_number % 2:
                    builds.append(await build())
                    copies.append(copy_round(results, work / "copy.bin"))
                else:
                    copies.append(copy_round(results, work / "copy.bin"))
                    builds.append(await build())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = results.total_bytes
    copy_rates = [total / MB / seconds for seconds in copies]
    build_rates = [total / MB / build["seconds"] for build in builds]
    growth_mb = [(build["peak_kb"] - build["idle_rss_kb"]) / 1024 for build in builds]
    ratio = statistics.median(build_rates) / statistics.median(copy_rates)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "disk": disk,
        "files": args.files,
        "result_bytes": total,
        "mean_file_bytes": round(total / args.files),
        "archive_bytes": archive_bytes,
        "archive_overhead_bytes": archive_bytes - total,
        "generated_seconds": round(generated_seconds, 2),
        "archive_check": checked,
        "copy_mb_per_s": [round(rate, 1) for rate in copy_rates],
        "assemble_mb_per_s": [round(rate, 1) for rate in build_rates],
        "assemble_cpu_seconds": [round(build["cpu_seconds"], 2) for build in builds],
        "throughput_ratio_median": round(ratio, 3),
        "idle_rss_mb": [round(build["idle_rss_kb"] / 1024, 1) for build in builds],
        "peak_rss_mb": [round(build["peak_kb"] / 1024, 1) for build in builds],
        "peak_reset_by_clear_refs": all(build["peak_reset"] for build in builds),
        "peak_rss_growth_mb": [round(value, 1) for value in growth_mb],
        "goals": {
            "throughput_ratio": {"goal": GOAL_RATIO, "met": ratio >= GOAL_RATIO},
            "peak_rss_growth_mb": {"goal": GOAL_RSS_GROWTH_MB, "met": max(growth_mb) <= GOAL_RSS_GROWTH_MB},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mean-mb", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
