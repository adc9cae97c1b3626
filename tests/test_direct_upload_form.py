"""Direct uploads on S3 storage by the presigned form: the app POSTs the file straight to the bucket,
then follows the bucket's redirect to Darkroom, which lands it; or it does not follow, and the upload
lands at `POST /v1/images {upload_id}` or at the expiry sweep. Against a real S3 API server (moto's)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import pyvips
from redis.asyncio import Redis

from jobs.queue import queued_jobs
from jobs.settings import Settings
from jobs.store import Store
from jobs.uploads import UploadDesk
from server.uploads import _signature, landed_path
from tests import imagegen
from tests.conftest import Partner, api_client, on_s3, run_burst, with_settings, worker_deps
from tests.receiver import Receiver
from tests.s3server import S3Server
from tests.test_direct_uploads import RESIZE_TO_32_PNG, create_upload, image_of
from tests.test_storage_backends import stored_keys
from tests.test_upload_validation import assert_problem


@pytest.fixture
def s3_settings(settings: Settings, s3_server: S3Server) -> Settings:
    return on_s3(settings, s3_server)


@pytest.fixture
async def client(s3_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(s3_settings) as http:
        yield http


async def post_form(created: dict[str, Any], data: bytes) -> httpx.Response:
    """As a browser or app does with `upload_form`: its fields, then the file; the redirect not followed
    (the bucket's answer is the test's to look at)."""
    form = created["upload_form"]
    async with httpx.AsyncClient() as bucket:
        return await bucket.post(form["url"], data=form["fields"], files={"file": ("phone.jpg", data)})


def landed_url(posted: httpx.Response) -> str:
    """The bucket's redirect to Darkroom (it adds bucket, key and etag to the query)."""
    assert posted.status_code == 303, posted.text
    location = posted.headers["location"]
    assert location.startswith("http://testserver/v1/uploads/"), location
    return location


