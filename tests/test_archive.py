"""A batch's ZIP: safe entry names, streamed assembly, resumable downloads, crashes, expiry, failure."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pyvips
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from jobs import archive, processing, retention
from jobs.archive import PARTIAL_SUFFIX, ArchivePlan, assemble, plan_archive, safe_entry_name, unique_names
from jobs.batches import EXPIRING_ARCHIVES_KEY, PENDING_ARCHIVES_KEY, archive_job_id
from jobs.deps import WorkerDeps
from jobs.records import ArchiveSpec, BatchRecord, ImageRecord, InputInfo, OutputInfo
from jobs.settings import Settings
from jobs.worker import LOCK_MARGIN_SECONDS, archive_task_timeout
from server.children import child_process_options
from tests import imagegen
from tests.conftest import Partner, api_client, run_burst, with_settings, worker_deps
from tests.receiver import Receiver
from tests.test_batches import add_files, create_batch, get_batch, seal
from webhooks.messages import now_ms

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 30.0

# A worker process building one archive, as `arq jobs.worker.WorkerSettings` runs the job, except that it
# says so and hangs when it starts copying the second result: the test kills it there, mid-assembly.
BUILD_IN_A_CHILD = """
import asyncio, sys, threading
from jobs import archive
from jobs.queue import QueuePool
from jobs.settings import Settings
from jobs.worker import build_deps

copy_result = archive._copy_file
copies = []

def copy_until_the_second(*args):
    copies.append(args)
    if len(copies) == 2:
        print("copying the second result", flush=True)
        threading.Event().wait()
    copy_result(*args)

archive._copy_file = copy_until_the_second

async def main(redis_url, storage_url, batch_id):
    settings = Settings(redis_url=redis_url, storage_url=storage_url, public_url="http://testserver")
    deps = await build_deps(settings, QueuePool.connect(redis_url, settings.queue_name))
    await archive.build_archive(deps, batch_id, 1)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
async def deps(settings: Settings) -> AsyncIterator[WorkerDeps]:
    async with worker_deps(settings) as built:
        yield built


@pytest.mark.parametrize(
    ("filename", "suffix", "expected"),
    [
        ("../../etc/evil name.jpg", ".jpg", "evil name.jpg"),
        ("C:\\Users\\ann\\Küche.JPEG", ".jpg", "Küche.jpg"),
        ("..", ".jpg", "img_1.jpg"),
        (".htaccess", ".png", "htaccess.png"),
        ("...hidden..photo.png", ".png", "hidden.photo.png"),
        ("tab\there\x00\x1b[31m.jpg", ".jpg", "tab here[31m.jpg"),
        ("right-to-left\u202egpj.exe", ".jpg", "right-to-leftgpj.exe.jpg"),
        ('what?<is>:this|"*.webp', ".webp", "what__is__this___.webp"),
        ("CON.jpg", ".jpg", "img_1.jpg"),
        ("holiday.heic", ".jpg", "holiday.jpg"),
        ("scan.tiff", ".tiff", "scan.tiff"),
        ("no extension", ".jpg", "no extension.jpg"),
        ("", ".jpg", "img_1.jpg"),
        (None, ".jpg", "img_1.jpg"),
        ("x" * 300 + ".jpg", ".jpg", "x" * 120 + ".jpg"),
    ],
)
def test_entry_names_are_safe_to_extract(filename: str | None, suffix: str, expected: str) -> None:
    assert safe_entry_name(filename, "img_1", suffix) == expected


def test_entry_names_are_unique_ignoring_case() -> None:
    names = ["a.jpg", "A.jpg", "a.jpg", "a-2.jpg", "b.png", "_report.json"]
    assert unique_names(names) == ["a.jpg", "A-2.jpg", "a-3.jpg", "a-2-2.jpg", "b.png", "_report-2.json"]


def _image(tmp_path: Path, index: int, output_format: str, data: bytes) -> ImageRecord:
    key = f"img_{index}.out"
    (tmp_path / key).write_bytes(data)
    return ImageRecord(
        id=f"img_{index}",
        account_id="acc_1",
        status="completed",
        operations=[],
        input=InputInfo("jpeg", 10, 10, 1, 100, f"photo {index}.jpg"),
        original_key="unused",
        created_at="2026-01-02T03:04:05.000Z",
        output=OutputInfo(output_format, 10, 10, len(data), key),
        completed_at="2026-01-02T03:04:06.000Z",
    )


def _plan(tmp_path: Path, images: list[ImageRecord]) -> ArchivePlan:
    batch = BatchRecord(
        "bat_1",
        "acc_1",
        "2026-01-02T03:04:00.000Z",
        archive=ArchiveSpec(),
        completed_at="2026-01-02T03:05:00Z",
    )
    return plan_archive(batch, images, lambda key: tmp_path / key)


