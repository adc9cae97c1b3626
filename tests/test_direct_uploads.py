"""Direct uploads: create the image, PUT its bytes to a signed URL (no API key), get the webhook; the
upload-first flow that chooses operations at `POST /v1/images`; refused, expired and forged URLs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import pyvips
from redis.asyncio import Redis

from jobs.queue import queued_jobs
from jobs.records import ImageRecord, epoch_ms
from jobs.settings import Settings, SettingsError
from jobs.store import Store, image_key
from jobs.uploads import UploadDesk
from server.uploads import _signature, content_path
from tests import imagegen
from tests.conftest import Partner, api_client, make_account, run_burst, with_settings, worker_deps
from tests.receiver import Receiver
from tests.test_batches import create_batch, get_batch, seal
from tests.test_observability import parsed_metrics, sample
from tests.test_spine import upload
from tests.test_upload_validation import assert_problem, stored_blobs
from webhooks.messages import iso

RESIZE_TO_32_PNG = [
    {"type": "resize", "params": {"width": 32}},
    {"type": "convert", "params": {"format": "png"}},
]


async def create_upload(
    client: httpx.AsyncClient, account: Partner, data: bytes, **fields: Any
) -> dict[str, Any]:
    body = {"filename": "phone.jpg", "content_type": "image/jpeg", "size": len(data), **fields}
    response = await client.post("/v1/uploads", headers=account.headers, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def put_bytes(client: httpx.AsyncClient, created: dict[str, Any], data: bytes) -> httpx.Response:
    """As a partner's app does: the URL and headers as given, no API key."""
    return await client.put(created["upload_url"], content=data, headers=created["upload_headers"])


