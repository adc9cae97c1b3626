"""What partners do, on both storages (the local folder and an S3 bucket on a real S3 API server)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import zipfile
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import pyvips

from jobs.retention import sweep_expired
from jobs.settings import MIN_S3_PART_BYTES, Settings
from tests import imagegen
from tests.conftest import Partner, api_client, on_s3, run_burst, worker_deps
from tests.receiver import Receiver
from tests.s3server import Outage, S3Server
from tests.sources import Reply, SourceServer
from tests.test_batches import add_files, create_batch, get_batch, seal
from tests.test_direct_uploads import create_upload, put_bytes
from tests.test_spine import upload


@pytest.fixture
async def client(any_storage_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(any_storage_settings) as http:
        yield http


async def stored_keys(settings: Settings, prefix: str) -> list[str]:
    """Every blob under `prefix`, looked up behind Darkroom's back."""
    if not settings.uses_s3:
        folder = settings.storage_root / prefix
        return sorted(str(p.relative_to(settings.storage_root)) for p in folder.rglob("*") if p.is_file())
    bucket, key_prefix = settings.s3_location
    assert settings.s3_endpoint_url is not None
    s3 = S3Server.client_for(settings.s3_endpoint_url)
    listed = await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket, Prefix=f"{key_prefix}{prefix}/")
    return sorted(entry["Key"].removeprefix(key_prefix) for entry in listed.get("Contents", []))


async def test_upload_webhook_downloads_and_delete(
    client: httpx.AsyncClient, account: Partner, any_storage_settings: Settings, receiver: Receiver
) -> None:
    settings = any_storage_settings
    original = imagegen.jpeg(64, 48)
    resize = json.dumps([{"type": "resize", "params": {"width": 32}}])
    response = await upload(client, account, original, operations=resize, callback_url=receiver.url)
    assert response.status_code == 202, response.text
    image_id = response.json()["id"]

    await run_burst(settings)

    (delivery,) = receiver.wait_for(1)
    assert delivery.event["type"] == "image.completed"
    output = await client.get(f"/v1/images/{image_id}/output", headers=account.headers)
    assert output.status_code == 200
    assert output.headers["content-type"] == "image/jpeg"
    assert 'filename="photo.jpg"' in output.headers["content-disposition"]
    assert pyvips.Image.new_from_buffer(output.content, "").width == 32
    again = await client.get(
        f"/v1/images/{image_id}/output", headers={**account.headers, "If-None-Match": output.headers["etag"]}
    )
    assert again.status_code == 304

    stored = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert stored.status_code == 200 and stored.content == original
    head = await client.head(f"/v1/images/{image_id}/original", headers=account.headers)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(original))
    assert head.headers["content-type"] == "image/jpeg"
    part = await client.get(
        f"/v1/images/{image_id}/original", headers={**account.headers, "Range": "bytes=2-11"}
    )
    assert part.status_code == 206 and part.content == original[2:12]
    assert part.headers["content-range"] == f"bytes 2-11/{len(original)}"

    for _ in range(2):  # rendered, then served from the storage
        variant = await client.get(
            f"/v1/images/{image_id}/output?format=webp&width=16", headers=account.headers
        )
        assert variant.status_code == 200 and variant.headers["content-type"] == "image/webp"
        assert pyvips.Image.new_from_buffer(variant.content, "").width == 16
    keys = await stored_keys(settings, f"{account.id}/{image_id}")
    assert len(keys) == 3  # original, output, one variant

    assert (await client.delete(f"/v1/images/{image_id}", headers=account.headers)).status_code == 204
    assert await stored_keys(settings, f"{account.id}/{image_id}") == []