def _unzip_test(path: Path) -> None:
    """Info-ZIP's own check of every entry, headers and CRCs, where it is installed."""
    unzip = shutil.which("unzip")
    if unzip is not None:
        checked = subprocess.run([unzip, "-t", str(path)], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "No errors detected" in checked.stdout


@pytest.mark.parametrize("zip64", [False, True])
def test_assembly_stores_compressed_formats_and_deflates_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64: bool
) -> None:
    if zip64:
        # Tiny limits stand in for entries and archives over 2 GiB and for 65,535 entries.
        monkeypatch.setattr(archive, "ZIP64_LIMIT", 3000)
        monkeypatch.setattr(archive, "ZIP64_COUNT_LIMIT", 2)
    photo = os.urandom(5000)
    scan = b"II*\x00" + bytes(6000)  # compresses well, as TIFF pixels often do
    images = [_image(tmp_path, 1, "jpeg", photo), _image(tmp_path, 2, "tiff", scan)]
    destination = tmp_path / "out.zip"

    summary = assemble(
        _plan(tmp_path, images), destination, lambda suffix: tmp_path / f"x{suffix}", threading.Event()
    )

    assert summary.size == destination.stat().st_size and summary.files == 2 and summary.failed == 0
    with zipfile.ZipFile(destination) as archive_file:
        assert archive_file.testzip() is None
        stored, deflated = archive_file.getinfo("photo 1.jpg"), archive_file.getinfo("photo 2.tiff")
        assert stored.compress_type == zipfile.ZIP_STORED and stored.compress_size == len(photo)
        assert deflated.compress_type == zipfile.ZIP_DEFLATED and deflated.compress_size < len(scan) // 10
        assert stored.date_time == (2026, 1, 2, 3, 4, 6)
        assert (stored.external_attr >> 16) & 0o777 == 0o644
        assert archive_file.read("photo 1.jpg") == photo and archive_file.read("photo 2.tiff") == scan
        assert (stored.extract_version >= zipfile.ZIP64_VERSION) is zip64
        assert deflated.header_offset == len(photo) + 30 + len("photo 1.jpg") + 20 * zip64
        report = json.loads(archive_file.read("_report.json"))
    assert report["archived"] == 2 and report["failed"] == []
    assert (b"PK\x06\x06" in destination.read_bytes()) is zip64  # the ZIP64 end of central directory
    _unzip_test(destination)


def test_entry_names_keep_their_unicode(tmp_path: Path) -> None:
    image = _image(tmp_path, 1, "jpeg", b"data")
    image = image.evolve(input=InputInfo("jpeg", 10, 10, 1, 4, "Küche 北.jpg"))
    destination = tmp_path / "out.zip"
    assemble(_plan(tmp_path, [image]), destination, tmp_path.joinpath, threading.Event())
    with zipfile.ZipFile(destination) as archive_file:
        assert archive_file.namelist() == ["Küche 北.jpg", "_report.json"]
    _unzip_test(destination)


