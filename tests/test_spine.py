"""The whole path in one process: upload → real arq worker → libvips → signed webhook → download."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import pyvips
from arq.constants import in_progress_key_prefix
from arq.worker import Worker

from jobs import processing
from jobs.deps import WorkerDeps
from jobs.queue import process_job_id
from jobs.settings import Settings
from jobs.worker import LOCK_MARGIN_SECONDS, image_task_timeout
from tests import imagegen
from tests.conftest import Partner, run_burst
from tests.receiver import Receiver


async def upload(
    client: httpx.AsyncClient, account: Partner, data: bytes, filename: str = "photo.jpg", **fields: str
) -> httpx.Response:
    return await client.post(
        "/v1/images", headers=account.headers, files={"file": (filename, data, "image/jpeg")}, data=fields
    )


async def test_upload_process_and_webhook(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    operations = [
        {"type": "resize", "params": {"width": 32}},
        {"type": "convert", "params": {"format": "png"}},
    ]
    response = await upload(
        client,
        account,
        imagegen.jpeg(64, 48),
        operations=json.dumps(operations),
        callback_url=receiver.url,
        metadata=json.dumps({"listing": 42}),
    )
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued"
    assert queued["id"].startswith("img_")
    assert queued["input"] == {**queued["input"], "format": "jpeg", "width": 64, "height": 48}
    assert queued["metadata"] == {"listing": 42}

    await run_burst(settings)

    image = (await client.get(f"/v1/images/{queued['id']}", headers=account.headers)).json()
    assert image["status"] == "completed"
    assert image["attempts"] == 1
    assert image["output"]["format"] == "png"
    assert (image["output"]["width"], image["output"]["height"]) == (32, 24)
    assert image["started_at"] and image["completed_at"]

    (delivery,) = receiver.wait_for(1)
    assert delivery.verified
    assert delivery.event["type"] == "image.completed"
    assert delivery.event["data"]["id"] == queued["id"]
    assert delivery.event["data"]["output"]["url"].endswith(f"/v1/images/{queued['id']}/output")

    output = await client.get(f"/v1/images/{queued['id']}/output", headers=account.headers)
    assert output.status_code == 200
    assert output.headers["content-type"] == "image/png"
    decoded = pyvips.Image.new_from_buffer(output.content, "")
    assert (decoded.width, decoded.height) == (32, 24)

    log = (
        await client.get(f"/v1/deliveries/{delivery.headers['webhook-id']}", headers=account.headers)
    ).json()
    assert log["status"] == "delivered"
    assert [attempt["status_code"] for attempt in log["destinations"][0]["attempts"]] == [200]


async def test_queue_wakes_worker_without_waiting_for_poll(
    client: httpx.AsyncClient, account: Partner, worker: Worker, receiver: Receiver
) -> None:
    """With a running worker, the webhook arrives although arq's poll would not have looked yet."""
    response = await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
    assert response.status_code == 202
    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1, 10)
    assert delivery.event["data"]["status"] == "completed"


async def test_an_image_job_is_locked_for_its_own_time_limit_not_an_archive_builds(
    client: httpx.AsyncClient, account: Partner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies mid-image leaves its job locked, and the job runs again once the lock expires:
    within the image's time limit (minutes), not after an archive build's (an hour)."""
    locks_ms: list[int] = []
    process_image = processing.process_image

    async def observed(deps: WorkerDeps, image_id: str, job_try: int) -> None:
        locks_ms.append(await deps.redis.pttl(in_progress_key_prefix + process_job_id(image_id)))
        await process_image(deps, image_id, job_try)

    monkeypatch.setattr(processing, "process_image", observed)
    assert (await upload(client, account, imagegen.jpeg())).status_code == 202
    await run_burst(settings)
    (lock_ms,) = locks_ms
    assert settings.archive_timeout > image_task_timeout(settings)
    assert (
        settings.job_timeout * 1000 < lock_ms <= (image_task_timeout(settings) + LOCK_MARGIN_SECONDS) * 1000
    )