async def test_a_range_that_cannot_be_served_gets_the_whole_file_or_a_416_problem(
    client: httpx.AsyncClient, account: Partner, any_storage_settings: Settings
) -> None:
    """RFC 9110 §14.2: a Range of bad syntax, another unit or reversed positions is ignored; a single
    range past the end answers 416 as a problem document, as every other refusal does."""
    original = imagegen.jpeg(64, 48)
    image_id = (await upload(client, account, original)).json()["id"]
    url = f"/v1/images/{image_id}/original"

    for ignored in ("q", "items=0-5", "bytes=5-3", "bytes=x-", "bytes="):
        whole = await client.get(url, headers={**account.headers, "Range": ignored})
        assert whole.status_code == 200 and whole.content == original, ignored
    for past_end in (f"bytes={len(original)}-", "bytes=-0"):
        refused = await client.get(url, headers={**account.headers, "Range": past_end})
        assert refused.status_code == 416, past_end
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "range_not_satisfiable"
        assert refused.headers["content-range"] == f"bytes */{len(original)}"


async def test_a_batch_archive_downloads_whole_and_by_range(
    client: httpx.AsyncClient, account: Partner, any_storage_settings: Settings
) -> None:
    batch = await create_batch(client, account, archive=True)
    photos = [("a.jpg", imagegen.jpeg(40, 30)), ("b.jpg", imagegen.jpeg(30, 40))]
    assert (await add_files(client, account, batch["id"], photos)).status_code == 202
    assert (await seal(client, account, batch["id"])).status_code == 200
    await run_burst(any_storage_settings)
    assert (await get_batch(client, account, batch["id"]))["archive"]["status"] == "ready"

    whole = await client.get(f"/v1/batches/{batch['id']}/archive", headers=account.headers)
    assert whole.status_code == 200
    with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
        for name, size in (("a.jpg", (40, 30)), ("b.jpg", (30, 40))):
            result = pyvips.Image.new_from_buffer(archive.read(name), "")
            assert (result.width, result.height) == size
    resumed = await client.get(
        f"/v1/batches/{batch['id']}/archive",
        headers={**account.headers, "Range": "bytes=100-", "If-Range": whole.headers["etag"]},
    )
    assert resumed.status_code == 206 and resumed.content == whole.content[100:]
    past_end = await client.get(
        f"/v1/batches/{batch['id']}/archive",
        headers={**account.headers, "Range": f"bytes={len(whole.content)}-"},
    )
    assert past_end.status_code == 416


async def test_the_retention_sweep_removes_an_expired_images_blobs(
    client: httpx.AsyncClient, account: Partner, any_storage_settings: Settings
) -> None:
    response = await upload(client, account, imagegen.jpeg(), retention="3600")
    image_id = response.json()["id"]
    await run_burst(any_storage_settings)
    assert len(await stored_keys(any_storage_settings, f"{account.id}/{image_id}")) == 2
    async with worker_deps(any_storage_settings) as deps:
        outcome = await sweep_expired(deps, moment_ms=2**42)
    assert outcome.images == 1
    assert await stored_keys(any_storage_settings, f"{account.id}/{image_id}") == []


async def test_a_refused_upload_leaves_no_blob(
    client: httpx.AsyncClient, account: Partner, any_storage_settings: Settings
) -> None:
    response = await upload(client, account, imagegen.text_as_jpeg())
    assert response.status_code == 415, response.text  # not an image
    assert await stored_keys(any_storage_settings, account.id) == []


async def test_an_upload_over_one_part_goes_up_in_parts_and_arrives_whole(
    account: Partner, settings: Settings, s3_server: S3Server
) -> None:
    on_bucket = replace(
        on_s3(settings, s3_server), s3_part_size=MIN_S3_PART_BYTES, max_upload_bytes=4 * MIN_S3_PART_BYTES
    )
    noise = (
        pyvips.Image.gaussnoise(1800, 1400).cast("uchar").bandjoin([pyvips.Image.gaussnoise(1800, 1400)] * 2)
    )
    original = noise.cast("uchar").pngsave_buffer(compression=0)
    assert len(original) > MIN_S3_PART_BYTES
    async with api_client(on_bucket) as client:
        response = await upload(client, account, original, filename="big.png")
        assert response.status_code == 202, response.text
        image_id = response.json()["id"]
        bucket, prefix = on_bucket.s3_location
        head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}{account.id}/{image_id}/original")
        assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
        stored = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
        assert stored.content == original


