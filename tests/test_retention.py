"""Retention: images, their files and index entries, batches and staging leftovers do not pile up."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobs import retention
from jobs.batches import EXPIRING_ARCHIVES_KEY, account_batches_key
from jobs.deps import WorkerDeps
from jobs.records import epoch_ms
from jobs.settings import Settings
from jobs.store import EXPIRING_BATCHES_KEY, EXPIRING_IMAGES_KEY, image_key
from tests import imagegen
from tests.conftest import Partner, api_client, on_s3, run_burst, with_settings, worker_deps
from tests.receiver import Receiver
from tests.s3server import S3Server
from tests.test_batches import add_files, create_batch, get_batch, seal
from tests.test_processes import poll
from tests.test_spine import upload

HOUR = 3600


@pytest.fixture
async def deps(settings: Settings) -> AsyncIterator[WorkerDeps]:
    async with worker_deps(settings) as built:
        yield built


async def get_image(client: httpx.AsyncClient, account: Partner, image_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/images/{image_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    image: dict[str, Any] = response.json()
    return image


async def listed_ids(client: httpx.AsyncClient, account: Partner) -> list[str]:
    return [each["id"] for each in (await client.get("/v1/images", headers=account.headers)).json()["data"]]


async def test_an_image_past_its_retention_is_swept_with_its_files_and_index_entries(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    deps: WorkerDeps,
    redis: Redis,
    receiver: Receiver,
) -> None:
    short = await upload(client, account, imagegen.jpeg(), retention=str(HOUR), callback_url=receiver.url)
    kept = await upload(client, account, imagegen.jpeg())
    assert short.status_code == kept.status_code == 202, short.text
    short_id, kept_id = short.json()["id"], kept.json()["id"]
    await run_burst(settings)
    image = await get_image(client, account, short_id)
    assert epoch_ms(image["expires_at"]) == epoch_ms(image["created_at"]) + HOUR * 1000
    default = await get_image(client, account, kept_id)
    assert (
        epoch_ms(default["expires_at"]) == epoch_ms(default["created_at"]) + settings.image_retention * 1000
    )
    variant = await client.get(f"/v1/images/{short_id}/output?format=png&width=8", headers=account.headers)
    assert variant.status_code == 200
    folder = settings.storage_root / account.id / short_id
    assert len(list(folder.iterdir())) == 3  # original, output, the variant
    (announced,) = await receiver.arrivals(1)

    assert (await retention.sweep_expired(deps)).images == 0  # not yet due
    outcome = await retention.sweep_expired(deps, epoch_ms(image["expires_at"]))

    assert outcome.images == 1
    assert not folder.exists()
    assert await redis.get(image_key(short_id)) is None
    assert await redis.zscore(f"dr:account:{account.id}:images", short_id) is None
    assert await redis.zscore(EXPIRING_IMAGES_KEY, short_id) is None
    for path in ("", "/output", "/original"):
        response = await client.get(f"/v1/images/{short_id}{path}", headers=account.headers)
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert await listed_ids(client, account) == [kept_id]
    assert (await get_image(client, account, kept_id))["status"] == "completed"
    # Its webhook message keeps DARKROOM_WEBHOOK_RETENTION.
    message = await client.get(f"/v1/deliveries/{announced.headers['webhook-id']}", headers=account.headers)
    assert message.status_code == 200 and message.json()["status"] == "delivered"


async def test_an_image_past_its_expiry_answers_404_before_the_sweep_comes(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    image_id = (await upload(client, account, imagegen.jpeg())).json()["id"]
    stored = (await redis.get(image_key(image_id))).decode()
    expires_at = (await get_image(client, account, image_id))["expires_at"]
    await redis.set(image_key(image_id), stored.replace(expires_at, "2020-01-01T00:00:00.000Z"))

    for method, path in (("GET", ""), ("GET", "/original"), ("DELETE", "")):
        response = await client.request(method, f"/v1/images/{image_id}{path}", headers=account.headers)
        assert response.status_code == 404, (method, path)
    assert await listed_ids(client, account) == []


@pytest.mark.parametrize(
    "retention_field",
    [
        "59",
        str(HOUR - 1),
        str(30 * 24 * HOUR + 1),
        "1h",
        "-3600",
        "3600.5",
        "\uff13\uff16\uff10\uff10",
        "9" * 5000,
    ],
)
async def test_a_retention_outside_its_bounds_is_refused_by_name(
    client: httpx.AsyncClient, account: Partner, redis: Redis, retention_field: str
) -> None:
    response = await upload(client, account, imagegen.jpeg(), retention=retention_field)
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error == {"field": "retention", "message": "must be whole seconds from 3600 to 2592000"}
    assert await redis.zcard(EXPIRING_IMAGES_KEY) == 0


async def test_a_batch_goes_with_its_last_image_and_takes_its_archive(
    account: Partner, settings: Settings, redis: Redis
) -> None:
    """Each image expires on its own (the batch's counts move as for a DELETE); the batch, its indexes
    and its ZIP go once its last image has. Two sweeps at once delete each thing once."""
    two_hours = with_settings(settings, image_retention=2 * HOUR)
    async with api_client(two_hours) as client, worker_deps(two_hours) as deps:
        batch_id = (await create_batch(client, account, archive=True))["id"]
        early = await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())], retention=str(HOUR))
        late = await add_files(
            client, account, batch_id, [("b.jpg", imagegen.jpeg()), ("c.jpg", imagegen.jpeg())]
        )
        assert early.status_code == late.status_code == 202
        latest = max(each["expires_at"] for each in late.json()["data"])
        assert (await get_batch(client, account, batch_id))["expires_at"] == latest
        await seal(client, account, batch_id)
        await run_burst(two_hours)
        batch = await get_batch(client, account, batch_id)
        assert batch["archive"]["status"] == "ready"
        zip_path = two_hours.storage_root / account.id / "batches" / batch_id / "archive.zip"
        assert zip_path.exists()
        (early_image,) = early.json()["data"]
        first_due = epoch_ms(early_image["expires_at"])

        outcomes = await asyncio.gather(*(retention.sweep_expired(deps, first_due) for _ in range(2)))
        assert sum(each.batches for each in outcomes) == 0
        batch = await get_batch(client, account, batch_id)
        assert batch["counts"] == {"total": 2, "queued": 0, "processing": 0, "completed": 2, "failed": 0}
        assert (await client.get(batch["archive"]["url"], headers=account.headers)).status_code == 200

        outcomes = await asyncio.gather(*(retention.sweep_expired(deps, epoch_ms(latest)) for _ in range(2)))

        assert sum(each.batches for each in outcomes) == 1
        response = await client.get(f"/v1/batches/{batch_id}", headers=account.headers)
        assert response.status_code == 404
        assert not zip_path.parent.exists()
        assert await redis.keys("dr:batch:*") == []
        assert await redis.keys("dr:image:*") == []
        assert await redis.zcard(account_batches_key(account.id)) == 0
        assert await redis.zcard(f"dr:account:{account.id}:images") == 0
        for listing in (EXPIRING_IMAGES_KEY, EXPIRING_BATCHES_KEY, EXPIRING_ARCHIVES_KEY):
            assert await redis.zcard(listing) == 0, listing
        assert [p for p in (two_hours.storage_root / account.id).rglob("*") if p.is_file()] == []


async def test_an_empty_batch_expires_after_the_retention_from_its_creation(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps
) -> None:
    batch = await create_batch(client, account)
    due = epoch_ms(batch["created_at"]) + settings.image_retention * 1000
    assert epoch_ms(batch["expires_at"]) == due
    assert (await retention.sweep_expired(deps, due - 1)).batches == 0
    assert (await retention.sweep_expired(deps, due)).batches == 1
    assert (await client.get(f"/v1/batches/{batch['id']}", headers=account.headers)).status_code == 404


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_the_sweep_removes_staging_leftovers_but_never_a_file_being_written(
    settings: Settings, deps: WorkerDeps
) -> None:
    longest_job = max(settings.job_timeout, settings.archive_timeout)
    left_behind = deps.storage.new_staging_path(".jpg")
    being_written = deps.storage.new_staging_path(".png")
    upload_in_progress, handle = deps.storage.open_staging()
    handle.close()
    for path in (left_behind, being_written):
        path.write_bytes(b"pixels")
    _age(left_behind, 2 * longest_job + 60)
    _age(being_written, longest_job + 60)  # a job that ran its whole time limit, and then some

    assert (await retention.sweep_expired(deps)).staging_files == 1

    assert not left_behind.exists()
    assert being_written.exists() and upload_in_progress.exists()


async def test_a_web_process_sweeps_its_own_scratch_folder(settings: Settings, s3_server: S3Server) -> None:
    """A web process on a machine of its own (S3 storage, no worker sharing its data directory): what a
    killed upload, or the originals it kept for a local worker before a restart, left in its scratch
    folder goes by the workers' rule, as nobody else sweeps it."""
    web_settings = on_s3(settings, s3_server)
    staging = web_settings.data_dir / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    longest_job = max(settings.job_timeout, settings.archive_timeout)
    left_behind = staging / "handoff-kept-before-a-restart"
    being_written = staging / "an-upload-under-way"
    for path in (left_behind, being_written):
        path.write_bytes(b"pixels")
    _age(left_behind, 2 * longest_job + 60)
    _age(being_written, longest_job + 60)

    async with api_client(web_settings):
        await asyncio.to_thread(poll, lambda: not left_behind.exists(), "the leftover swept", timeout=10)

    assert being_written.exists()


async def test_a_sweep_killed_midway_leaves_the_rest_for_the_next_one(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    deps: WorkerDeps,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = (await upload(client, account, imagegen.jpeg())).json()
    due = epoch_ms(image["expires_at"])

    async def killed(*_: object) -> None:
        raise asyncio.CancelledError  # as when arq cancels the sweep at its time limit

    with monkeypatch.context() as patched:
        patched.setattr(deps.store, "delete_image", killed)
        with pytest.raises(asyncio.CancelledError):
            await retention.sweep_expired(deps, due)
    assert not (settings.storage_root / account.id / image["id"]).exists()  # the files went first
    assert await redis.zscore(EXPIRING_IMAGES_KEY, image["id"]) == due  # so it is still listed

    assert (await retention.sweep_expired(deps, due)).images == 1
    assert await redis.get(image_key(image["id"])) is None
    assert await redis.zcard(f"dr:account:{account.id}:images") == 0