async def image_of(client: httpx.AsyncClient, account: Partner, image_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/images/{image_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    image: dict[str, Any] = response.json()
    return image


async def test_create_then_put_processes_and_announces_the_result(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(
        client,
        account,
        photo,
        operations=RESIZE_TO_32_PNG,
        callback_url=receiver.url,
        metadata={"listing": "L-7"},
    )
    assert created["id"].startswith("upl_")
    assert created["upload_method"] == "PUT"
    assert created["upload_headers"] == {"Content-Type": "image/jpeg"}
    assert created["max_bytes"] == len(photo)
    image = created["image"]
    assert image["status"] == "queued"
    assert image["input"] is None
    assert image["upload"] == {
        **image["upload"],
        "id": created["id"],
        "status": "pending",
        "starts": "on_upload",
        "expires_at": created["expires_at"],
    }
    listed = (await client.get("/v1/images", headers=account.headers)).json()["data"]
    assert [each["id"] for each in listed] == [image["id"]]

    landed = await put_bytes(client, created, photo)
    assert landed.status_code == 200, landed.text
    assert landed.json()["input"] == {**landed.json()["input"], "format": "jpeg", "width": 64, "height": 48}
    assert landed.json()["upload"]["status"] == "started"

    await run_burst(settings)
    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1)
    assert delivery.verified
    assert delivery.event["type"] == "image.completed"
    assert delivery.event["data"]["id"] == image["id"]
    assert delivery.event["data"]["metadata"] == {"listing": "L-7"}
    output = await client.get(f"/v1/images/{image['id']}/output", headers=account.headers)
    decoded = pyvips.Image.new_from_buffer(output.content, "")
    assert (output.headers["content-type"], decoded.width, decoded.height) == ("image/png", 32, 24)
    original = await client.get(f"/v1/images/{image['id']}/original", headers=account.headers)
    assert original.content == photo


@pytest.mark.parametrize(
    ("filename", "content_type"), [("IMG_0001.HEIC", "image/heic"), ("a.heif", "image/heif")]
)
async def test_a_phone_photo_is_taken_under_either_heif_media_type(
    client: httpx.AsyncClient, account: Partner, settings: Settings, filename: str, content_type: str
) -> None:
    """image/heif is HEIF's registered media type; image/heic is what iPhones send."""
    photo = imagegen.heic(64, 48)
    created = await create_upload(
        client, account, photo, filename=filename, content_type=content_type, operations=RESIZE_TO_32_PNG
    )
    assert created["upload_headers"] == {"Content-Type": content_type}
    assert (await put_bytes(client, created, photo)).status_code == 200

    await run_burst(settings)
    image = await image_of(client, account, created["image"]["id"])
    assert (image["status"], image["input"]["format"], image["output"]["width"]) == ("completed", "heif", 32)


@pytest.mark.parametrize("starts", ["on_upload", "on_request"])
async def test_a_direct_uploads_queue_wait_starts_when_it_is_handed_to_processing(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Redis, starts: str
) -> None:
    """darkroom_queue_wait_seconds is the time spent in our queue: an upload declared an hour before
    its bytes came (or before its start was asked for) did not wait an hour there."""
    photo = imagegen.jpeg(64, 48)
    fields = {"operations": []} if starts == "on_upload" else {}
    created = await create_upload(client, account, photo, **fields)
    key = image_key(created["image"]["id"])
    declared = ImageRecord.from_json(await redis.get(key))
    an_hour_before = iso(epoch_ms(declared.created_at) - 3_600_000)
    await redis.set(key, declared.evolve(created_at=an_hour_before).to_json())
    assert (await put_bytes(client, created, photo)).status_code == 200
    if starts == "on_request":
        start = await client.post("/v1/images", headers=account.headers, json={"upload_id": created["id"]})
        assert start.status_code == 202, start.text

    await run_burst(settings)

    samples = parsed_metrics((await client.get("/metrics")).text)
    assert samples[sample("darkroom_queue_wait_seconds_count")] == 1
    assert samples[sample("darkroom_queue_wait_seconds_bucket", le="60.0")] == 1


async def test_an_upload_declared_before_an_upgrade_still_lands(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    """A record written by the version before (without the fields added since) is the same upload: its
    bytes, sent after the deploy, land."""
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo, operations=[])
    key = image_key(created["image"]["id"])
    record = json.loads(await redis.get(key))
    older = {name: value for name, value in record.items() if name not in ("request_id", "queued_at")}
    await redis.set(key, json.dumps(older, separators=(",", ":")))

    landed = await put_bytes(client, created, photo)

    assert landed.status_code == 200, landed.text
    assert landed.json()["upload"]["status"] == "started"


async def test_a_start_refused_before_the_bytes_landed_runs_when_sent_again_with_its_key(
    client: httpx.AsyncClient, account: Partner
) -> None:
    """409 upload_not_received asks for the same request again once the bytes are in: sent again with
    its Idempotency-Key (as every retry of the client is), it runs then, not a replay of the refusal."""
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo)
    start = {"upload_id": created["id"], "operations": RESIZE_TO_32_PNG}
    keyed = {**account.headers, "Idempotency-Key": f"start-{created['id']}"}

    assert_problem(await client.post("/v1/images", headers=keyed, json=start), 409, "upload_not_received")
    assert (await put_bytes(client, created, photo)).status_code == 200
    started = await client.post("/v1/images", headers=keyed, json=start)

    assert started.status_code == 202, started.text
    assert "idempotent-replayed" not in started.headers
    assert started.json()["upload"]["status"] == "started"
    again = await client.post("/v1/images", headers=keyed, json=start)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == started.json()


async def test_upload_first_then_choose_operations_at_post_images(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver, redis: Redis
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo)
    assert created["image"]["upload"]["starts"] == "on_request"
    image_id = created["image"]["id"]

    early = await client.post("/v1/images", headers=account.headers, json={"upload_id": created["id"]})
    assert_problem(early, 409, "upload_not_received")
    no_bytes = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert_problem(no_bytes, 409, "upload_not_received")

    landed = await put_bytes(client, created, photo)
    assert landed.status_code == 200, landed.text
    assert landed.json()["upload"]["status"] == "received"
    # Stored, waiting for its operations: nothing is queued yet.
    assert await queued_jobs(redis, settings.queue_name) == 0

    start = {"upload_id": created["id"], "operations": RESIZE_TO_32_PNG, "callback_url": receiver.url}
    started = await client.post("/v1/images", headers=account.headers, json=start)
    assert started.status_code == 202, started.text
    assert started.json()["operations"][0]["params"]["width"] == 32
    assert started.json()["upload"]["status"] == "started"
    # A retry after a lost answer changes nothing; asking for something else is refused.
    again = await client.post("/v1/images", headers=account.headers, json=start)
    assert again.status_code == 202, again.text
    assert again.json() == started.json()
    other = {**start, "operations": []}
    assert_problem(
        await client.post("/v1/images", headers=account.headers, json=other), 409, "upload_already_started"
    )

    await run_burst(settings)
    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1)
    assert delivery.event["type"] == "image.completed"
    assert delivery.event["data"]["id"] == image_id
    assert delivery.event["data"]["output"]["format"] == "png"


