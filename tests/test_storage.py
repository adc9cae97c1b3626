"""The storage interface on both backends: the local folder and a real S3 API server (moto's)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from jobs.s3storage import HANDOFF_MAX_AGE_SECONDS, HANDOFF_TAKER_SILENT_SECONDS, S3Storage
from jobs.settings import MIN_S3_PART_BYTES, Settings
from jobs.storage import BlobMissing, BlobStorage, StorageUnavailable, open_storage
from tests.conftest import on_s3
from tests.s3server import CREDENTIALS, REGION, Outage, S3Server


@pytest.fixture
async def storage(any_storage_settings: Settings) -> AsyncIterator[BlobStorage]:
    opened = await open_storage(replace(any_storage_settings, s3_part_size=MIN_S3_PART_BYTES))
    yield opened
    await opened.close()


def staged_file(storage: BlobStorage, data: bytes) -> Path:
    path, sink = storage.open_staging()
    with sink:
        sink.write(data)
    return path


async def test_a_stored_file_reads_back_whole_and_in_ranges(storage: BlobStorage) -> None:
    data = os.urandom(300_000)
    staged = staged_file(storage, data)
    await storage.put_file(staged, "acc_1/img_1/original")
    assert not staged.exists()  # consumed
    info = await storage.stat("acc_1/img_1/original")
    assert info is not None and info.size == len(data)
    async with storage.local_copy("acc_1/img_1/original") as copy:
        assert copy.read_bytes() == data
    assert await storage.read_head("acc_1/img_1/original", 16) == data[:16]
    info, chunks = await storage.stream("acc_1/img_1/original", 1000, 1999)
    assert b"".join([chunk async for chunk in chunks]) == data[1000:2000]
    assert info.size == len(data)


async def test_a_file_over_one_part_arrives_whole(storage: BlobStorage) -> None:
    data = os.urandom(2 * MIN_S3_PART_BYTES + 12345)
    await storage.put_file(staged_file(storage, data), "acc_1/img_2/original")
    async with storage.local_copy("acc_1/img_2/original") as copy:
        assert copy.read_bytes() == data


async def test_a_file_of_exactly_one_part_arrives_whole_and_is_consumed(storage: BlobStorage) -> None:
    data = os.urandom(MIN_S3_PART_BYTES)
    staged = staged_file(storage, data)
    await storage.put_file(staged, "acc_1/img_13/original")
    assert not staged.exists()
    async with storage.local_copy("acc_1/img_13/original") as copy:
        assert copy.read_bytes() == data


async def test_a_blob_read_whole_is_held_in_memory_up_to_one_part(
    any_storage_settings: Settings, storage: BlobStorage
) -> None:
    small, large = os.urandom(300_000), os.urandom(MIN_S3_PART_BYTES + 1)
    await storage.put_file(staged_file(storage, small), "acc_1/img_11/original")
    await storage.put_file(staged_file(storage, large), "acc_1/img_12/original")
    async with storage.source("acc_1/img_11/original") as held:
        if any_storage_settings.uses_s3:
            assert held == small  # no scratch copy to write and read back
        else:
            assert isinstance(held, Path) and held.read_bytes() == small  # the blob itself
    async with storage.source("acc_1/img_12/original") as spilled:
        assert isinstance(spilled, Path) and spilled.read_bytes() == large
    if any_storage_settings.uses_s3:
        assert not spilled.exists()  # the scratch copy went with the context
    with pytest.raises(BlobMissing):
        async with storage.source("acc_1/img_19/original"):
            pass


async def test_a_missing_blob_says_so(storage: BlobStorage) -> None:
    assert await storage.stat("acc_1/img_9/original") is None
    with pytest.raises(BlobMissing):
        async with storage.local_copy("acc_1/img_9/original") as copy:
            copy.read_bytes()


async def test_delete_tree_removes_every_blob_under_the_prefix(storage: BlobStorage) -> None:
    for name in ("original", "output.jpg", "variants/a.webp"):
        await storage.put_file(staged_file(storage, b"x" * 10), f"acc_1/img_3/{name}")
    await storage.put_file(staged_file(storage, b"kept"), "acc_1/img_30/original")
    await storage.delete_tree("acc_1/img_3")
    for name in ("original", "output.jpg", "variants/a.webp"):
        assert await storage.stat(f"acc_1/img_3/{name}") is None
    assert await storage.stat("acc_1/img_30/original") is not None


async def test_a_streamed_write_lands_only_on_commit(storage: BlobStorage) -> None:
    data = os.urandom(MIN_S3_PART_BYTES + 5000)
    writer = storage.open_writer("acc_1/img_4/original")
    for start in range(0, len(data), 64 * 1024):
        await writer.write(data[start : start + 64 * 1024])
    assert await storage.stat("acc_1/img_4/original") is None
    await writer.commit()
    async with storage.local_copy("acc_1/img_4/original") as copy:
        assert copy.read_bytes() == data


async def test_an_aborted_write_leaves_no_blob_and_no_pending_upload(
    any_storage_settings: Settings, storage: BlobStorage
) -> None:
    writer = storage.open_writer("acc_1/img_5/original")
    await writer.write(os.urandom(MIN_S3_PART_BYTES + 1))  # one part sent already
    await writer.abort()
    assert await storage.stat("acc_1/img_5/original") is None
    if any_storage_settings.uses_s3:
        assert await storage.abort_stale_uploads(time.time() + 60) == 0


async def test_the_sweep_aborts_uploads_that_killed_processes_left(
    any_storage_settings: Settings, storage: BlobStorage
) -> None:
    writer = storage.open_writer("acc_1/img_6/original")
    await writer.write(os.urandom(MIN_S3_PART_BYTES + 1))  # then its process "dies"
    # (moto reports every upload as initiated in 2010, so "too recent to abort" cannot be shown here.)
    # A local upload is a staging file, which remove_staged_before takes.
    assert await storage.abort_stale_uploads(time.time() + 60) == (1 if any_storage_settings.uses_s3 else 0)
    await writer.abort()


async def test_the_sweep_takes_no_such_upload_for_none_in_progress(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3-compatible server that answers ListMultipartUploads on a bucket with none in progress by
    NoSuchUpload (rclone's `serve s3` does) leaves the sweep nothing to abort, not an error."""

    async def no_such_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = (
            b"<Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist.</Message></Error>"
        )
        head = (
            f"HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = await asyncio.start_server(no_such_upload, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoint = replace(
        settings,
        storage_url="s3://bucket/darkroom",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_region=REGION,
    )
    storage = await open_storage(endpoint)
    try:
        assert await storage.abort_stale_uploads(time.time() + 60) == 0
    finally:
        await storage.close()
        server.close()


