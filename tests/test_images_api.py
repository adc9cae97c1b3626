"""Reading, listing, downloading and deleting images; health checks; the problem shape of unknown routes."""

from __future__ import annotations

import re
import urllib.parse

import httpx
import pytest
from redis.asyncio import Redis

from jobs.settings import Settings
from tests import imagegen
from tests.conftest import Partner, run_burst
from tests.test_spine import upload
from tests.test_upload_validation import assert_problem, multipart_body, multipart_headers, stored_blobs


async def upload_many(client: httpx.AsyncClient, account: Partner, count: int) -> list[str]:
    """Upload `count` small JPEGs one after another; their ids, oldest first."""
    ids = []
    for index in range(count):
        response = await upload(client, account, imagegen.jpeg(16 + index, 16), filename=f"p{index}.jpg")
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


async def list_ids(client: httpx.AsyncClient, account: Partner, query: str = "") -> list[str]:
    response = await client.get(f"/v1/images{query}", headers=account.headers)
    assert response.status_code == 200, response.text
    return [image["id"] for image in response.json()["data"]]


# --- listing -----------------------------------------------------------------------------------------


async def test_list_is_newest_first(client: httpx.AsyncClient, account: Partner) -> None:
    ids = await upload_many(client, account, 12)
    response = await client.get("/v1/images", headers=account.headers)
    assert response.status_code == 200
    page = response.json()
    assert [image["id"] for image in page["data"]] == ids[::-1]
    assert page["has_more"] is False
    assert page["next_cursor"] is None
    created = [image["created_at"] for image in page["data"]]
    assert created == sorted(created, reverse=True)
    assert all(image["object"] == "image" for image in page["data"])