@pytest.fixture
async def outage(s3_server: S3Server) -> AsyncIterator[Outage]:
    relay = await Outage(s3_server).start()
    yield relay
    await relay.stop()


async def test_during_an_s3_outage_uploads_answer_503_and_readiness_fails(
    account: Partner, settings: Settings, s3_server: S3Server, outage: Outage
) -> None:
    on_bucket = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    async with api_client(on_bucket) as client:
        assert (await client.get("/readyz")).status_code == 200
        outage.cut()
        response = await upload(client, account, imagegen.jpeg())
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "storage_unavailable"
        assert response.headers["retry-after"] == "5"
        documented = (await client.get("/openapi.json")).json()["paths"]["/v1/images"]["post"]["responses"]
        assert "storage_unavailable" in documented["503"]["description"]
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("unreachable")
        assert (await client.get("/v1/images", headers=account.headers)).status_code == 200
        outage.restore()
        assert (await upload(client, account, imagegen.jpeg())).status_code == 202


async def test_a_job_that_meets_an_s3_outage_completes_once_it_is_over(
    account: Partner, settings: Settings, s3_server: S3Server, outage: Outage, receiver: Receiver
) -> None:
    on_bucket = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    async with api_client(on_bucket) as client:
        response = await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
        image_id = response.json()["id"]
        outage.cut()
        burst = asyncio.create_task(run_burst(on_bucket))
        await asyncio.wait_for(outage.first_refusal.wait(), timeout=30)
        outage.restore()
        await asyncio.wait_for(burst, timeout=60)
        image: dict[str, Any] = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "completed", image
    (delivery,) = receiver.wait_for(1)
    assert delivery.event["type"] == "image.completed"


async def test_a_refused_upload_sent_on_in_parts_leaves_no_object_and_no_pending_upload(
    account: Partner, settings: Settings, s3_server: S3Server
) -> None:
    on_bucket = replace(
        on_s3(settings, s3_server), s3_part_size=MIN_S3_PART_BYTES, max_upload_bytes=4 * MIN_S3_PART_BYTES
    )
    not_an_image = os.urandom(2 * MIN_S3_PART_BYTES + 1)  # two parts reach S3 before it is refused
    async with api_client(on_bucket) as client:
        response = await upload(client, account, not_an_image, filename="big.jpg")
    assert response.status_code == 415, response.text
    bucket, _ = on_bucket.s3_location
    s3 = s3_server.client()
    assert s3.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_presigned_downloads_redirect_to_the_bucket(
    account: Partner, settings: Settings, s3_server: S3Server
) -> None:
    on_bucket = replace(on_s3(settings, s3_server), s3_presigned_downloads=True)
    original = imagegen.jpeg(64, 48)
    async with api_client(on_bucket) as client:
        image_id = (await upload(client, account, original, filename="été.jpg")).json()["id"]
        redirect = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert redirect.status_code == 302
    async with httpx.AsyncClient() as outside:  # no API key: the URL is signed
        fetched = await outside.get(redirect.headers["location"])
    assert fetched.status_code == 200 and fetched.content == original
    assert fetched.headers["content-type"] == "image/jpeg"
    assert fetched.headers["content-disposition"] == "inline; filename*=utf-8''%C3%A9t%C3%A9.jpg"


async def test_a_delete_during_an_s3_outage_answers_503_and_works_once_it_is_over(
    account: Partner, settings: Settings, s3_server: S3Server, outage: Outage
) -> None:
    on_bucket = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    async with api_client(on_bucket) as client:
        image_id = (await upload(client, account, imagegen.jpeg())).json()["id"]
        outage.cut()
        refused = await client.delete(f"/v1/images/{image_id}", headers=account.headers)
        assert refused.status_code == 503 and refused.json()["code"] == "storage_unavailable"
        outage.restore()
        assert (await client.get(f"/v1/images/{image_id}", headers=account.headers)).status_code == 200
        assert (await client.delete(f"/v1/images/{image_id}", headers=account.headers)).status_code == 204
    assert await stored_keys(on_bucket, f"{account.id}/{image_id}") == []