def test_a_stopped_assembly_leaves_no_file(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    destination = tmp_path / "out.zip"
    with pytest.raises(archive.AssemblyStopped):
        assemble(_plan(tmp_path, [_image(tmp_path, 1, "jpeg", b"x")]), destination, tmp_path.joinpath, stop)
    assert not destination.exists()


def test_a_missing_result_is_reported_not_archived(tmp_path: Path) -> None:
    images = [_image(tmp_path, 1, "jpeg", b"one"), _image(tmp_path, 2, "jpeg", b"two")]
    (tmp_path / "img_1.out").unlink()
    destination = tmp_path / "out.zip"
    assemble(_plan(tmp_path, images), destination, tmp_path.joinpath, threading.Event())
    with zipfile.ZipFile(destination) as archive_file:
        assert archive_file.namelist() == ["photo 2.jpg", "_report.json"]
        report = json.loads(archive_file.read("_report.json"))
    assert [(f["image_id"], f["error"]["code"]) for f in report["failed"]] == [("img_1", "output_missing")]


async def built_batch(
    client: httpx.AsyncClient, account: Partner, settings: Settings, count: int = 3, **body: Any
) -> dict[str, Any]:
    batch_id = (await create_batch(client, account, **body))["id"]
    named = [(f"photo-{n}.jpg", imagegen.jpeg(64 + n, 48)) for n in range(count)]
    assert (await add_files(client, account, batch_id, named)).status_code == 202
    assert (await seal(client, account, batch_id)).status_code == 200
    await run_burst(settings)
    return await get_batch(client, account, batch_id)


async def test_range_requests_resume_a_download(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch = await built_batch(client, account, settings, archive=True)
    url = batch["archive"]["url"]
    whole = await client.get(url, headers=account.headers)
    assert whole.status_code == 200
    full, size, etag = whole.content, len(whole.content), whole.headers["etag"]
    assert whole.headers["accept-ranges"] == "bytes" and int(whole.headers["content-length"]) == size
    assert etag.startswith('"') and len(etag) == 34

    async def ranged(value: str, **headers: str) -> httpx.Response:
        return await client.get(url, headers={**account.headers, "Range": value, **headers})

    middle = await ranged("bytes=10-19")
    assert middle.status_code == 206 and middle.content == full[10:20]
    assert middle.headers["content-range"] == f"bytes 10-19/{size}"
    assert middle.headers["content-length"] == "10" and middle.headers["etag"] == etag
    assert (await ranged("bytes=-22")).content == full[-22:]  # the end-of-central-directory record
    assert (await ranged("bytes=100-")).content == full[100:]
    assert (await ranged(f"bytes=0-{size * 2}")).content == full

    for unsatisfiable in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"):
        refused = await ranged(unsatisfiable)
        assert refused.status_code == 416, unsatisfiable
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["content-range"] == f"bytes */{size}"

    assert (await ranged("bytes=10-19", **{"If-Range": etag})).status_code == 206
    changed = await ranged("bytes=10-19", **{"If-Range": '"another-build"'})
    assert changed.status_code == 200 and changed.content == full


async def test_an_archive_can_reencode_the_results(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch = await built_batch(client, account, settings, count=2, archive={"format": "png"})
    download = await client.get(batch["archive"]["url"], headers=account.headers)
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_file:
        assert sorted(archive_file.namelist()) == ["_report.json", "photo-0.png", "photo-1.png"]
        decoded = pyvips.Image.new_from_buffer(archive_file.read("photo-1.png"), "")
    assert decoded.get("vips-loader") == "pngload_buffer"
    assert (decoded.width, decoded.height) == (65, 48)


async def test_a_worker_killed_mid_assembly_leaves_no_archive_and_the_rerun_builds_it(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps
) -> None:
    batch_id = (await create_batch(client, account, archive=True))["id"]
    named = [(f"photo-{n}.jpg", imagegen.jpeg(64, 48 + n)) for n in range(3)]
    image_ids = [image["id"] for image in (await add_files(client, account, batch_id, named)).json()["data"]]
    for image_id in image_ids:
        await processing.process_image(deps, image_id, 1)
    await seal(client, account, batch_id)  # completes it and enqueues the build, which no worker runs yet
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", BUILD_IN_A_CHILD, settings.redis_url, settings.storage_url, batch_id),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **child_process_options(),
    )
    assert child.stdout is not None
    try:
        said = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the worker dies mid-archive
        output, _ = await child.communicate()
    assert said == b"copying the second result\n", said + output

    batch = await get_batch(client, account, batch_id)
    assert batch["archive"]["status"] == "building" and batch["archive"]["url"] is None
    response = await client.get(f"/v1/batches/{batch_id}/archive", headers=account.headers)
    assert response.status_code == 409
    assert not deps.storage.path(f"{account.id}/batches/{batch_id}/archive.zip").exists()
    (partial,) = deps.storage.new_staging_path().parent.glob(f"*{PARTIAL_SUFFIX}")
    assert partial.stat().st_size > 0  # the first entry was written before the kill

    await archive.build_archive(deps, batch_id, 2)  # arq's re-run of the job

    download = await client.get(f"/v1/batches/{batch_id}/archive", headers=account.headers)
    assert download.status_code == 200
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_file:
        assert sorted(archive_file.namelist()) == [
            "_report.json",
            "photo-0.jpg",
            "photo-1.jpg",
            "photo-2.jpg",
        ]
        second = await deps.store.get_image(image_ids[1])
        assert second is not None and second.output is not None
        assert archive_file.read("photo-1.jpg") == deps.storage.path(second.output.key).read_bytes()

    # What the killed worker left is removed by the sweep once no build could still be writing it.
    old = time.time() - 3 * settings.archive_timeout
    os.utime(partial, (old, old))
    await retention.sweep_expired(deps)
    assert not partial.exists()


async def test_an_archive_that_cannot_be_written_is_announced_failed(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps, receiver: Receiver
) -> None:
    batch_id = (await create_batch(client, account, archive=True, callback_url=receiver.url))["id"]
    (image,) = (await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())])).json()["data"]
    await processing.process_image(deps, image["id"], 1)
    await seal(client, account, batch_id)
    staging = deps.storage.new_staging_path().parent
    staging.rename(staging.with_name("moved"))
    staging.write_bytes(b"not a directory")  # every write into staging now fails
    try:
        await archive.build_archive(deps, batch_id, 1)
    finally:
        staging.unlink()
        staging.with_name("moved").rename(staging)
    await deps.dispatcher.run_until_idle()

    failed, completed = sorted(await receiver.arrivals(2), key=lambda d: d.event["type"])
    assert completed.event["type"] == "batch.completed"
    assert failed.event["type"] == "batch.archive.failed"
    assert failed.event["data"]["archive"]["status"] == "failed"
    assert failed.event["data"]["archive"]["error"]["code"] == "archive_failed"
    response = await client.get(f"/v1/batches/{batch_id}/archive", headers=account.headers)
    assert response.status_code == 409 and response.json()["code"] == "archive_failed"

    await archive.build_archive(deps, batch_id, 1)  # a late re-run changes nothing
    await deps.dispatcher.run_until_idle()
    assert len(receiver.deliveries) == 2


