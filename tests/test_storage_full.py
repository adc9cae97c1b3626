"""A full disk under DARKROOM_DATA_DIR (a real one: a small tmpfs): uploads get a 507 and keep nothing,
readiness says so, and the worker waits for room instead of failing the image or blaming its file."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.worker import Retry, Worker

from jobs import processing
from jobs.batches import archive_job_id
from jobs.deps import WorkerDeps
from jobs.queue import process_job_id
from jobs.settings import Settings
from jobs.worker import build_archive, process_image
from tests import imagegen
from tests.conftest import Partner, api_client, with_settings, worker_deps
from tests.test_batches import add_files, create_batch, get_batch, seal
from tests.test_spine import upload
from tests.test_upload_validation import assert_problem
from tests.test_webhook_engine import wait_until

DISK_BYTES = 4 * 1024 * 1024
MIN_FREE_BYTES = 1024 * 1024


@pytest.fixture
def settings(settings: Settings) -> Iterator[Settings]:
    """The usual test settings, their data directory a 4 MB tmpfs of its own."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield with_settings(settings, min_free_bytes=MIN_FREE_BYTES)
    finally:
        subprocess.run(["umount", "--lazy", str(data_dir)], check=True)


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its filesystem has no room left; the file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def staged_files(settings: Settings) -> list[Path]:
    return list((settings.data_dir / ".staging").iterdir())


async def image_resource(client: httpx.AsyncClient, account: Partner, image_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/images/{image_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    image: dict[str, Any] = response.json()
    assert image["status"] != "failed", image["error"]
    return image


async def test_an_upload_into_a_full_disk_is_a_507_and_readiness_fails_until_space_returns(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    assert (await client.get("/readyz")).status_code == 200
    filler = fill(settings.data_dir)

    refused = await upload(client, account, imagegen.jpeg(640, 480))
    ready = await client.get("/readyz")

    assert_problem(refused, 507, "storage_full")
    assert int(refused.headers["retry-after"]) > 0
    assert staged_files(settings) == []
    listed = await client.get("/v1/images", headers=account.headers)
    assert listed.json()["data"] == []
    assert ready.status_code == 503
    assert ready.json()["checks"]["storage_space"].startswith("low: ")

    filler.unlink()
    assert (await client.get("/readyz")).status_code == 200
    assert (await upload(client, account, imagegen.jpeg(640, 480))).status_code == 202


async def test_the_worker_waits_for_room_and_completes_the_image_once_space_returns(
    client: httpx.AsyncClient, account: Partner, settings: Settings, worker: Worker
) -> None:
    # Held until the disk is full: the worker must meet the full disk when it writes the result.
    accepted = await upload(client, account, imagegen.jpeg(1200, 900))
    assert accepted.status_code == 202, accepted.text
    image_id = accepted.json()["id"]
    filler = fill(settings.data_dir)

    async def put_back_to_wait() -> dict[str, Any] | None:
        image = await image_resource(client, account, image_id)
        return image if image["status"] == "queued" and image["attempts"] >= 1 else None

    waiting = await wait_until(put_back_to_wait, "put back in the queue to wait for room")
    assert waiting["error"] is None
    filler.unlink()

    async def completed() -> dict[str, Any] | None:
        image = await image_resource(client, account, image_id)
        return image if image["status"] == "completed" else None

    done = await wait_until(completed, "completed once space returned")
    assert done["error"] is None and done["output"]["bytes"] > 0
    output = await client.get(f"/v1/images/{image_id}/output", headers=account.headers)
    assert output.status_code == 200 and output.content[:3] == b"\xff\xd8\xff"

    filler = fill(settings.data_dir)
    variant = await client.get(f"/v1/images/{image_id}/output?width=300", headers=account.headers)
    assert_problem(variant, 507, "storage_full")
    assert staged_files(settings) == []


@pytest.fixture
async def deps(settings: Settings) -> AsyncIterator[WorkerDeps]:
    async with worker_deps(settings) as built:
        yield built


async def test_runs_that_waited_for_room_do_not_count_as_crashes(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps
) -> None:
    image_id = (await upload(client, account, imagegen.jpeg(640, 480))).json()["id"]
    filler = fill(settings.data_dir)
    context = {"deps": deps, "job_id": process_job_id(image_id)}
    for job_try in range(1, settings.max_attempts + 1):
        with pytest.raises(Retry):
            await process_image({**context, "job_try": job_try}, image_id)
    filler.unlink()

    await process_image({**context, "job_try": settings.max_attempts + 1}, image_id)

    image = await image_resource(client, account, image_id)
    assert (image["status"], image["attempts"]) == ("completed", settings.max_attempts + 1)


async def test_after_waiting_its_limit_for_room_the_image_fails_as_storage_full(
    account: Partner, settings: Settings
) -> None:
    impatient = with_settings(settings, storage_full_give_up=0.0)
    async with api_client(impatient) as client, worker_deps(impatient) as deps:
        image_id = (await upload(client, account, imagegen.jpeg(640, 480))).json()["id"]
        fill(settings.data_dir)
        await processing.process_image(deps, image_id, 1)
        response = await client.get(f"/v1/images/{image_id}", headers=account.headers)
    failed = response.json()
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "storage_full"


@pytest.mark.parametrize("archive_option", [True, {"format": "png"}], ids=["stored", "re-encoded"])
async def test_an_archive_build_waits_for_room_and_is_built_once_space_returns(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps, archive_option: Any
) -> None:
    batch_id = (await create_batch(client, account, archive=archive_option))["id"]
    named = [(f"photo-{n}.jpg", imagegen.jpeg(640, 480)) for n in range(2)]
    for image in (await add_files(client, account, batch_id, named)).json()["data"]:
        await processing.process_image(deps, image["id"], 1)
    assert (await seal(client, account, batch_id)).status_code == 200
    filler = fill(settings.data_dir)
    context = {"deps": deps, "job_id": archive_job_id(batch_id)}

    with pytest.raises(Retry):
        await build_archive({**context, "job_try": 1}, batch_id)

    waiting = await get_batch(client, account, batch_id)
    assert waiting["archive"]["status"] == "building"
    assert staged_files(settings) == []
    filler.unlink()
    await build_archive({**context, "job_try": 2}, batch_id)
    built = await get_batch(client, account, batch_id)
    assert built["archive"]["status"] == "ready"
    download = await client.get(built["archive"]["url"], headers=account.headers)
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_file:
        assert len(archive_file.namelist()) == 3  # both photos and the report