async def test_a_presigned_post_lands_a_file_within_its_size_range(
    settings: Settings, s3_server: S3Server
) -> None:
    storage = await open_storage(on_s3(settings, s3_server))
    try:
        form = await storage.presign_post("acc_1/upl_1/original", max_bytes=1000, expires_in=60)
        assert form is not None
        async with httpx.AsyncClient() as http:
            landed = await http.post(form.url, data=form.fields, files={"file": ("a.jpg", b"y" * 500)})
            assert landed.status_code in (200, 204), landed.text
            info = await storage.stat("acc_1/upl_1/original")
            assert info is not None and info.size == 500
        # S3 refuses a file outside the signed policy's range (EntityTooLarge); moto does not enforce
        # policies, so the signed condition itself is checked here.
        policy = json.loads(base64.b64decode(form.fields["policy"]))
        assert ["content-length-range", 1, 1000] in policy["conditions"]
    finally:
        await storage.close()


async def test_local_storage_presigns_nothing(settings: Settings) -> None:
    storage = await open_storage(settings)
    assert await storage.presign_post("acc_1/upl_1/original", 1000, 60) is None
    assert await storage.presigned_get("acc_1/upl_1/original", 60, "a.jpg", "image/jpeg") is None


async def test_readiness_check_fails_while_the_s3_server_cannot_be_reached(
    settings: Settings, s3_server: S3Server
) -> None:
    outage = await Outage(s3_server).start()
    storage = await open_storage(replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url))
    try:
        assert await storage.check() == "ok"
        outage.cut()
        assert (await storage.check()).startswith("unreachable")
        outage.restore()
        assert await storage.check() == "ok"
    finally:
        await storage.close()
        await outage.stop()