async def test_an_archive_its_final_place_refuses_is_announced_failed_not_left_building(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps, receiver: Receiver
) -> None:
    """Written, then refused where it must appear (a directory stands there): raised to arq, the job
    failed for good and arq's kept result held off the sweep's re-enqueue for an hour, the archive
    `building` all the while."""
    batch_id = (await create_batch(client, account, archive=True, callback_url=receiver.url))["id"]
    (image,) = (await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())])).json()["data"]
    await processing.process_image(deps, image["id"], 1)
    await seal(client, account, batch_id)
    final_place = deps.storage.path(f"{account.id}/batches/{batch_id}/archive.zip")
    (final_place / "occupied").mkdir(parents=True)

    await archive.build_archive(deps, batch_id, 1)
    await deps.dispatcher.run_until_idle()

    failed, _ = sorted(await receiver.arrivals(2), key=lambda d: d.event["type"])
    assert failed.event["type"] == "batch.archive.failed"
    assert failed.event["data"]["archive"]["error"]["code"] == "archive_failed"
    assert list(deps.storage.new_staging_path().parent.iterdir()) == []


async def test_archives_expire_after_their_ttl_and_the_sweep_deletes_them(
    account: Partner, settings: Settings, redis: Redis
) -> None:
    expiring = with_settings(settings, archive_ttl=0.0)
    async with api_client(expiring) as client:
        batch = await built_batch(client, account, expiring, count=1, archive=True)
        assert batch["archive"]["status"] == "expired" and batch["archive"]["url"] is None
        response = await client.get(f"/v1/batches/{batch['id']}/archive", headers=account.headers)
        assert response.status_code == 410 and response.json()["code"] == "archive_expired"
        stored = expiring.storage_root / account.id / "batches" / batch["id"] / "archive.zip"
        assert stored.exists()

        async with worker_deps(expiring) as deps:
            await archive.sweep_archives(deps)

        assert not stored.exists()
        assert await redis.zcard(EXPIRING_ARCHIVES_KEY) == 0
        assert (await get_batch(client, account, batch["id"]))["archive"]["status"] == "expired"


async def test_the_sweep_enqueues_a_build_whose_enqueue_was_lost(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps, redis: Redis
) -> None:
    batch_id = (await create_batch(client, account, archive=True))["id"]
    (image,) = (await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())])).json()["data"]
    await processing.process_image(deps, image["id"], 1)
    await seal(client, account, batch_id)
    # As if the process that completed the batch died before enqueueing the build, a while ago.
    job = archive_job_id(batch_id)
    await redis.zrem(settings.queue_name, job)
    await redis.delete(f"arq:job:{job}")
    await redis.zadd(PENDING_ARCHIVES_KEY, {batch_id: now_ms() - 120_000})

    await archive.sweep_archives(deps)
    await run_burst(settings)

    assert (await get_batch(client, account, batch_id))["archive"]["status"] == "ready"
    assert await redis.zcard(PENDING_ARCHIVES_KEY) == 0


async def test_an_archive_job_is_locked_for_its_own_time_limit_not_the_sweeps(
    account: Partner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies mid-build leaves the job locked, and the build runs again once the lock
    expires: DARKROOM_ARCHIVE_TIMEOUT + 40 s after it started. arq locks every job for its longest
    task's limit, and a cron without its own limit counts as arq's default 300 s: with a 20 s archive
    limit, a killed build waited 310 s."""
    quick = with_settings(settings, archive_timeout=20.0)
    locks_ms: list[int] = []
    build = archive.build_archive

    async def observed(deps: WorkerDeps, batch_id: str, job_try: int) -> None:
        locks_ms.append(await deps.redis.pttl(in_progress_key_prefix + archive_job_id(batch_id)))
        await build(deps, batch_id, job_try)

    monkeypatch.setattr(archive, "build_archive", observed)
    async with api_client(quick) as client:
        batch = await built_batch(client, account, quick, count=1, archive=True)
    assert batch["archive"]["status"] == "ready"
    (lock_ms,) = locks_ms
    assert (
        quick.archive_timeout * 1000 < lock_ms <= (archive_task_timeout(quick) + LOCK_MARGIN_SECONDS) * 1000
    )