async def test_a_form_post_then_its_redirect_processes_and_announces_the_result(
    client: httpx.AsyncClient, account: Partner, s3_settings: Settings, receiver: Receiver
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(
        client, account, photo, operations=RESIZE_TO_32_PNG, callback_url=receiver.url
    )
    fields = created["upload_form"]["fields"]
    assert fields["Content-Type"] == "image/jpeg"
    assert fields["key"].endswith(f"{account.id}/{created['image']['id']}/original")

    landed = await client.get(landed_url(await post_form(created, photo)))
    assert landed.status_code == 200, landed.text
    assert landed.json()["input"] == {**landed.json()["input"], "format": "jpeg", "width": 64, "height": 48}
    assert landed.json()["upload"]["status"] == "started"
    # Followed twice (a reload): the image as it is, nothing landed again.
    again = await client.get(landed.request.url)
    assert (again.status_code, again.json()["upload"]["status"]) == (200, "started")

    await run_burst(s3_settings)
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["type"] == "image.completed"
    assert delivery.event["data"]["id"] == created["image"]["id"]
    output = await client.get(f"/v1/images/{created['image']['id']}/output", headers=account.headers)
    decoded = pyvips.Image.new_from_buffer(output.content, "")
    assert (output.headers["content-type"], decoded.width, decoded.height) == ("image/png", 32, 24)
    original = await client.get(f"/v1/images/{created['image']['id']}/original", headers=account.headers)
    assert original.content == photo


async def test_a_form_post_not_followed_lands_when_the_upload_is_started(
    client: httpx.AsyncClient, account: Partner, s3_settings: Settings, receiver: Receiver
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo)
    landed_url(await post_form(created, photo))  # a client that does not follow redirects

    start = {"upload_id": created["id"], "operations": RESIZE_TO_32_PNG, "callback_url": receiver.url}
    started = await client.post("/v1/images", headers=account.headers, json=start)
    assert started.status_code == 202, started.text
    assert started.json()["upload"]["status"] == "started"
    assert started.json()["input"]["format"] == "jpeg"

    await run_burst(s3_settings)
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["type"] == "image.completed"
    assert delivery.event["data"]["output"]["width"] == 32


async def test_a_form_post_never_followed_lands_at_the_expiry_sweep_instead_of_failing(
    settings: Settings, s3_server: S3Server, account: Partner, receiver: Receiver
) -> None:
    short = with_settings(on_s3(settings, s3_server), upload_url_ttl=60, body_timeout=30)
    photo = imagegen.jpeg(64, 48)
    async with api_client(short) as client:
        created = await create_upload(
            client, account, photo, operations=RESIZE_TO_32_PNG, callback_url=receiver.url
        )
        landed_url(await post_form(created, photo))
        expires_ms = int(httpx.URL(created["upload_url"]).params["expires"]) * 1000
        async with worker_deps(short) as deps:
            desk = UploadDesk(deps.settings, deps.redis, deps.store, deps.storage)
            assert await desk.sweep(expires_ms + 30_000) == 0  # none expired: it was sent in time
        image = await image_of(client, account, created["image"]["id"])
        assert (image["status"], image["upload"]["status"]) == ("queued", "started")
        await run_burst(short)
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["type"] == "image.completed"


async def test_an_uploads_urls_and_form_expire_with_it(
    client: httpx.AsyncClient, account: Partner, s3_settings: Settings
) -> None:
    """The PUT URL and the form at the upload's expires_at; the landed URL the longest a body may take
    later, as a form POST started just in time may finish."""
    created = await create_upload(client, account, imagegen.jpeg(), operations=[])
    expires = int(datetime.fromisoformat(created["expires_at"]).timestamp())
    assert created["expires_at"].endswith(".000Z")  # whole seconds, as the URLs carry it
    assert int(httpx.URL(created["upload_url"]).params["expires"]) == expires
    fields = created["upload_form"]["fields"]
    policy = json.loads(base64.b64decode(fields["policy"]))
    assert datetime.fromisoformat(policy["expiration"]).timestamp() == expires
    landed = httpx.URL(fields["success_action_redirect"])
    assert int(landed.params["expires"]) == expires + math.ceil(s3_settings.body_timeout)


async def test_a_landed_url_tampered_with_or_expired_is_refused(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    photo = imagegen.jpeg()
    created = await create_upload(client, account, photo, operations=[])
    url = httpx.URL(created["upload_form"]["fields"]["success_action_redirect"])
    signature = url.params["signature"]
    forged = url.copy_set_param("signature", signature[:-1] + ("A" if signature[-1] != "A" else "B"))
    assert_problem(await client.get(forged), 403, "upload_url_invalid")
    # The PUT URL's signature does not open the landed URL.
    put_signature = httpx.URL(created["upload_url"]).params["signature"]
    with_put_signature = url.copy_set_param("signature", put_signature)
    assert_problem(await client.get(with_put_signature), 403, "upload_url_invalid")
    key = await Store(redis).upload_signing_key()
    past = int(time.time()) - 1
    signed_past = _signature(key, "GET", landed_path(created["id"]), past)
    expired = url.copy_merge_params({"expires": str(past), "signature": signed_past})
    assert_problem(await client.get(expired), 403, "upload_url_expired")
    # Followed before anything reached the bucket: nothing to land yet.
    assert_problem(await client.get(url), 409, "upload_not_received")


async def test_a_file_larger_than_declared_is_refused_and_deleted(
    client: httpx.AsyncClient, account: Partner, s3_settings: Settings, receiver: Receiver
) -> None:
    declared = imagegen.jpeg(16, 16)
    created = await create_upload(client, account, declared, operations=[], callback_url=receiver.url)
    larger = imagegen.jpeg(64, 48)
    assert len(larger) > len(declared)
    posted = await post_form(created, larger)
    # S3 refuses it by the form's content-length-range; moto does not enforce form policies, so the
    # file reaches the bucket and Darkroom's own check must refuse it.
    landed = await client.get(landed_url(posted))
    assert_problem(landed, 413, "upload_too_large")
    image_id = created["image"]["id"]
    image = await image_of(client, account, image_id)
    assert (image["status"], image["error"]["code"], image["upload"]["status"]) == (
        "failed",
        "upload_too_large",
        "refused",
    )
    assert await stored_keys(s3_settings, f"{account.id}/{image_id}") == []
    async with worker_deps(s3_settings) as deps:
        await deps.dispatcher.run_until_idle()
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["data"]["error"]["code"] == "upload_too_large"


async def test_local_storage_offers_no_form_and_openapi_describes_it(
    settings: Settings, account: Partner
) -> None:
    async with api_client(settings) as client:
        created = await create_upload(client, account, imagegen.jpeg())
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert created["upload_form"] is None
    assert created["upload_method"] == "PUT"
    landed = paths["/v1/uploads/{upload_id}/landed"]["get"]
    assert {"200", "403", "409", "413"} <= set(landed["responses"])


async def test_a_form_post_lands_once_when_the_redirect_and_a_start_race(
    client: httpx.AsyncClient, account: Partner, s3_settings: Settings, redis: Redis
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo)
    follow = landed_url(await post_form(created, photo))
    start = {"upload_id": created["id"], "operations": RESIZE_TO_32_PNG}
    landed, started = await asyncio.gather(
        client.get(follow), client.post("/v1/images", headers=account.headers, json=start)
    )
    assert (landed.status_code, started.status_code) == (200, 202), (landed.text, started.text)
    assert await queued_jobs(redis, s3_settings.queue_name) == 1


async def test_a_second_form_post_after_landing_does_not_replace_the_checked_original(
    client: httpx.AsyncClient, account: Partner, s3_settings: Settings
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo, operations=RESIZE_TO_32_PNG)
    landed = await client.get(landed_url(await post_form(created, photo)))
    assert landed.status_code == 200, landed.text
    # The form is good until it expires: posted again, with other bytes of the same size, after the checks.
    other = imagegen.png(40, 30)
    other += b"\0" * (len(photo) - len(other))
    again = await client.get(landed_url(await post_form(created, other)))
    assert (again.status_code, again.json()["upload"]["status"]) == (200, "started")
    # What it put in the bucket is not kept there for the image's lifetime, never to be read.
    image_id = created["image"]["id"]
    (kept,) = await stored_keys(s3_settings, f"{account.id}/{image_id}")
    assert kept.startswith(f"{account.id}/{image_id}/original-")
    await run_burst(s3_settings)
    original = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert original.content == photo
    output = await client.get(f"/v1/images/{image_id}/output", headers=account.headers)
    assert pyvips.Image.new_from_buffer(output.content, "").height == 24