async def test_a_missing_bucket_is_the_storage_unavailable_not_a_missing_blob(
    settings: Settings, s3_server: S3Server
) -> None:
    # S3 answers 404 NoSuchBucket: taken for a missing blob, a worker would fail the image as
    # original_missing instead of waiting for the storage to be put right.
    storage = await open_storage(
        replace(
            settings,
            storage_url="s3://no-such-bucket/darkroom",
            s3_endpoint_url=s3_server.url,
            s3_region=REGION,
        )
    )
    try:
        with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
            await storage.stream("acc_1/img_1/original")
        with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
            await storage.put_file(staged_file(storage, b"bytes"), "acc_1/img_1/original")
        # /readyz says what to do, where HeadBucket's bare 404 said only "Not Found".
        assert (
            await storage.check() == "unreachable: there is no bucket named no-such-bucket; create it first"
        )
    finally:
        await storage.close()


@pytest.fixture
async def web_and_worker_storage(
    settings: Settings, s3_server: S3Server
) -> AsyncIterator[tuple[S3Storage, S3Storage, Outage]]:
    """A web's and a worker's storage sharing one data directory (as the Procfile runs them), on a
    bucket behind a relay that can cut it off."""
    outage = await Outage(s3_server).start()
    on_bucket = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    web, worker = await open_storage(on_bucket), await open_storage(on_bucket)
    assert isinstance(web, S3Storage) and isinstance(worker, S3Storage)
    await worker.take_handoffs()  # as a worker process does at its start
    yield web, worker, outage
    await web.close()
    await worker.close()
    await outage.stop()


async def store_and_hand_off(web: S3Storage, data: bytes, key: str) -> None:
    """As the web stores an upload: sent while it arrives, the staged copy handed off once committed."""
    staged = staged_file(web, data)
    writer = web.open_writer(key)
    await writer.write(data)
    await writer.commit()
    await web.hand_off(staged, key, len(data))
    assert not staged.exists()


async def test_a_worker_on_the_webs_machine_reads_a_handed_off_original_without_the_bucket(
    web_and_worker_storage: tuple[S3Storage, S3Storage, Outage],
) -> None:
    web, worker, outage = web_and_worker_storage
    data = os.urandom(300_000)
    await store_and_hand_off(web, data, "acc_1/img_1/original")
    outage.cut()
    async with worker.source("acc_1/img_1/original") as taken:
        assert isinstance(taken, Path) and taken.read_bytes() == data
    assert not taken.exists()
    # Taken once: a re-run of the job fetches the original from the bucket.
    with pytest.raises(StorageUnavailable):
        async with worker.source("acc_1/img_1/original"):
            pass
    outage.restore()
    async with worker.source("acc_1/img_1/original") as fetched:
        assert fetched == data


async def test_handed_off_originals_are_kept_newest_first_up_to_the_budget(
    web_and_worker_storage: tuple[S3Storage, S3Storage, Outage],
) -> None:
    web, worker, outage = web_and_worker_storage
    web.handoff_budget_bytes = 250_000
    originals = {f"acc_1/img_{n}/original": os.urandom(100_000) for n in range(3)}
    for key, data in originals.items():
        await store_and_hand_off(web, data, key)
    outage.cut()
    oldest, *newest = originals
    with pytest.raises(StorageUnavailable):  # removed for the newer ones: only the bucket has it
        async with worker.source(oldest):
            pass
    for key in newest:
        async with worker.source(key) as taken:
            assert isinstance(taken, Path) and taken.read_bytes() == originals[key]