async def test_a_head_request_reads_no_bytes_from_the_bucket(
    account: Partner, settings: Settings, s3_server: S3Server, outage: Outage
) -> None:
    on_bucket = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    original = imagegen.png(600, 400)  # uncompressed enough to stand out from the headers
    async with api_client(on_bucket) as client:
        image_id = (await upload(client, account, original, filename="a.png")).json()["id"]
        before = outage.bytes_from_s3
        head = await client.head(f"/v1/images/{image_id}/original", headers=account.headers)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(original))
        assert outage.bytes_from_s3 - before < len(original) // 2


async def send_upload(
    client: httpx.AsyncClient, account: Partner, flow: str, photo: bytes, callback: str
) -> None:
    """A multipart upload, or a direct upload's create and PUT of the bytes to its URL."""
    if flow == "multipart":
        response = await upload(client, account, photo, filename="a.png", callback_url=callback)
        assert response.status_code == 202, response.text
        return
    created = await create_upload(
        client,
        account,
        photo,
        filename="a.png",
        content_type="image/png",
        operations=[{"type": "resize", "params": {"width": 32}}],
        callback_url=callback,
    )
    assert (await put_bytes(client, created, photo)).status_code == 200


@pytest.mark.parametrize("worker_machine", ["the web's", "another"])
@pytest.mark.parametrize("flow", ["multipart", "direct"])
async def test_a_worker_on_the_webs_machine_renders_an_upload_without_fetching_it(
    account: Partner,
    settings: Settings,
    s3_server: S3Server,
    outage: Outage,
    receiver: Receiver,
    flow: str,
    worker_machine: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    web = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    worker = web if worker_machine == "the web's" else replace(web, data_dir=tmp_path_factory.mktemp("other"))
    original = imagegen.png(600, 400)  # uncompressed enough to stand out from the requests around it
    await run_burst(worker)  # a worker started lately where it runs, with nothing to do yet
    async with api_client(web) as client:
        await send_upload(client, account, flow, original, receiver.url)
        kept_by_the_web = [
            name for name in os.listdir(web.data_dir / ".staging") if name.startswith("handoff-")
        ]
        before = outage.bytes_from_s3
        await run_burst(worker)
        (delivery,) = receiver.wait_for(1)
    assert delivery.event["type"] == "image.completed"
    fetched = outage.bytes_from_s3 - before
    if worker_machine == "the web's":
        assert len(kept_by_the_web) == 1
        assert fetched < len(original) // 2
    else:  # no worker on the web's machine: it keeps nothing, which no one would take
        assert kept_by_the_web == []
        assert fetched > len(original)


async def test_a_worker_renders_a_photo_it_fetched_by_url_without_fetching_it_back(
    account: Partner,
    settings: Settings,
    s3_server: S3Server,
    outage: Outage,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    web = replace(on_s3(settings, s3_server), s3_endpoint_url=outage.url)
    worker = replace(web, data_dir=tmp_path_factory.mktemp("worker-machine"))
    photo = imagegen.png(600, 400)
    source = SourceServer().start()
    try:
        url = source.serve("/a.png", Reply(body=photo, headers={"Content-Type": "image/png"}))
        async with api_client(web) as client:
            response = await client.post(
                "/v1/images", headers=account.headers, json={"source_url": url, "callback_url": receiver.url}
            )
            assert response.status_code == 202, response.text
            before = outage.bytes_from_s3
            await run_burst(worker)
            read_from_s3 = outage.bytes_from_s3 - before
            (delivery,) = receiver.wait_for(1)
            stored = await client.get(f"/v1/images/{response.json()['id']}/original", headers=account.headers)
    finally:
        source.stop()
    assert delivery.event["type"] == "image.completed"
    assert read_from_s3 < len(photo) // 2  # stored, not read back
    assert stored.content == photo
