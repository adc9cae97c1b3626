"""Bad uploads, as a partner sends them: each answers with the right status and an RFC 9457 problem,
and nothing is stored or queued for it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobs import inspection
from jobs.formats import ImageFormat, ImageHeader
from jobs.queue import queued_jobs
from jobs.records import epoch_ms
from jobs.settings import Settings
from tests import imagegen
from tests.conftest import Partner, api_client, make_account, run_burst, with_settings
from tests.receiver import Receiver
from tests.test_spine import upload

PROBLEM_TYPE_BASE = "https://darkroom.dev/problems/"


def assert_problem(
    response: httpx.Response, status: int, code: str | None = None, *, fields: Sequence[str] = ()
) -> dict[str, Any]:
    """The response is an RFC 9457 problem with `status`; `code` is the type's last segment, and each
    of `fields` is named by an entry of `errors`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"].startswith(PROBLEM_TYPE_BASE)
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["type"] == PROBLEM_TYPE_BASE + code, body
    if fields:
        errors = body["errors"]
        assert all(set(error) == {"field", "message"} and error["message"] for error in errors), errors
        named = {error["field"] for error in errors}
        assert set(fields) <= named, errors
    return body


def staged_files(settings: Settings) -> list[Path]:
    staging = settings.storage_root / ".staging"
    return sorted(staging.iterdir()) if staging.exists() else []


def stored_blobs(settings: Settings) -> list[Path]:
    """Every file under the storage root, staging included."""
    root = settings.storage_root
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


async def assert_nothing_kept(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    """No job queued, no image record, no listing entry, no blob, no staging leftovers."""
    assert await queued_jobs(redis, settings.queue_name) == 0
    assert await redis.keys("dr:image:*") == []
    listing = await client.get("/v1/images", headers=account.headers)
    assert listing.status_code == 200
    assert listing.json()["data"] == []
    assert stored_blobs(settings) == []


def multipart_body(parts: Sequence[tuple[str, str | None, bytes]], boundary: str = "darkroom-test") -> bytes:
    """A hand-built multipart/form-data body: (name, filename or None for a plain field, content)."""
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
        )
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def multipart_headers(account: Partner, boundary: str = "darkroom-test") -> dict[str, str]:
    return {**account.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}


# --- the file itself --------------------------------------------------------------------------------


async def test_text_renamed_jpg_is_unsupported_media_type(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await upload(client, account, imagegen.text_as_jpeg(), filename="holiday.jpg")
    body = assert_problem(response, 415, "unsupported_format")
    assert "jpeg" in body["detail"]  # says what is accepted
    await assert_nothing_kept(client, account, redis, settings)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', id="svg"),
        pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", id="pdf"),
        pytest.param(b"BM" + bytes(60), id="bmp"),
    ],
)
async def test_formats_outside_the_list_are_refused(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, data: bytes
) -> None:
    response = await upload(client, account, data, filename="picture.png")
    assert_problem(response, 415, "unsupported_format")
    await assert_nothing_kept(client, account, redis, settings)