async def test_an_original_handed_off_again_by_a_job_run_again_counts_once(
    web_and_worker_storage: tuple[S3Storage, S3Storage, Outage],
) -> None:
    web, worker, outage = web_and_worker_storage
    web.handoff_budget_bytes = 250_000
    rerun, other = os.urandom(100_000), os.urandom(100_000)
    for _ in range(2):
        await store_and_hand_off(web, rerun, "acc_1/img_1/original")
    await store_and_hand_off(web, other, "acc_1/img_2/original")
    outage.cut()
    for key, data in (("acc_1/img_1/original", rerun), ("acc_1/img_2/original", other)):
        async with worker.source(key) as taken:
            assert isinstance(taken, Path) and taken.read_bytes() == data


async def test_a_deleted_image_leaves_no_handed_off_original(
    web_and_worker_storage: tuple[S3Storage, S3Storage, Outage],
) -> None:
    web, worker, _ = web_and_worker_storage
    await store_and_hand_off(web, b"photo", "acc_1/img_1/original")
    await store_and_hand_off(web, b"photo", "acc_1/img_2/original")
    await web.delete_tree("acc_1/img_1")
    await web.delete("acc_1/img_2/original")
    for key in ("acc_1/img_1/original", "acc_1/img_2/original"):
        with pytest.raises(BlobMissing):
            async with worker.source(key):
                pass


def handed_off_files(settings: Settings) -> list[str]:
    return [name for name in os.listdir(settings.data_dir / ".staging") if name.startswith("handoff-")]


async def test_a_web_keeps_no_original_where_no_worker_said_lately_it_is_there(
    settings: Settings, s3_server: S3Server
) -> None:
    """A web on a machine of its own (its workers elsewhere) keeps nothing no one would take."""
    on_bucket = on_s3(settings, s3_server)
    web, worker = await open_storage(on_bucket), await open_storage(on_bucket)
    try:
        assert isinstance(web, S3Storage)
        await store_and_hand_off(web, b"photo", "acc_1/img_1/original")
        assert handed_off_files(settings) == []

        await worker.take_handoffs()
        await worker.close()  # a worker that stopped, or hung, says no more
        await store_and_hand_off(web, b"photo", "acc_1/img_2/original")
        assert len(handed_off_files(settings)) == 1
        (mark,) = set(os.listdir(settings.data_dir / ".staging")) - set(handed_off_files(settings))
        silent_since = time.time() - HANDOFF_TAKER_SILENT_SECONDS - 1
        os.utime(settings.data_dir / ".staging" / mark, (silent_since, silent_since))
        await store_and_hand_off(web, b"photo", "acc_1/img_3/original")
        assert len(handed_off_files(settings)) == 1
    finally:
        await web.close()
        await worker.close()


async def test_an_original_no_worker_took_in_minutes_is_swept_long_before_the_scratch_rule(
    web_and_worker_storage: tuple[S3Storage, S3Storage, Outage], settings: Settings
) -> None:
    """In time for a worker here to take it, but not kept for the scratch folder's hours: most were
    rendered by workers elsewhere, and an image deleted through another web leaves its copy here."""
    web, _, _ = web_and_worker_storage
    await store_and_hand_off(web, b"photo", "acc_1/img_1/original")
    await store_and_hand_off(web, b"photo", "acc_1/img_2/original")
    stale, fresh = sorted(handed_off_files(settings))
    untaken_since = time.time() - HANDOFF_MAX_AGE_SECONDS - 1
    os.utime(settings.data_dir / ".staging" / stale, (untaken_since, untaken_since))
    assert web.remove_staged_before(time.time() - 7200) == 1
    assert handed_off_files(settings) == [fresh]


async def test_no_original_is_handed_off_when_the_disk_is_short_of_room_for_uploads(
    settings: Settings, s3_server: S3Server
) -> None:
    short_of_room = replace(on_s3(settings, s3_server), min_free_bytes=2**62)
    web, worker = await open_storage(short_of_room), await open_storage(short_of_room)
    try:
        assert isinstance(web, S3Storage)
        await worker.take_handoffs()
        await store_and_hand_off(web, b"photo", "acc_1/img_1/original")
        assert handed_off_files(settings) == []
        async with worker.source("acc_1/img_1/original") as fetched:
            assert fetched == b"photo"
    finally:
        await web.close()
        await worker.close()
