"""Batches: images grouped to complete exactly once, with a signed batch.completed and one ZIP."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from typing import Any

import httpx
import pyvips

from jobs import processing
from jobs.batches import Batches
from jobs.records import ImageError, OutputInfo, utc_now
from jobs.settings import Settings
from tests import imagegen
from tests.conftest import Partner, make_account, run_burst, worker_deps
from tests.receiver import Receiver
from tests.test_spine import upload

RESIZE_TO_32 = [{"type": "resize", "params": {"width": 32}}]
JPEG = "image/jpeg"


async def create_batch(client: httpx.AsyncClient, account: Partner, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/batches", headers=account.headers, json=body)
    assert response.status_code == 201, response.text
    batch: dict[str, Any] = response.json()
    return batch


async def add_files(
    client: httpx.AsyncClient, account: Partner, batch_id: str, named: list[tuple[str, bytes]], **fields: str
) -> httpx.Response:
    parts = [("file", (name, data, JPEG)) for name, data in named]
    return await client.post(
        f"/v1/batches/{batch_id}/images", headers=account.headers, files=parts, data=fields
    )


async def seal(client: httpx.AsyncClient, account: Partner, batch_id: str) -> httpx.Response:
    return await client.post(f"/v1/batches/{batch_id}/seal", headers=account.headers)


async def get_batch(client: httpx.AsyncClient, account: Partner, batch_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/batches/{batch_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


async def messages_of_type(
    client: httpx.AsyncClient, account: Partner, event_type: str
) -> list[dict[str, Any]]:
    listed = await client.get(f"/v1/deliveries?event_type={event_type}", headers=account.headers)
    data: list[dict[str, Any]] = listed.json()["data"]
    return data


def stored_images(settings: Settings, account: Partner) -> list[str]:
    """The image folders in storage: what an upload left behind."""
    folder = settings.storage_root / account.id
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("img_")) if folder.is_dir() else []


async def test_a_shoot_with_a_corrupt_photo_completes_once_and_archives_the_good_results(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    created = await create_batch(
        client,
        account,
        operations=RESIZE_TO_32,
        callback_url=receiver.url,
        archive=True,
        metadata={"listing": "L-1042"},
    )
    assert created["id"].startswith("bat_")
    assert created["status"] == "open"
    assert created["counts"] == {"total": 0, "queued": 0, "processing": 0, "completed": 0, "failed": 0}
    assert created["archive"]["status"] == "pending" and created["archive"]["url"] is None
    batch_id = created["id"]

    added = await add_files(
        client,
        account,
        batch_id,
        [
            ("kitchen.jpg", imagegen.jpeg(64, 48)),
            ("../../etc/evil name.jpg", imagegen.jpeg(80, 60)),
            ("broken.jpg", imagegen.truncated_jpeg()),
            ("Kitchen.JPG", imagegen.jpeg(48, 64)),
        ],
    )
    assert added.status_code == 202, added.text
    images = added.json()["data"]
    assert [image["batch_id"] for image in images] == [batch_id] * 4
    assert all(image["operations"][0]["params"]["width"] == 32 for image in images)
    broken_id = images[2]["id"]

    sealed = await seal(client, account, batch_id)
    assert sealed.status_code == 200
    assert sealed.json()["status"] == "sealed"
    assert sealed.json()["counts"]["queued"] == 4

    # Two workers share the images, as a scaled-out deployment does.
    await asyncio.gather(run_burst(settings), run_burst(settings))

    deliveries = await receiver.arrivals(2)
    assert len(deliveries) == 2 and all(delivery.verified for delivery in deliveries)
    by_type = {delivery.event["type"]: delivery.event["data"] for delivery in deliveries}
    assert set(by_type) == {"batch.completed", "batch.archive.ready"}
    done = by_type["batch.completed"]
    assert done["status"] == "completed"
    assert done["counts"] == {"total": 4, "queued": 0, "processing": 0, "completed": 3, "failed": 1}
    (failure,) = done["failures"]
    assert failure["image_id"] == broken_id
    assert failure["filename"] == "broken.jpg"
    assert failure["error"]["code"] == "corrupt_image"
    assert done["metadata"] == {"listing": "L-1042"}
    assert len(await messages_of_type(client, account, "batch.completed")) == 1

    batch = await get_batch(client, account, batch_id)
    assert batch["status"] == "completed"
    archive_state = batch["archive"]
    assert archive_state["status"] == "ready"
    assert archive_state["url"] == f"http://testserver/v1/batches/{batch_id}/archive"
    assert by_type["batch.archive.ready"]["archive"] == archive_state

    download = await client.get(archive_state["url"], headers=account.headers)
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    assert int(download.headers["content-length"]) == archive_state["bytes"] == len(download.content)
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        # The second kitchen keeps its own spelling, made unique for case-insensitive file systems.
        assert set(archive.namelist()) == {"_report.json", "evil name.jpg", "Kitchen-2.jpg", "kitchen.jpg"}
        for name in ("evil name.jpg", "Kitchen-2.jpg", "kitchen.jpg"):
            assert archive.getinfo(name).compress_type == zipfile.ZIP_STORED
            decoded = pyvips.Image.new_from_buffer(archive.read(name), "")
            assert decoded.width == 32
        report = json.loads(archive.read("_report.json"))
    assert [(f["image_id"], f["filename"], f["error"]["code"]) for f in report["failed"]] == [
        (broken_id, "broken.jpg", "corrupt_image")
    ]
    assert {f["name"]: f["filename"] for f in report["files"]}["evil name.jpg"] == "../../etc/evil name.jpg"

    late = await add_files(client, account, batch_id, [("late.jpg", imagegen.jpeg())])
    assert late.status_code == 409
    assert late.json()["code"] == "batch_sealed" and "completed" in late.json()["detail"]
    assert len(receiver.deliveries) == 2


async def test_images_finishing_at_the_same_moment_complete_the_batch_exactly_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    """Every image of a sealed batch is finished, then each worker that finished one checks for completion
    at once, each on its own Redis connection: all of them see the batch done, one completes it."""
    batch_id = (await create_batch(client, account, callback_url=receiver.url))["id"]
    named = [(f"photo-{n}.jpg", imagegen.jpeg(16, 12)) for n in range(12)]
    await add_files(client, account, batch_id, named)
    assert (await seal(client, account, batch_id)).json()["status"] == "sealed"
    async with (
        worker_deps(settings) as first,
        worker_deps(settings) as second,
        worker_deps(settings) as third,
    ):
        workers = [first, second, third]
        images = await Batches(first.store, first.redis, settings).images(batch_id)
        output = OutputInfo("jpeg", 16, 12, 1000, "unused")
        await asyncio.gather(
            *(
                workers[n % 3].store.finish_image(
                    image.evolve(status="completed", output=output, completed_at=utc_now()), None
                )
                for n, image in enumerate(images)
            )
        )
        racers = [Batches(deps.store, deps.redis, deps.settings) for deps in workers]
        outcomes = await asyncio.gather(
            *(racers[n % 3].complete_if_done(batch_id) for n in range(len(images)))
        )
        await first.dispatcher.run_until_idle()

    assert sum(outcome is not None for outcome in outcomes) == 1
    batch = await get_batch(client, account, batch_id)
    assert batch["status"] == "completed"
    assert batch["counts"] == {"total": 12, "queued": 0, "processing": 0, "completed": 12, "failed": 0}
    assert len(await messages_of_type(client, account, "batch.completed")) == 1
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["type"] == "batch.completed"


async def test_a_seal_racing_the_last_images_completes_the_batch_exactly_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch_id = (await create_batch(client, account))["id"]
    named = [(f"photo-{n}.jpg", imagegen.jpeg(16, 12)) for n in range(6)]
    image_ids = [image["id"] for image in (await add_files(client, account, batch_id, named)).json()["data"]]
    async with worker_deps(settings) as first, worker_deps(settings) as second:
        sealed, *_ = await asyncio.gather(
            seal(client, account, batch_id),
            *(
                processing.process_image((first, second)[n % 2], image_id, 1)
                for n, image_id in enumerate(image_ids)
            ),
        )
    assert sealed.status_code == 200
    assert (await get_batch(client, account, batch_id))["status"] == "completed"
    messages = await messages_of_type(client, account, "batch.completed")
    assert messages == []  # no callback and no endpoint: nobody to tell


async def test_batch_counts_follow_each_image(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch_id = (await create_batch(client, account))["id"]
    await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg()), ("b.jpg", imagegen.jpeg())])
    async with worker_deps(settings) as deps:
        first, second = await Batches(deps.store, deps.redis, deps.settings).images(batch_id)
        await deps.store.update_image(first.evolve(status="processing", attempts=1))
        # A re-run of the same job starts it again: it must not count twice.
        await deps.store.update_image(first.evolve(status="processing", attempts=2))
        batch = await get_batch(client, account, batch_id)
        assert batch["counts"] == {"total": 2, "queued": 1, "processing": 1, "completed": 0, "failed": 0}

        failed = first.evolve(
            status="failed", error=ImageError("corrupt_image", "bad"), completed_at=utc_now()
        )
        await deps.store.finish_image(failed, None)
        await deps.store.finish_image(failed, None)  # an overlapping run finishes it again: no effect
        assert (await get_batch(client, account, batch_id))["counts"]["failed"] == 1

        await client.delete(f"/v1/images/{first.id}", headers=account.headers)
        await client.delete(f"/v1/images/{second.id}", headers=account.headers)
    batch = await get_batch(client, account, batch_id)
    assert batch["counts"] == {"total": 0, "queued": 0, "processing": 0, "completed": 0, "failed": 0}
    assert batch["status"] == "open"


async def test_a_stale_view_of_an_image_never_undoes_a_newer_state(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    """A run passes the record as it last saw it stored; when another run changed it meanwhile, the
    change applies to what is stored now (the counts stay right), and a finish is never undone."""
    batch_id = (await create_batch(client, account))["id"]
    await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())])
    async with worker_deps(settings) as deps:
        (queued,) = await Batches(deps.store, deps.redis, deps.settings).images(batch_id)
        first_run = queued.evolve(status="processing", attempts=1)
        assert await deps.store.update_image(first_run, previous=queued)
        second_run = queued.evolve(status="processing", attempts=2)
        assert await deps.store.update_image(second_run, previous=queued)  # stale: it was first_run
        counts = (await get_batch(client, account, batch_id))["counts"]
        assert (counts["queued"], counts["processing"]) == (0, 1)

        done = second_run.evolve(status="completed", completed_at=utc_now())
        assert await deps.store.finish_image(done, None, previous=second_run) == done
        late = first_run.evolve(status="failed", error=ImageError("timeout", "late"), completed_at=utc_now())
        assert await deps.store.finish_image(late, None, previous=first_run) == done
        assert not await deps.store.update_image(first_run, previous=first_run)
        assert await deps.store.get_image(queued.id) == done
    counts = (await get_batch(client, account, batch_id))["counts"]
    assert counts == {"total": 1, "queued": 0, "processing": 0, "completed": 1, "failed": 0}


async def test_sealing_a_finished_batch_completes_it_and_deleting_the_last_unfinished_image_too(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    finished = (await create_batch(client, account, callback_url=receiver.url))["id"]
    await add_files(client, account, finished, [("a.jpg", imagegen.jpeg())])
    waiting = (await create_batch(client, account, callback_url=receiver.url, archive=True))["id"]
    await add_files(client, account, waiting, [("b.jpg", imagegen.jpeg())])
    await run_burst(settings)

    sealed = await seal(client, account, finished)
    assert sealed.json()["status"] == "completed" and sealed.json()["completed_at"]

    # The second batch gets one more image, and loses it before any worker starts it.
    late_id = (await add_files(client, account, waiting, [("c.jpg", imagegen.jpeg())])).json()["data"][0][
        "id"
    ]
    assert (await seal(client, account, waiting)).json()["status"] == "processing"
    assert (await client.delete(f"/v1/images/{late_id}", headers=account.headers)).status_code == 204
    assert (await get_batch(client, account, waiting))["status"] == "completed"

    await run_burst(settings)
    deliveries = await receiver.arrivals(3)
    kinds = sorted((d.event["data"]["id"], d.event["type"]) for d in deliveries)
    assert kinds == sorted(
        [(finished, "batch.completed"), (waiting, "batch.completed"), (waiting, "batch.archive.ready")]
    )
    download = await client.get(f"/v1/batches/{waiting}/archive", headers=account.headers)
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(archive.namelist()) == ["_report.json", "b.jpg"]


async def test_batch_id_on_upload_joins_the_batch_with_its_default_operations(
    client: httpx.AsyncClient, account: Partner
) -> None:
    batch_id = (await create_batch(client, account, operations=RESIZE_TO_32))["id"]

    defaulted = (await upload(client, account, imagegen.jpeg(), batch_id=batch_id)).json()
    own = (
        await upload(
            client,
            account,
            imagegen.jpeg(),
            batch_id=batch_id,
            operations=json.dumps([{"type": "flip", "params": {"direction": "vertical"}}]),
        )
    ).json()
    none = (await upload(client, account, imagegen.jpeg(), batch_id=batch_id, operations="[]")).json()

    assert defaulted["batch_id"] == batch_id
    assert [op["type"] for op in defaulted["operations"]] == ["resize"]
    assert [op["type"] for op in own["operations"]] == ["flip"]
    assert none["operations"] == []
    batch = await get_batch(client, account, batch_id)
    assert batch["counts"]["total"] == batch["counts"]["queued"] == 3
    listed = (await client.get(f"/v1/images?batch_id={batch_id}", headers=account.headers)).json()
    assert {image["id"] for image in listed["data"]} == {defaulted["id"], own["id"], none["id"]}


async def test_images_cannot_join_a_missing_foreign_or_sealed_batch_and_leave_nothing_behind(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Any
) -> None:
    other = await make_account(redis, "other")
    foreign = (await create_batch(client, other))["id"]
    sealed_id = (await create_batch(client, account))["id"]
    await add_files(client, account, sealed_id, [("a.jpg", imagegen.jpeg())])
    assert (await seal(client, account, sealed_id)).status_code == 200
    kept = stored_images(settings, account)

    for batch_id in ("bat_01jd0000000000000000000000", foreign):
        refused = await upload(client, account, imagegen.jpeg(), batch_id=batch_id)
        assert refused.status_code == 422
        assert refused.json()["errors"] == [{"field": "batch_id", "message": "no such batch in this account"}]
        for path in ("", "/seal", "/archive"):
            method = "POST" if path == "/seal" else "GET"
            answer = await client.request(method, f"/v1/batches/{batch_id}{path}", headers=account.headers)
            assert answer.status_code == 404, path
        added = await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())])
        assert added.status_code == 404

    to_sealed = await upload(client, account, imagegen.jpeg(), batch_id=sealed_id)
    assert to_sealed.status_code == 409 and to_sealed.json()["code"] == "batch_sealed"
    added = await add_files(client, account, sealed_id, [("a.jpg", imagegen.jpeg())])
    assert added.status_code == 409 and added.json()["code"] == "batch_sealed"
    again = await seal(client, account, sealed_id)
    assert again.status_code == 409 and again.json()["code"] == "batch_sealed"

    assert stored_images(settings, account) == kept
    assert (await get_batch(client, account, sealed_id))["counts"]["total"] == 1
    listed = (await client.get("/v1/images", headers=account.headers)).json()
    assert len(listed["data"]) == 1


async def test_one_refused_file_refuses_the_whole_request(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch_id = (await create_batch(client, account))["id"]
    refused = await add_files(
        client,
        account,
        batch_id,
        [("good.jpg", imagegen.jpeg()), ("notes.jpg", b"just some text"), ("empty.jpg", b"")],
    )
    assert refused.status_code == 422
    body = refused.json()
    assert body["code"] == "files_refused"
    assert [error["field"] for error in body["errors"]] == ["file[1]", "file[2]"]
    assert "unsupported_format" in body["errors"][0]["message"]
    assert "empty_file" in body["errors"][1]["message"]
    assert stored_images(settings, account) == []
    assert (await get_batch(client, account, batch_id))["counts"]["total"] == 0

    no_files = await client.post(
        f"/v1/batches/{batch_id}/images", headers=account.headers, files={"metadata": (None, "{}")}
    )
    assert no_files.status_code == 422


async def test_an_empty_batch_cannot_be_sealed(client: httpx.AsyncClient, account: Partner) -> None:
    batch_id = (await create_batch(client, account))["id"]
    refused = await seal(client, account, batch_id)
    assert refused.status_code == 409
    assert refused.json()["code"] == "batch_empty"
    assert (await get_batch(client, account, batch_id))["status"] == "open"


async def test_create_reports_every_bad_field(client: httpx.AsyncClient, account: Partner) -> None:
    response = await client.post(
        "/v1/batches",
        headers=account.headers,
        json={
            "operations": [{"type": "resize", "params": {"width": 0}}],
            "callback_url": "ftp://example.com/hooks",
            "archive": {"format": "png", "quality": 80},
            "metadata": ["not", "an", "object"],
            "colour": "blue",
        },
    )
    assert response.status_code == 422
    fields = {error["field"] for error in response.json()["errors"]}
    assert fields == {"operations[0].params.width", "callback_url", "archive.quality", "metadata", "colour"}

    bad_format = await client.post(
        "/v1/batches", headers=account.headers, json={"archive": {"format": "gif"}}
    )
    assert [error["field"] for error in bad_format.json()["errors"]] == ["archive.format"]
    # 0 is no false: neither an archive asked for nor none.
    zero = await client.post("/v1/batches", headers=account.headers, json={"archive": 0})
    assert zero.json()["errors"] == [{"field": "archive", "message": "must be an object"}]

    empty = await client.post("/v1/batches", headers=account.headers)
    assert empty.status_code == 201
    assert empty.json()["archive"] is None and empty.json()["operations"] == []
    converted = await create_batch(client, account, archive={"format": "webp", "quality": 70})
    assert {k: converted["archive"][k] for k in ("format", "quality")} == {"format": "webp", "quality": 70}


async def test_archive_answers_409_until_ready(client: httpx.AsyncClient, account: Partner) -> None:
    without = (await create_batch(client, account))["id"]
    response = await client.get(f"/v1/batches/{without}/archive", headers=account.headers)
    assert response.status_code == 409 and response.json()["code"] == "no_archive"

    with_archive = (await create_batch(client, account, archive=True))["id"]
    response = await client.get(f"/v1/batches/{with_archive}/archive", headers=account.headers)
    assert response.status_code == 409 and response.json()["code"] == "not_ready"
    assert response.headers["content-type"] == "application/problem+json"


async def test_batches_are_listed_newest_first_by_page_and_status(
    client: httpx.AsyncClient, account: Partner, redis: Any
) -> None:
    ids = [(await create_batch(client, account, metadata={"n": n}))["id"] for n in range(3)]
    await add_files(client, account, ids[0], [("a.jpg", imagegen.jpeg())])
    await seal(client, account, ids[0])
    await create_batch(client, await make_account(redis, "other"))

    first = (await client.get("/v1/batches?limit=2", headers=account.headers)).json()
    assert [batch["id"] for batch in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    rest = (await client.get(f"/v1/batches?cursor={first['next_cursor']}", headers=account.headers)).json()
    assert [batch["id"] for batch in rest["data"]] == [ids[0]] and rest["has_more"] is False
    sealed = (await client.get("/v1/batches?status=sealed", headers=account.headers)).json()
    assert [batch["id"] for batch in sealed["data"]] == [ids[0]]
    bad = await client.get("/v1/batches?status=done", headers=account.headers)
    assert bad.status_code == 422