async def test_empty_list(client: httpx.AsyncClient, account: Partner) -> None:
    response = await client.get("/v1/images", headers=account.headers)
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": [], "has_more": False, "next_cursor": None}


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8])
async def test_cursor_pagination_covers_every_image_once(
    client: httpx.AsyncClient, account: Partner, limit: int
) -> None:
    ids = await upload_many(client, account, 7)
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(f"/v1/images{query}", headers=account.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        assert len(page["data"]) <= limit
        seen.extend(image["id"] for image in page["data"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        assert len(page["data"]) == limit
        cursor = page["next_cursor"]
        assert cursor == page["data"][-1]["id"]
        assert pages <= len(ids), "pagination does not end"
    assert seen == ids[::-1]
    assert pages == max(1, -(-len(ids) // limit))


async def test_pagination_is_stable_while_images_arrive(client: httpx.AsyncClient, account: Partner) -> None:
    """A cursor marks a place: images uploaded after the first page do not shift the later pages."""
    ids = await upload_many(client, account, 4)
    first = (await client.get("/v1/images?limit=2", headers=account.headers)).json()
    assert [image["id"] for image in first["data"]] == ids[:1:-1]
    await upload_many(client, account, 3)
    second = await list_ids(client, account, f"?limit=2&cursor={first['next_cursor']}")
    assert second == ids[1::-1]


async def test_status_filter(client: httpx.AsyncClient, account: Partner, settings: Settings) -> None:
    good = await upload_many(client, account, 2)
    broken = await upload(client, account, imagegen.truncated_jpeg(), filename="broken.jpg")
    assert broken.status_code == 202
    await run_burst(settings)
    queued = await upload_many(client, account, 2)

    assert await list_ids(client, account, "?status=completed") == good[::-1]
    assert await list_ids(client, account, "?status=failed") == [broken.json()["id"]]
    assert await list_ids(client, account, "?status=queued") == queued[::-1]
    assert await list_ids(client, account, "?status=processing") == []
    everything = await list_ids(client, account)
    assert set(everything) == {*good, broken.json()["id"], *queued}

    # The filter and pagination together.
    first = (await client.get("/v1/images?status=completed&limit=1", headers=account.headers)).json()
    assert [image["id"] for image in first["data"]] == [good[1]]
    assert first["has_more"] is True
    rest = await list_ids(client, account, f"?status=completed&limit=1&cursor={first['next_cursor']}")
    assert rest == [good[0]]
    listed = (await client.get("/v1/images?status=completed", headers=account.headers)).json()["data"]
    assert all(image["status"] == "completed" for image in listed)


@pytest.mark.parametrize("limit", ["0", "-1", "101", "abc", "1.5", "", "²", "10 "])
async def test_bad_limit_is_422(client: httpx.AsyncClient, account: Partner, limit: str) -> None:
    response = await client.get("/v1/images", params={"limit": limit}, headers=account.headers)
    assert_problem(response, 422, "validation_failed", fields=["limit"])


async def test_bad_status_filter_is_422(client: httpx.AsyncClient, account: Partner) -> None:
    response = await client.get("/v1/images?status=done", headers=account.headers)
    assert_problem(response, 422, "validation_failed", fields=["status"])


@pytest.mark.parametrize(
    ("query", "field"),
    [
        pytest.param("?status=failed&status=completed", "status", id="status"),
        pytest.param("?status=failed&status=failed", "status", id="same-status-twice"),
        pytest.param("?limit=1&limit=50", "limit", id="limit"),
        pytest.param("?batch_id=bat_a&batch_id=bat_b", "batch_id", id="batch_id"),
    ],
)
async def test_a_list_parameter_given_twice_is_422_not_one_of_them(
    client: httpx.AsyncClient, account: Partner, query: str, field: str
) -> None:
    await upload_many(client, account, 1)
    response = await client.get(f"/v1/images{query}", headers=account.headers)
    problem = assert_problem(response, 422, "validation_failed", fields=[field])
    assert "at most once" in problem["errors"][0]["message"]


@pytest.mark.parametrize("cursor", ["garbage", "img_", "img_01jd", "bat_01jd0000000000000000000000", "(img_"])
async def test_bad_cursor_is_422_not_an_empty_page(
    client: httpx.AsyncClient, account: Partner, cursor: str
) -> None:
    await upload_many(client, account, 1)
    response = await client.get("/v1/images", params={"cursor": cursor}, headers=account.headers)
    assert_problem(response, 422, "validation_failed", fields=["cursor"])


async def test_limit_bounds_are_accepted(client: httpx.AsyncClient, account: Partner) -> None:
    ids = await upload_many(client, account, 2)
    assert await list_ids(client, account, "?limit=1") == [ids[1]]
    assert await list_ids(client, account, "?limit=100") == ids[::-1]


# --- one image ---------------------------------------------------------------------------------------


async def test_get_image_resource_shape(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    created = await upload(client, account, imagegen.jpeg(64, 48), filename="shape.jpg")
    assert created.status_code == 202
    assert created.headers["location"].endswith(f"/v1/images/{created.json()['id']}")
    image = (await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)).json()
    assert image == created.json()
    assert image["status"] == "queued"
    assert image["input"]["format"] == "jpeg"
    assert (image["input"]["width"], image["input"]["height"]) == (64, 48)
    assert image["output"] is None and image["error"] is None
    assert image["batch_id"] is None and image["callback_url"] is None
    assert image["metadata"] == {}
    assert image["attempts"] == 0
    assert image["created_at"].endswith("Z")
    assert image["started_at"] is None and image["completed_at"] is None
    for key in ("id", "status", "operations", "input", "output", "error", "batch_id", "callback_url"):
        assert key in image


@pytest.mark.parametrize(
    "image_id", ["img_01jd0000000000000000000000", "nope", "img_" + "x" * 300, "..%2f.."]
)
async def test_unknown_image_is_404(client: httpx.AsyncClient, account: Partner, image_id: str) -> None:
    for suffix in ("", "/output", "/original"):
        response = await client.get(f"/v1/images/{image_id}{suffix}", headers=account.headers)
        assert_problem(response, 404)
    assert_problem(await client.delete(f"/v1/images/{image_id}", headers=account.headers), 404)


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        pytest.param(imagegen.jpeg(40, 30), "image/jpeg", id="jpeg"),
        pytest.param(imagegen.png(40, 30, alpha=True), "image/png", id="png"),
        pytest.param(imagegen.webp(40, 30), "image/webp", id="webp"),
        pytest.param(imagegen.gif(40, 30, pages=3), "image/gif", id="gif"),
        pytest.param(imagegen.heic(40, 30), "image/heic", id="heic"),
    ],
)
async def test_original_returns_the_uploaded_bytes_exactly(
    client: httpx.AsyncClient, account: Partner, settings: Settings, data: bytes, media_type: str
) -> None:
    created = await upload(client, account, data, filename="holiday photo.bin")
    assert created.status_code == 202, created.text
    image_id = created.json()["id"]
    response = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == media_type  # from the bytes, not the upload's claim
    assert int(response.headers["content-length"]) == len(data)
    # Still exactly the same after processing.
    await run_burst(settings)
    again = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert again.content == data


@pytest.mark.parametrize(
    ("sent", "offered"),
    [
        pytest.param("sunset.jpg", "sunset.jpg", id="plain"),
        pytest.param("../../etc/passwd.jpg", "passwd.jpg", id="relative-path"),
        pytest.param("C:\\Users\\ann\\sunset.jpg", "sunset.jpg", id="windows-path"),
    ],
)
async def test_downloads_offer_the_uploaded_name_without_directories(
    client: httpx.AsyncClient, account: Partner, settings: Settings, sent: str, offered: str
) -> None:
    created = await upload(
        client,
        account,
        imagegen.jpeg(),
        filename=sent,
        operations='[{"type": "convert", "params": {"format": "png"}}]',
    )
    assert created.status_code == 202, created.text
    image_id = created.json()["id"]
    original = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert original.headers["content-disposition"] == f'inline; filename="{offered}"'
    await run_burst(settings)
    output = await client.get(f"/v1/images/{image_id}/output", headers=account.headers)
    stem = offered.rsplit(".", 1)[0]
    assert output.headers["content-disposition"] == f'inline; filename="{stem}.png"'


@pytest.mark.parametrize(
    ("sent", "original", "output"),
    [
        pytest.param("..", "{id}.jpg", "{id}.png", id="dot-dot"),
        pytest.param("..\\..\\win.ini", "win.ini.jpg", "win.ini.png", id="windows-relative-path"),
        pytest.param("invoice\u202egpj.exe", "invoicegpj.exe.jpg", "invoicegpj.exe.png", id="rtl-override"),
        pytest.param("tab\there\x01.jpg", "tab here.jpg", "tab here.png", id="control-characters"),
        pytest.param(".htaccess", "htaccess.jpg", "htaccess.png", id="leading-dot"),
        pytest.param("CON.jpg", "{id}.jpg", "{id}.png", id="windows-device"),
    ],
)
async def test_download_names_are_made_safe_like_zip_entries(
    client: httpx.AsyncClient, account: Partner, settings: Settings, sent: str, original: str, output: str
) -> None:
    # Built by hand: httpx would percent-encode the control characters itself.
    body = multipart_body(
        [
            ("file", sent, imagegen.jpeg()),
            ("operations", None, b'[{"type": "convert", "params": {"format": "png"}}]'),
        ]
    )
    created = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    assert created.status_code == 202, created.text
    image_id = created.json()["id"]
    assert created.json()["input"]["filename"] == sent
    downloaded = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    assert offered_name(downloaded) == original.format(id=image_id)
    await run_burst(settings)
    result = await client.get(f"/v1/images/{image_id}/output", headers=account.headers)
    assert offered_name(result) == output.format(id=image_id)


def offered_name(response: httpx.Response) -> str:
    """The file name of `Content-Disposition: inline; filename="…"` or `filename*=utf-8''…`."""
    disposition = response.headers["content-disposition"]
    if match := re.fullmatch(r"inline; filename\*=utf-8''(.*)", disposition):
        return urllib.parse.unquote(match[1])
    match = re.fullmatch(r'inline; filename="(.*)"', disposition)
    assert match, disposition
    return match[1]


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param("C:\\x\\y.jpg", id="windows-absolute"),
        pytest.param("..\\..\\win.ini", id="windows-relative"),
        pytest.param("../../etc/passwd.jpg", id="posix-relative"),
        pytest.param("\\\\server\\share\\a.jpg", id="unc"),
    ],
)
async def test_the_file_name_is_kept_as_sent_whatever_its_form(
    client: httpx.AsyncClient, account: Partner, sent: str
) -> None:
    """`input.filename` echoes the name the partner sent, paths and all: it is made safe where it names
    a file (downloads, ZIP entries), not silently cut short for some spellings and not others."""
    created = await upload(client, account, imagegen.jpeg(), filename=sent)
    assert created.status_code == 202, created.text
    assert created.json()["input"]["filename"] == sent


async def test_output_while_queued_is_409_problem(client: httpx.AsyncClient, account: Partner) -> None:
    created = await upload(client, account, imagegen.jpeg())
    response = await client.get(f"/v1/images/{created.json()['id']}/output", headers=account.headers)
    body = assert_problem(response, 409)
    assert "queued" in body["detail"]
    assert response.headers.get("retry-after")


async def test_output_after_completion(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    created = await upload(client, account, imagegen.png(40, 30), filename="art.png")
    await run_burst(settings)
    image = (await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)).json()
    assert image["status"] == "completed"
    response = await client.get(f"/v1/images/{image['id']}/output", headers=account.headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert len(response.content) == image["output"]["bytes"]
    assert response.content.startswith(b"\x89PNG")


# --- delete ------------------------------------------------------------------------------------------


async def test_delete_removes_record_listing_and_blobs(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Redis
) -> None:
    keep = await upload(client, account, imagegen.jpeg(), filename="keep.jpg")
    gone = await upload(client, account, imagegen.jpeg(), filename="gone.jpg")
    await run_burst(settings)
    image_id = gone.json()["id"]
    image_dir = settings.storage_root / account.id / image_id
    assert sorted(path.name for path in image_dir.iterdir())[0] == "original"  # original and output
    assert len(list(image_dir.iterdir())) == 2

    response = await client.delete(f"/v1/images/{image_id}", headers=account.headers)
    assert response.status_code == 204
    assert response.content == b""

    for suffix in ("", "/output", "/original"):
        assert_problem(await client.get(f"/v1/images/{image_id}{suffix}", headers=account.headers), 404)
    assert_problem(await client.delete(f"/v1/images/{image_id}", headers=account.headers), 404)
    assert await list_ids(client, account) == [keep.json()["id"]]
    assert not image_dir.exists()
    assert all(image_id not in str(path) for path in stored_blobs(settings))
    assert await redis.keys(f"dr:*{image_id}*") == []
    # The other image is untouched.
    original = await client.get(f"/v1/images/{keep.json()['id']}/original", headers=account.headers)
    assert original.status_code == 200


async def test_delete_before_processing_means_it_is_never_processed(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    created = await upload(client, account, imagegen.jpeg())
    image_id = created.json()["id"]
    assert (await client.delete(f"/v1/images/{image_id}", headers=account.headers)).status_code == 204
    await run_burst(settings)
    assert_problem(await client.get(f"/v1/images/{image_id}", headers=account.headers), 404)
    assert not (settings.storage_root / account.id / image_id).exists()
    assert await list_ids(client, account) == []


# --- health and unknown routes -----------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_readyz_reports_its_checks(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"redis": "ok", "storage": "ok", "storage_space": "ok"}


@pytest.mark.parametrize("path", ["/v2/images", "/v1/imagez", "/", "/v1/images/img_x/thumbnail"])
async def test_unknown_route_is_404_problem(client: httpx.AsyncClient, account: Partner, path: str) -> None:
    response = await client.get(path, headers=account.headers)
    assert_problem(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/images", "GET, HEAD, POST"),
        ("POST", f"/v1/images/img_{'0' * 26}", "DELETE, GET, HEAD"),
        ("PUT", f"/v1/webhook-endpoints/ep_{'0' * 26}", "DELETE, GET, HEAD, PATCH"),
        ("DELETE", f"/v1/batches/bat_{'0' * 26}", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_problem_naming_every_method_the_path_takes(
    client: httpx.AsyncClient, account: Partner, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, path, headers=account.headers)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed
    assert response.json()["detail"] == f"{method} is not allowed here; this route takes {allowed}"
