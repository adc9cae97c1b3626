"""A running render stops when its job's time limit passes or its owner deletes the image, and a render
that would hold too large a picture in memory is refused before it decodes anything."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from jobs import processing
from jobs.deps import WorkerDeps
from jobs.pipeline import RenderedImage
from jobs.settings import Settings
from tests import imagegen
from tests.conftest import Partner, api_client, run_burst, with_settings, worker_deps
from tests.test_spine import upload

# About 15 s of libvips work on a 12 MP photo, stopped long before that.
SLOW_CHAIN = json.dumps([{"type": "blur", "params": {"sigma": 100}}] * 32)
# Far below SLOW_CHAIN's run time, far above a stopped render's delay.
STOPPED_WITHIN_SECONDS = 8


async def upload_slow_image(client: httpx.AsyncClient, account: Partner) -> str:
    response = await upload(client, account, imagegen.jpeg(4000, 3000), operations=SLOW_CHAIN)
    assert response.status_code == 202
    image_id: str = response.json()["id"]
    return image_id


@pytest.fixture
async def deps(settings: Settings) -> AsyncIterator[WorkerDeps]:
    async with worker_deps(settings) as built:
        yield built


async def test_a_render_past_the_time_limit_fails_as_a_timeout(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image_id = await upload_slow_image(client, account)
    async with worker_deps(with_settings(settings, job_timeout=0.5)) as deps:
        await asyncio.wait_for(processing.process_image(deps, image_id, 1), STOPPED_WITHIN_SECONDS)
    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "failed"
    assert image["error"] == {"code": "timeout", "message": "processing took longer than 0.5 s"}
    assert image["output"] is None


async def test_deleting_an_image_stops_its_render(
    client: httpx.AsyncClient, account: Partner, deps: WorkerDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    render = processing.render

    def observed_render(*args: Any, **kwargs: Any) -> RenderedImage:
        started.set()
        return render(*args, **kwargs)

    monkeypatch.setattr(processing, "render", observed_render)
    image_id = await upload_slow_image(client, account)
    processing_task = asyncio.create_task(processing.process_image(deps, image_id, 1))
    assert await asyncio.to_thread(started.wait, STOPPED_WITHIN_SECONDS)

    deleted = await client.delete(f"/v1/images/{image_id}", headers=account.headers)
    assert deleted.status_code == 204

    await asyncio.wait_for(processing_task, STOPPED_WITHIN_SECONDS)
    assert not deps.storage.path(f"{account.id}/{image_id}").exists()
    assert await deps.store.get_image(image_id) is None


async def test_a_turn_that_would_hold_too_large_a_picture_in_memory_fails_before_decoding(
    account: Partner, settings: Settings
) -> None:
    # 49 MP in a few kilobytes: turning it decodes it whole, 49 MP x (3 + libwebp's 4) bytes = 327 MB.
    webp = imagegen.flat_lossless_webp(7000, 7000)
    assert len(webp) < 8000
    limited = with_settings(settings, job_memory_bytes=256 * 1024 * 1024)
    turn = json.dumps([{"type": "rotate", "params": {"angle": 90}}])
    shrink_then_turn = json.dumps(
        [{"type": "resize", "params": {"width": 700}}, {"type": "rotate", "params": {"angle": 90}}]
    )
    async with api_client(limited) as client:
        turned = (await upload(client, account, webp, "flat.webp", operations=turn)).json()["id"]
        shrunk = (await upload(client, account, webp, "flat.webp", operations=shrink_then_turn)).json()["id"]
        await run_burst(limited)
        refused = (await client.get(f"/v1/images/{turned}", headers=account.headers)).json()
        done = (await client.get(f"/v1/images/{shrunk}", headers=account.headers)).json()
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == "image_too_large"
    assert (
        "7000x7000 picture needs it whole in memory, about 327 MB; the limit is 256 MB"
        in (refused["error"]["message"])
    )
    assert done["status"] == "completed", done
    assert (done["output"]["width"], done["output"]["height"]) == (700, 700)