async def test_a_second_put_and_concurrent_duplicate_puts_process_the_image_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver, redis: Redis
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo, operations=[], callback_url=receiver.url)
    answers = await asyncio.gather(*(put_bytes(client, created, photo) for _ in range(4)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200, 409, 409, 409], [answer.text for answer in answers]
    for answer in answers:
        if answer.status_code == 409:
            assert_problem(answer, 409, "upload_already_received")
    assert await queued_jobs(redis, settings.queue_name) == 1
    assert_problem(await put_bytes(client, created, photo), 409, "upload_already_received")

    await run_burst(settings)
    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1)
    assert delivery.event["type"] == "image.completed"
    image = await image_of(client, account, created["image"]["id"])
    assert (image["status"], image["attempts"]) == ("completed", 1)
    # Only the winning PUT's bytes are kept, with the result.
    kept = [path.name for path in stored_blobs(settings) if image["id"] in str(path)]
    assert len([name for name in kept if name.startswith("original")]) == 1, kept


async def test_too_many_bytes_are_refused_and_nothing_is_kept(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo, operations=[])

    async def streamed() -> Any:
        yield photo
        yield b"more"

    # Streamed without a Content-Length, so the cap is met while reading.
    response = await client.put(created["upload_url"], content=streamed())
    assert_problem(response, 413, "upload_too_large")
    declared_larger = await client.put(created["upload_url"], content=photo + b"more")
    assert_problem(declared_larger, 413, "upload_too_large")
    assert_problem(await put_bytes(client, created, photo[:-10]), 400, "upload_incomplete")
    assert stored_blobs(settings) == []
    image = await image_of(client, account, created["image"]["id"])
    assert (image["status"], image["upload"]["status"], image["input"]) == ("queued", "pending", None)
    # The right bytes are still taken.
    assert (await put_bytes(client, created, photo)).status_code == 200