async def test_zero_byte_file_is_empty_file(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await upload(client, account, b"")
    assert_problem(response, 422, "empty_file")
    await assert_nothing_kept(client, account, redis, settings)


async def test_png_claiming_ten_gigapixels_is_refused_before_queueing(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    bomb = imagegen.png_bomb_header(100_000, 100_000)
    assert len(bomb) < 100  # a few bytes declaring 10^10 pixels
    response = await upload(client, account, bomb, filename="bomb.png")
    body = assert_problem(response, 422, "image_too_large")
    assert "100000x100000" in body["detail"]
    assert f"{settings.max_pixels:,}" in body["detail"]  # names the limit
    await assert_nothing_kept(client, account, redis, settings)


async def test_a_tiff_of_too_many_pages_is_refused_without_holding_up_other_uploads(
    settings: Settings, account: Partner, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 MB: libvips alone takes about 3 s (and the process-wide header lock) to count its pages.
    hostile = imagegen.many_page_tiff(120_000)
    other_tenant = await make_account(redis, "other tenant")
    checking_tiff = threading.Event()
    read_header = inspection.read_header

    def observed_read_header(path: str, fmt: ImageFormat, **limits: Any) -> ImageHeader:
        if fmt is ImageFormat.TIFF:
            checking_tiff.set()
        return read_header(path, fmt, **limits)

    monkeypatch.setattr(inspection, "read_header", observed_read_header)
    async with api_client(with_settings(settings, max_upload_bytes=10_000_000)) as client:
        hostile_upload = asyncio.create_task(upload(client, account, hostile, "pages.tif"))
        assert await asyncio.to_thread(checking_tiff.wait, 10)
        started = time.monotonic()
        other_upload = await upload(client, other_tenant, imagegen.jpeg())
        other_latency = time.monotonic() - started
        refused = await hostile_upload
    assert other_upload.status_code == 202, other_upload.text
    assert other_latency < 1.0, other_latency
    problem = assert_problem(refused, 422, "too_many_pages")
    assert problem["detail"] == "the file has more than 1,000 pages; the limit is 1,000"


async def test_an_animation_of_too_many_frames_is_refused(
    settings: Settings, account: Partner, redis: Redis
) -> None:
    async with api_client(with_settings(settings, max_pages=20)) as client:
        response = await upload(client, account, imagegen.gif(8, 8, pages=21), "frames.gif")
        accepted = await upload(client, account, imagegen.tiff(8, 8, pages=20), "pages.tif")
    problem = assert_problem(response, 422, "too_many_pages")
    assert problem["detail"] == "the file has 21 pages; the limit is 20"
    assert accepted.status_code == 202, accepted.text


async def test_image_exactly_at_the_pixel_limit_is_accepted(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    width = 10_000
    height = settings.max_pixels // width
    response = await upload(client, account, imagegen.png_bomb_header(width, height), filename="edge.png")
    assert response.status_code == 202, response.text
    over = await upload(client, account, imagegen.png_bomb_header(width, height + 1), filename="over.png")
    assert_problem(over, 422, "image_too_large")


@pytest.mark.parametrize(
    "operations",
    [
        pytest.param([], id="plain-load"),
        pytest.param([{"type": "resize", "params": {"width": 16}}], id="shrink-on-load"),
    ],
)
async def test_truncated_jpeg_is_accepted_then_fails_as_corrupt_with_a_webhook(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    receiver: Receiver,
    operations: list[dict[str, Any]],
) -> None:
    response = await upload(
        client,
        account,
        imagegen.truncated_jpeg(),
        callback_url=receiver.url,
        operations=json.dumps(operations),
    )
    assert response.status_code == 202, response.text
    image_id = response.json()["id"]

    await run_burst(settings)

    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "failed"
    assert image["output"] is None
    assert image["completed_at"]
    error = image["error"]
    assert error["code"] == "corrupt_image"
    message = error["message"]
    assert message and message == message.strip() and "\n" not in message
    # A human message: none of our paths, temp names or libvips' C-level noise.
    for leak in (str(settings.data_dir), ".staging", image["id"], "/", "vips_", "VipsForeign"):
        assert leak not in message, message

    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1)
    assert delivery.verified
    assert delivery.event["type"] == "image.failed"
    assert delivery.event["data"]["id"] == image_id
    assert delivery.event["data"]["error"] == error

    output = await client.get(f"/v1/images/{image_id}/output", headers=account.headers)
    assert_problem(output, 409)


# --- the body's size ---------------------------------------------------------------------------------


async def test_body_past_the_upload_limit_is_413_and_leaves_no_staged_file(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    # Over the file cap but under the Content-Length precheck: the streaming cap must stop it.
    data = imagegen.jpeg() + bytes(settings.max_upload_bytes)
    response = await upload(client, account, data)
    assert_problem(response, 413, "file_too_large")
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


async def test_file_of_exactly_the_upload_limit_is_accepted(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image = imagegen.jpeg()
    data = image + bytes(settings.max_upload_bytes - len(image))  # trailing bytes after EOI are legal
    response = await upload(client, account, data)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["bytes"] == settings.max_upload_bytes
    assert staged_files(settings) == []


async def test_large_declared_body_is_refused_before_reading(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    huge = imagegen.jpeg() + bytes(2 * settings.max_upload_bytes)
    response = await upload(client, account, huge)
    assert_problem(response, 413, "file_too_large")
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


async def test_content_length_claiming_too_much_is_413(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    body = multipart_body([("file", "photo.jpg", imagegen.jpeg())])
    headers = {**multipart_headers(account), "Content-Length": str(10 * settings.max_upload_bytes)}
    response = await client.post("/v1/images", headers=headers, content=body)
    assert_problem(response, 413, "file_too_large")
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


async def test_chunked_body_without_content_length_is_capped_while_streaming(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    body = multipart_body([("file", "photo.jpg", imagegen.jpeg() + bytes(settings.max_upload_bytes))])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await client.post("/v1/images", headers=multipart_headers(account), content=chunks())
    assert response.request.headers.get("content-length") is None
    assert_problem(response, 413, "file_too_large")
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


async def test_too_many_form_fields_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    parts: list[tuple[str, str | None, bytes]] = [(f"field{n}", None, b"x") for n in range(40)]
    body = multipart_body([*parts, ("file", "photo.jpg", imagegen.jpeg())])
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    assert_problem(response, 422)
    await assert_nothing_kept(client, account, redis, settings)


async def test_oversized_form_field_is_413(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await upload(client, account, imagegen.jpeg(), metadata="x" * 100_000)
    assert_problem(response, 413)
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


# --- operations --------------------------------------------------------------------------------------


async def test_unknown_operation_names_its_type(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    operations = [{"type": "sharpen_everything", "params": {}}]
    response = await upload(client, account, imagegen.jpeg(), operations=json.dumps(operations))
    body = assert_problem(response, 422, "validation_failed", fields=["operations[0].type"])
    (error,) = body["errors"]
    assert "sharpen_everything" in error["message"]
    assert "resize" in error["message"]  # lists what exists
    await assert_nothing_kept(client, account, redis, settings)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({"width": 0}, "operations[0].params.width", id="width-zero"),
        pytest.param({"width": -5}, "operations[0].params.width", id="width-negative"),
        pytest.param({"width": "abc"}, "operations[0].params.width", id="width-string"),
        pytest.param({"width": 12.5}, "operations[0].params.width", id="width-fraction"),
        pytest.param({"width": True}, "operations[0].params.width", id="width-bool"),
        pytest.param({"width": 100_000}, "operations[0].params.width", id="width-huge"),
        pytest.param({"width": 10, "sharpness": 3}, "operations[0].params.sharpness", id="unknown-param"),
        pytest.param({"width": 10, "fit": "sideways"}, "operations[0].params.fit", id="fit-sideways"),
        pytest.param({}, "operations[0].params.width", id="no-dimension"),
    ],
)
async def test_bad_resize_params_name_the_field(
    client: httpx.AsyncClient,
    account: Partner,
    redis: Redis,
    settings: Settings,
    params: dict[str, Any],
    field: str,
) -> None:
    operations = [{"type": "resize", "params": params}]
    response = await upload(client, account, imagegen.jpeg(), operations=json.dumps(operations))
    assert_problem(response, 422, "validation_failed", fields=[field])
    await assert_nothing_kept(client, account, redis, settings)


async def test_every_bad_operation_is_reported_at_once(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    operations = [
        {"type": "resize", "params": {"width": 0}},
        {"type": "convert", "params": {"format": "bmp", "quality": 101}},
        {"type": "sepia"},
    ]
    response = await upload(client, account, imagegen.jpeg(), operations=json.dumps(operations))
    assert_problem(
        response,
        422,
        "validation_failed",
        fields=[
            "operations[0].params.width",
            "operations[1].params.format",
            "operations[1].params.quality",
            "operations[2].type",
        ],
    )
    await assert_nothing_kept(client, account, redis, settings)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param("resize to 800", "operations", id="not-json"),
        pytest.param('[{"type": "resize"', "operations", id="truncated-json"),
        pytest.param('{"type": "resize", "params": {"width": 8}}', "operations", id="object-not-array"),
        pytest.param('["resize"]', "operations[0].type", id="string-item"),
        pytest.param('[{"params": {"width": 8}}]', "operations[0].type", id="no-type"),
        pytest.param('[{"type": "resize", "params": [8]}]', "operations[0].params", id="params-array"),
        pytest.param(
            '[{"type": "resize", "params": {"width": NaN}}]', "operations[0].params.width", id="nan"
        ),
        pytest.param("[" * 30_000 + "]" * 30_000, "operations", id="nested-too-deep"),
    ],
)
async def test_malformed_operations_are_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, raw: str, field: str
) -> None:
    response = await upload(client, account, imagegen.jpeg(), operations=raw)
    assert_problem(response, 422, "validation_failed", fields=[field])
    await assert_nothing_kept(client, account, redis, settings)


async def test_valid_operations_are_echoed_normalised(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    operations = [
        {"type": "resize", "params": {"width": 32}},
        {"type": "convert", "params": {"format": "webp"}},
    ]
    response = await upload(client, account, imagegen.jpeg(), operations=json.dumps(operations))
    assert response.status_code == 202, response.text
    echoed = response.json()["operations"]
    assert [operation["type"] for operation in echoed] == ["resize", "convert"]
    assert echoed[0]["params"]["width"] == 32
    assert echoed[1]["params"]["format"] == "webp"


@pytest.mark.parametrize("look_alike", ["1.0", "true", '"1"'])
async def test_a_chain_accepted_before_does_not_let_its_look_alikes_through(
    client: httpx.AsyncClient, account: Partner, look_alike: str
) -> None:
    """A chain checked once is not checked again (the web remembers it), but one that differs only in a
    value's JSON type (equal in Python: 1 == 1.0 == True) is another chain, checked and refused."""
    accepted = '[{"type": "resize", "params": {"width": 1}}]'
    for _ in range(2):
        response = await upload(client, account, imagegen.jpeg(), operations=accepted)
        assert response.status_code == 202, response.text
        assert response.json()["operations"][0]["params"]["width"] == 1
    response = await upload(client, account, imagegen.jpeg(), operations=accepted.replace("1", look_alike))
    assert_problem(response, 422, "validation_failed", fields=["operations[0].params.width"])


# --- callback_url and metadata --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://example.com/hooks", id="ftp"),
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("javascript:alert(1)", id="javascript"),
        pytest.param("example.com/hooks", id="no-scheme"),
        pytest.param("http:///hooks", id="no-host"),
        pytest.param("https://user:pass@example.com/hooks", id="credentials"),
        pytest.param("https://example.com/" + "a" * 3000, id="too-long"),
        pytest.param("http://[::1/hooks", id="broken-ipv6"),
        pytest.param("https://example.com:http/hooks", id="bad-port"),
        pytest.param("https://exa mple.com/hooks", id="space"),
        pytest.param("https://example.com/\x00hooks", id="control-char"),
    ],
)
async def test_bad_callback_url_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, url: str
) -> None:
    response = await upload(client, account, imagegen.jpeg(), callback_url=url)
    assert_problem(response, 422, "validation_failed", fields=["callback_url"])
    await assert_nothing_kept(client, account, redis, settings)


@pytest.fixture
async def guarded_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API as production runs it: callbacks must reach public addresses only."""
    async with api_client(with_settings(settings, allow_private_callbacks=False)) as http:
        yield http


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:8787/hooks", id="loopback"),
        pytest.param("http://169.254.169.254/latest/meta-data/", id="cloud-metadata"),
        pytest.param("http://10.0.0.7/hooks", id="rfc1918"),
        pytest.param("http://[::ffff:127.0.0.1]/hooks", id="ipv4-mapped"),
        pytest.param("http://[64:ff9b::7f00:1]/hooks", id="nat64-loopback"),
        pytest.param("http://localhost:8787/hooks", id="localhost"),
        pytest.param("http://2130706433/hooks", id="decimal-ipv4"),
        pytest.param("http://hooks.partner.test/", id="name-resolving-to-a-private-address"),
    ],
)
async def test_callback_url_to_a_private_address_is_422(
    guarded_client: httpx.AsyncClient,
    account: Partner,
    redis: Redis,
    settings: Settings,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "hooks.partner.test", f"only names are resolved, not {host}"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.1.20", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    response = await upload(guarded_client, account, imagegen.jpeg(), callback_url=url)
    assert_problem(response, 422, "validation_failed", fields=["callback_url"])
    await assert_nothing_kept(guarded_client, account, redis, settings)


async def test_callback_url_to_a_public_address_is_accepted(
    guarded_client: httpx.AsyncClient, account: Partner
) -> None:
    response = await upload(
        guarded_client, account, imagegen.jpeg(), callback_url="https://93.184.216.34/hooks"
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("{listing: 42}", id="not-json"),
        pytest.param("[1, 2, 3]", id="array"),
        pytest.param('"a string"', id="string"),
        pytest.param(json.dumps({"notes": "x" * 4100}), id="over-4kb"),
        pytest.param('{"a":' * 10_000 + "1" + "}" * 10_000, id="nested-too-deep"),
    ],
)
async def test_bad_metadata_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, raw: str
) -> None:
    response = await upload(client, account, imagegen.jpeg(), metadata=raw)
    assert_problem(response, 422, "validation_failed", fields=["metadata"])
    await assert_nothing_kept(client, account, redis, settings)


def compact_utf8(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


async def test_metadata_up_to_4kb_of_utf8_is_echoed(client: httpx.AsyncClient, account: Partner) -> None:
    """4 KB counts the JSON as sent (UTF-8), not Python's \\u-escaped, space-padded rendering of it."""
    metadata = {"caption": "é" * 2000, "tags": ["a", "b"], "nested": {"n": 1}}
    assert 4000 < compact_utf8(metadata) <= 4096 < len(json.dumps(metadata).encode())
    response = await upload(
        client, account, imagegen.jpeg(), metadata=json.dumps(metadata, ensure_ascii=False)
    )
    assert response.status_code == 202, response.text
    assert response.json()["metadata"] == metadata


async def test_metadata_one_byte_over_4kb_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    metadata = {"caption": ""}
    metadata["caption"] = "x" * (4097 - compact_utf8(metadata))
    assert compact_utf8(metadata) == 4097
    response = await upload(client, account, imagegen.jpeg(), metadata=json.dumps(metadata))
    body = assert_problem(response, 422, "validation_failed", fields=["metadata"])
    assert "4096" in body["errors"][0]["message"]
    await assert_nothing_kept(client, account, redis, settings)


async def test_all_field_problems_are_reported_together(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await upload(
        client,
        account,
        imagegen.jpeg(),
        operations='[{"type": "spin"}]',
        callback_url="ftp://example.com",
        metadata="nope",
    )
    assert_problem(
        response, 422, "validation_failed", fields=["operations[0].type", "callback_url", "metadata"]
    )
    await assert_nothing_kept(client, account, redis, settings)


async def test_form_fields_left_blank_are_not_given(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    response = await upload(
        client, account, imagegen.jpeg(), operations=" ", callback_url="", metadata="\n", retention=" "
    )
    assert response.status_code == 202, response.text
    image = response.json()
    assert (image["operations"], image["callback_url"], image["metadata"]) == ([], None, {})
    kept = epoch_ms(image["expires_at"]) - epoch_ms(image["created_at"])
    assert kept == settings.image_retention * 1000


async def test_unknown_form_field_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await upload(client, account, imagegen.jpeg(), callbackurl="https://example.com/hooks")
    assert_problem(response, 422, "validation_failed", fields=["callbackurl"])
    await assert_nothing_kept(client, account, redis, settings)


# --- the multipart envelope --------------------------------------------------------------------------


async def test_missing_file_part_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    body = multipart_body([("operations", None, b"[]")])
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    assert_problem(response, 422, "validation_failed", fields=["file"])
    await assert_nothing_kept(client, account, redis, settings)


async def test_file_part_under_another_name_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await client.post(
        "/v1/images", headers=account.headers, files={"image": ("photo.jpg", imagegen.jpeg(), "image/jpeg")}
    )
    assert_problem(response, 422, "validation_failed", fields=["file"])
    await assert_nothing_kept(client, account, redis, settings)


async def test_file_sent_as_a_plain_field_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    """`-F file=photo.jpg` instead of `-F file=@photo.jpg`: the part has no filename."""
    body = multipart_body([("file", None, b"photo.jpg")])
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    problem = assert_problem(response, 422, "validation_failed", fields=["file"])
    assert "unknown" not in problem["errors"][0]["message"]
    await assert_nothing_kept(client, account, redis, settings)


async def test_two_file_parts_are_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await client.post(
        "/v1/images",
        headers=account.headers,
        files=[
            ("file", ("one.jpg", imagegen.jpeg(), "image/jpeg")),
            ("file", ("two.jpg", imagegen.jpeg(), "image/jpeg")),
        ],
    )
    assert_problem(response, 422, fields=["file"])
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        pytest.param("image/jpeg", imagegen.jpeg(), id="raw-image"),
        pytest.param("application/x-www-form-urlencoded", b"file=photo.jpg", id="urlencoded"),
        pytest.param("text/plain", b"hello", id="text"),
    ],
)
async def test_non_multipart_body_is_415(
    client: httpx.AsyncClient,
    account: Partner,
    redis: Redis,
    settings: Settings,
    content_type: str,
    content: bytes,
) -> None:
    response = await client.post(
        "/v1/images", headers={**account.headers, "Content-Type": content_type}, content=content
    )
    body = assert_problem(response, 415, "unsupported_media_type")
    # Says both forms the route takes, and what came instead (curl -d sends a urlencoded form).
    assert "multipart/form-data" in body["detail"] and "application/json" in body["detail"]
    assert body["detail"].endswith(f"this request's Content-Type is {content_type}")
    await assert_nothing_kept(client, account, redis, settings)


async def test_no_content_type_is_415(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await client.post("/v1/images", headers=account.headers)
    body = assert_problem(response, 415, "unsupported_media_type")
    assert body["detail"].endswith("this request's Content-Type is missing")
    await assert_nothing_kept(client, account, redis, settings)


async def test_cut_off_multipart_body_is_400_and_leaves_no_staged_file(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    whole = multipart_body([("file", "photo.jpg", imagegen.jpeg())])
    body = whole[: len(whole) // 2]
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    assert_problem(response, 400)
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


async def test_garbage_multipart_body_is_400(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await client.post(
        "/v1/images", headers=multipart_headers(account), content=b"this is not multipart at all\r\n"
    )
    assert_problem(response, 400)
    await assert_nothing_kept(client, account, redis, settings)


async def test_garbage_multipart_body_is_explained_in_a_sentence(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    response = await client.post(
        "/v1/images", headers=multipart_headers(account), content=b"--darkroom-tset\r\n\r\nx\r\n"
    )
    detail = assert_problem(response, 400, "malformed_multipart")["detail"]
    assert "Expected boundary character" not in detail  # python-multipart's own words
    assert "boundary given in Content-Type" in detail and "at byte 12" in detail
    await assert_nothing_kept(client, account, redis, settings)


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("multipart/form-data", id="no-boundary"),
        pytest.param("multipart/form-data; boundary=", id="empty-boundary"),
        pytest.param("multipart/form-data; charset=utf-8", id="other-parameter-only"),
    ],
)
async def test_multipart_without_a_boundary_is_400_saying_so(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, content_type: str
) -> None:
    """The client did send multipart: telling it to send multipart (415) would be no help."""
    response = await client.post(
        "/v1/images", headers={**account.headers, "Content-Type": content_type}, content=b"--x\r\n"
    )
    body = assert_problem(response, 400, "malformed_multipart")
    assert "no boundary" in body["detail"]
    await assert_nothing_kept(client, account, redis, settings)


async def test_boundary_longer_than_the_parser_takes_is_400(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    boundary = "X" * 257
    body = multipart_body([("file", "photo.jpg", imagegen.jpeg())], boundary=boundary)
    response = await client.post("/v1/images", headers=multipart_headers(account, boundary), content=body)
    detail = assert_problem(response, 400, "malformed_multipart")["detail"]
    assert "257" in detail and "256" in detail
    await assert_nothing_kept(client, account, redis, settings)


async def test_boundary_of_256_characters_is_accepted(client: httpx.AsyncClient, account: Partner) -> None:
    boundary = "X" * 256
    body = multipart_body([("file", "photo.jpg", imagegen.jpeg())], boundary=boundary)
    response = await client.post("/v1/images", headers=multipart_headers(account, boundary), content=body)
    assert response.status_code == 202, response.text


# --- JSON the API cannot give back ------------------------------------------------------------------

LONG_INTEGER = "9" * 5000


@pytest.mark.parametrize(
    ("name", "raw", "field", "says"),
    [
        pytest.param("metadata", '{"a": 1e309}', "metadata.a", "finite", id="overflowing-number"),
        pytest.param("metadata", '{"a": [1, -1E400]}', "metadata.a[1]", "finite", id="negative-overflow"),
        pytest.param("metadata", '{"ratio": NaN}', "metadata.ratio", "finite", id="nan"),
        pytest.param("metadata", '{"ratio": -Infinity}', "metadata.ratio", "finite", id="infinity"),
        pytest.param("metadata", f'{{"a": {LONG_INTEGER}}}', "metadata.a", "4300 digits", id="long-integer"),
        pytest.param(
            "metadata", r'{"a": "\udc00"}', "metadata.a", "valid Unicode text", id="lone-low-surrogate"
        ),
        pytest.param("metadata", r'{"\ud800": 1}', "metadata", "valid Unicode text", id="surrogate-key"),
        pytest.param(
            "operations",
            r'[{"type": "resize", "params": {"\udc00": 1}}]',
            "operations[0].params",
            "valid Unicode text",
            id="surrogate-param-name",
        ),
        pytest.param(
            "operations",
            '[{"type": "resize", "params": {"width": 1e309}}]',
            "operations[0].params.width",
            "finite",
            id="overflowing-param",
        ),
        pytest.param(
            "operations", r'[{"type": "\ud83d"}]', "operations[0].type", "valid Unicode text", id="half-emoji"
        ),
    ],
)
async def test_json_no_response_could_give_back_is_422_and_nothing_is_kept(
    client: httpx.AsyncClient,
    account: Partner,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    name: str,
    raw: str,
    field: str,
    says: str,
) -> None:
    """Python reads all of these, but no response or webhook could carry them: refused up front."""
    response = await upload(client, account, imagegen.jpeg(), callback_url=receiver.url, **{name: raw})
    body = assert_problem(response, 422, "validation_failed", fields=[field])
    (error,) = [error for error in body["errors"] if error["field"] == field]
    assert says in error["message"], error
    assert "sys." not in response.text  # no interpreter advice
    await assert_nothing_kept(client, account, redis, settings)
    await run_burst(settings)
    assert receiver.deliveries == []


async def test_a_surrogate_pair_escape_is_text(client: httpx.AsyncClient, account: Partner) -> None:
    response = await upload(
        client, account, imagegen.jpeg(), metadata=r'{"emoji": "\ud83d\udcf7", "big": 1e308}'
    )
    assert response.status_code == 202, response.text
    assert response.json()["metadata"] == {"emoji": "📷", "big": 1e308}


# --- form fields as sent ---------------------------------------------------------------------------


async def test_a_field_sent_twice_is_422_not_last_wins(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    body = multipart_body(
        [
            ("operations", None, b"[]"),
            ("operations", None, b'[{"type": "grayscale"}]'),
            ("file", "photo.jpg", imagegen.jpeg()),
        ]
    )
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    problem = assert_problem(response, 422, "validation_failed", fields=["operations"])
    assert "give operations once" in problem["errors"][0]["message"]
    await assert_nothing_kept(client, account, redis, settings)


async def test_a_field_that_is_not_utf8_is_422_not_replaced(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    body = multipart_body(
        [("metadata", None, b'{"caption": "caf\xe9"}'), ("file", "photo.jpg", imagegen.jpeg())]
    )
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    problem = assert_problem(response, 422, "validation_failed", fields=["metadata"])
    assert problem["errors"][0]["message"] == "must be UTF-8 text"
    await assert_nothing_kept(client, account, redis, settings)


async def test_file_sent_as_a_large_text_field_is_422_not_an_oversized_field(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    """`curl -F 'file=<photo.jpg'` sends the photo without a filename: past 64 KB it used to read as
    an oversized form field."""
    body = multipart_body([("file", None, imagegen.jpeg() + bytes(100_000))])
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    problem = assert_problem(response, 422, "validation_failed", fields=["file"])
    assert "filename" in problem["errors"][0]["message"]
    await assert_nothing_kept(client, account, redis, settings)


def file_part(disposition: str, content: bytes, boundary: str = "darkroom-test") -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n".encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


@pytest.mark.parametrize(
    ("disposition", "stored"),
    [
        pytest.param(
            "form-data; name=\"file\"; filename*=UTF-8''na%C3%AFve%20photo.jpg",
            "naïve photo.jpg",
            id="rfc5987",
        ),
        pytest.param(
            'form-data; name="file"; filename="plain.jpg"; filename*=UTF-8\'\'%E5%86%99%E7%9C%9F.jpg',
            "写真.jpg",
            id="rfc5987-preferred",
        ),
        pytest.param('form-data; name="file"; filename="café.jpg"', "café.jpg", id="raw-utf8"),
    ],
)
async def test_file_names_in_any_form_are_read(
    client: httpx.AsyncClient, account: Partner, disposition: str, stored: str
) -> None:
    body = file_part(disposition, imagegen.jpeg())
    response = await client.post("/v1/images", headers=multipart_headers(account), content=body)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["filename"] == stored