async def test_expired_and_forged_urls_are_refused(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    photo = imagegen.jpeg()
    created = await create_upload(client, account, photo, operations=[])
    url = httpx.URL(created["upload_url"])
    signature = url.params["signature"]
    tampered = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    forged = url.copy_set_param("signature", tampered)
    assert_problem(await client.put(forged, content=photo), 403, "upload_url_invalid")
    later = url.copy_set_param("expires", str(int(url.params["expires"]) + 3600))
    assert_problem(await client.put(later, content=photo), 403, "upload_url_invalid")
    unsigned = url.copy_remove_param("signature")
    assert_problem(await client.put(unsigned, content=photo), 403, "upload_url_invalid")
    # A URL we signed whose time has passed (signed here as the web would have, an hour ago).
    key = await Store(redis).upload_signing_key()
    past = int(time.time()) - 1
    signature = _signature(key, "PUT", content_path(created["id"]), past)
    expired = url.copy_merge_params({"expires": str(past), "signature": signature})
    assert_problem(await client.put(expired, content=photo), 403, "upload_url_expired")
    assert (await put_bytes(client, created, photo)).status_code == 200


async def test_a_corrupt_file_is_refused_and_fails_the_image_with_its_webhook(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    broken = imagegen.jpeg(64, 48)[:40]
    created = await create_upload(client, account, broken, operations=[], callback_url=receiver.url)
    response = await put_bytes(client, created, broken)
    assert_problem(response, 422, "unreadable_image")
    image = await image_of(client, account, created["image"]["id"])
    assert image["status"] == "failed"
    assert image["error"]["code"] == "unreadable_image"
    assert image["upload"]["status"] == "refused"
    assert not [path for path in stored_blobs(settings) if image["id"] in str(path)]
    async with worker_deps(settings) as deps:
        await deps.dispatcher.run_until_idle()
    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1)
    assert delivery.event["type"] == "image.failed"
    assert delivery.event["data"]["error"]["code"] == "unreadable_image"
    retried = await client.post("/v1/images", headers=account.headers, json={"upload_id": created["id"]})
    assert_problem(retried, 409, "upload_refused")
    # Waiting will not bring its bytes: the original of a refused upload is the failed image's problem.
    original = await client.get(f"/v1/images/{image['id']}/original", headers=account.headers)
    assert "unreadable_image" in assert_problem(original, 409, "image_failed")["detail"]


async def test_a_batch_waiting_on_an_upload_never_sent_completes_after_the_expiry_sweep(
    settings: Settings, account: Partner, receiver: Receiver
) -> None:
    short = with_settings(settings, upload_url_ttl=60, body_timeout=30)
    async with api_client(short) as client:
        batch = await create_batch(client, account, callback_url=receiver.url)
        sent = await upload(client, account, imagegen.jpeg(), batch_id=batch["id"])
        assert sent.status_code == 202, sent.text
        created = await create_upload(client, account, imagegen.jpeg(), batch_id=batch["id"])
        assert created["image"]["upload"]["starts"] == "on_upload"
        assert (await seal(client, account, batch["id"])).status_code == 200
        await run_burst(short)
        waiting = await get_batch(client, account, batch["id"])
        assert (waiting["status"], waiting["counts"]["queued"]) == ("processing", 1)

        expires_ms = int(httpx.URL(created["upload_url"]).params["expires"]) * 1000
        async with worker_deps(short) as deps:
            desk = UploadDesk(deps.settings, deps.redis, deps.store, deps.storage)
            # Not while a PUT started just in time may still be arriving.
            assert await desk.sweep(expires_ms + 29_000) == 0
            assert await desk.sweep(expires_ms + 30_000) == 1
            assert await desk.sweep(expires_ms + 30_000) == 0
            await deps.dispatcher.run_until_idle()
        done = await get_batch(client, account, batch["id"])
        assert (done["status"], done["counts"]["completed"], done["counts"]["failed"]) == ("completed", 1, 1)
        image = await image_of(client, account, created["image"]["id"])
        assert (image["status"], image["error"]["code"]) == ("failed", "upload_expired")
        assert image["upload"]["status"] == "expired"
        assert_problem(await put_bytes(client, created, imagegen.jpeg()), 403, "upload_url_expired")
    (completed,) = [each for each in receiver.wait_for(1) if each.event["type"] == "batch.completed"]
    (failure,) = completed.event["data"]["failures"]
    assert (failure["image_id"], failure["error"]["code"]) == (image["id"], "upload_expired")


async def test_another_accounts_upload_is_not_found(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    photo = imagegen.jpeg()
    created = await create_upload(client, account, photo)
    assert (await put_bytes(client, created, photo)).status_code == 200
    stranger = await make_account(redis, "stranger")
    taken = await client.post("/v1/images", headers=stranger.headers, json={"upload_id": created["id"]})
    assert_problem(taken, 404, "not_found")
    image_id = created["image"]["id"]
    assert_problem(await client.get(f"/v1/images/{image_id}", headers=stranger.headers), 404)


async def test_an_upload_is_validated_like_a_multipart_one(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Redis
) -> None:
    bad = {
        "filename": "",
        "content_type": "text/plain",
        "size": -1,
        "operations": [{"type": "nope"}],
        "callback_url": "ftp://example.com/",
        "metadata": {"a": "x" * 5000},
        "retention": 5,
        "colour": "red",
    }
    response = await client.post("/v1/uploads", headers=account.headers, json=bad)
    fields = ["filename", "content_type", "size", "operations[0].type", "callback_url", "metadata"]
    assert_problem(response, 422, fields=[*fields, "retention", "colour"])
    too_big = {"filename": "a.jpg", "content_type": "image/jpeg", "size": settings.max_upload_bytes + 1}
    assert_problem(await client.post("/v1/uploads", headers=account.headers, json=too_big), 413)
    no_batch = {**too_big, "size": 10, "batch_id": "bat_nope"}
    assert_problem(await client.post("/v1/uploads", headers=account.headers, json=no_batch), 422)
    missing = await client.post("/v1/images", headers=account.headers, json={"operations": []})
    assert_problem(missing, 422, fields=["upload_id"])
    malformed = await client.post("/v1/images", headers=account.headers, json={"upload_id": "upl_nope"})
    (error,) = assert_problem(malformed, 422, "validation_failed", fields=["upload_id"])["errors"]
    assert "POST /v1/uploads" in error["message"]
    assert await redis.keys("dr:image:*") == []


async def test_openapi_describes_direct_uploads(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "201" in paths["/v1/uploads"]["post"]["responses"]
    content = paths["/v1/uploads/{upload_id}/content"]["put"]
    assert {"200", "403", "409", "413"} <= set(content["responses"])
    assert "application/json" in paths["/v1/images"]["post"]["requestBody"]["content"]


def test_upload_urls_last_an_hour_unless_configured_and_at_most_7_days() -> None:
    assert Settings.from_env({}).upload_url_ttl == 3600
    assert Settings.from_env({"DARKROOM_UPLOAD_URL_TTL": "600"}).upload_url_ttl == 600
    with pytest.raises(SettingsError, match="DARKROOM_UPLOAD_URL_TTL"):
        Settings.from_env({"DARKROOM_UPLOAD_URL_TTL": str(8 * 24 * 3600)})


async def test_an_upload_deleted_before_its_bytes_came_takes_none(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Redis
) -> None:
    photo = imagegen.jpeg()
    created = await create_upload(client, account, photo, operations=[])
    deleted = await client.delete(f"/v1/images/{created['image']['id']}", headers=account.headers)
    assert deleted.status_code == 204
    assert_problem(await put_bytes(client, created, photo), 404, "not_found")
    assert stored_blobs(settings) == []
    assert await queued_jobs(redis, settings.queue_name) == 0
    async with worker_deps(settings) as deps:
        desk = UploadDesk(deps.settings, deps.redis, deps.store, deps.storage)
        assert await desk.sweep(int(time.time() * 1000) + 10 * 24 * 3600 * 1000) == 0


async def test_an_upload_deleted_while_its_bytes_arrive_keeps_none(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = imagegen.jpeg()
    created = await create_upload(client, account, photo, operations=[])
    land = UploadDesk.land

    async def deleted_first(desk: UploadDesk, image: Any, key: str) -> Any:
        assert (await client.delete(f"/v1/images/{image.id}", headers=account.headers)).status_code == 204
        return await land(desk, image, key)

    monkeypatch.setattr(UploadDesk, "land", deleted_first)
    assert_problem(await put_bytes(client, created, photo), 404, "not_found")
    assert stored_blobs(settings) == []
    assert await queued_jobs(redis, settings.queue_name) == 0


async def test_a_web_page_may_put_to_the_signed_url_and_read_every_answer(
    client: httpx.AsyncClient, account: Partner
) -> None:
    """CORS on the signed URLs only: a page's preflight is let through for the URL's method and the
    upload's Content-Type, and a page can read what the PUT answers, a refusal included."""
    photo = imagegen.jpeg(64, 48)
    created = await create_upload(client, account, photo, operations=[])
    page = {"Origin": "https://listings.example"}
    preflight = await client.options(
        created["upload_url"],
        headers={
            **page,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert preflight.headers["access-control-allow-methods"] == "PUT"
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers

    refused = await client.put(
        created["upload_url"], content=photo + b"more", headers={**page, **created["upload_headers"]}
    )
    assert_problem(refused, 413, "upload_too_large")
    assert refused.headers["access-control-allow-origin"] == "*"
    assert "X-Request-Id" in refused.headers["access-control-expose-headers"]
    landed = await client.put(
        created["upload_url"], content=photo, headers={**page, **created["upload_headers"]}
    )
    assert landed.status_code == 200, landed.text
    assert landed.headers["access-control-allow-origin"] == "*"

    # The API itself is for servers: its key never belongs in a page, so no page may read its answers.
    image = await client.get(f"/v1/images/{created['image']['id']}", headers={**page, **account.headers})
    assert image.status_code == 200
    assert "access-control-allow-origin" not in image.headers
    api_preflight = await client.options(
        "/v1/uploads", headers={**page, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in api_preflight.headers
