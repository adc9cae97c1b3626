"""What fuzzing the API found (issue 11): each a 500 or a 503 where a partner should get a clear 4xx,
or an image failed for the wrong reason. Through the real HTTP API, real Redis and a real worker."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import pyvips
from redis.asyncio import Redis

from jobs.settings import Settings
from server.json_body import MAX_JSON_DEPTH
from tests import imagegen
from tests.conftest import Partner, run_burst
from tests.test_endpoints_api import create_endpoint, send_test_event
from tests.test_output_variants import completed, decode, get_output
from tests.test_spine import upload
from tests.test_upload_validation import (
    assert_nothing_kept,
    assert_problem,
    multipart_headers,
)

BOUNDARY = "darkroom-test"


def _nested(depth: int) -> str:
    """`depth` objects one inside the other, as JSON text (written by hand: the encoder cannot go deep)."""
    return '{"inner":' * depth + '"deep"' + "}" * depth


def _file_part(disposition: str, data: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; {disposition}\r\n\r\n'.encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


# --- text that is not Unicode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "disposition",
    [
        "filename*=utf-7''+2AA-.png",  # decodes to \ud800, half of a UTF-16 pair
        "filename*=unicode_escape''%5Cud800.png",  # the same, by another of Python's codecs
        "filename*=utf-8''%ED%A0%80.png",  # a surrogate encoded as UTF-8: not UTF-8
    ],
)
async def test_a_filename_that_is_not_unicode_text_is_refused_and_nothing_is_kept(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, disposition: str
) -> None:
    response = await client.post(
        "/v1/images", headers=multipart_headers(account), content=_file_part(disposition, imagegen.png())
    )

    body = assert_problem(response, 422, "validation_failed", fields=["file"])
    assert "filename*" in body["errors"][0]["message"]
    await assert_nothing_kept(client, account, redis, settings)


async def test_a_filename_star_in_utf8_or_latin1_is_kept(client: httpx.AsyncClient, account: Partner) -> None:
    for disposition, name in (
        (
            "filename*=UTF-8''%C3%A9t%C3%A9.png; filename=\"ete.png\"",
            "été.png",
        ),
        ("filename*=iso-8859-1'fr'%E9t%E9.png", "été.png"),
    ):
        response = await client.post(
            "/v1/images", headers=multipart_headers(account), content=_file_part(disposition, imagegen.png())
        )
        assert response.status_code == 202, response.text
        assert response.json()["input"]["filename"] == name


# --- JSON nested too deep ----------------------------------------------------------------------------


async def test_metadata_nested_deeper_than_the_limit_is_refused_and_nothing_is_kept(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    # 965 levels: the reader takes them, writing the record back out (a few frames deeper) did not.
    for depth in (MAX_JSON_DEPTH + 1, 965, 5000):
        response = await upload(client, account, imagegen.png(), metadata=_nested(depth))

        body = assert_problem(response, 422, "validation_failed")
        (error,) = body["errors"]
        assert error["field"].startswith("metadata")
        assert f"at most {MAX_JSON_DEPTH}" in error["message"]
        await assert_nothing_kept(client, account, redis, settings)

    kept = await upload(client, account, imagegen.png(), metadata=_nested(MAX_JSON_DEPTH))
    assert kept.status_code == 202, kept.text


async def test_a_json_body_nested_too_deep_is_refused_by_path(
    client: httpx.AsyncClient, account: Partner
) -> None:
    # Too deep even to read: the body as a whole is named.
    for depth, path in ((100, "metadata" + ".inner" * (MAX_JSON_DEPTH - 1)), (5000, "body")):
        response = await client.post(
            "/v1/batches",
            headers={**account.headers, "Content-Type": "application/json"},
            content='{"metadata":' + _nested(depth) + "}",
        )

        body = assert_problem(response, 422, "validation_failed")
        assert [error["field"] for error in body["errors"]] == [path]
    listing = await client.get("/v1/batches", headers=account.headers)
    assert listing.status_code == 200 and listing.json()["data"] == []


# --- previews of tiny results -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (3, 1), (1, 5)])
async def test_a_preview_of_a_result_a_few_pixels_wide_is_that_result_marked(
    client: httpx.AsyncClient, account: Partner, settings: Settings, size: tuple[int, int]
) -> None:
    image = await completed(client, account, settings, imagegen.png(*size), filename="dot.png")

    preview = decode(await get_output(client, account, image["id"], "?preview=true"))

    assert (preview.width, preview.height) == size


# --- times ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+00:01",  # year 0 in UTC
        "9999-12-31T23:59:59-00:01",  # year 10000 in UTC
        "20261121T100000Z",  # ISO 8601's basic form: not RFC 3339
        "2026-11-21T10:00:00+01:00:30",  # an offset with seconds
        "2026-11-21T10:00:00",  # no zone
    ],
)
async def test_a_time_that_is_not_an_rfc3339_moment_in_range_is_refused(
    client: httpx.AsyncClient, account: Partner, moment: str
) -> None:
    listing = await client.get(
        "/v1/deliveries", headers=account.headers, params={"created_after": moment, "created_before": moment}
    )
    assert_problem(listing, 422, "validation_failed", fields=["created_after", "created_before"])

    endpoint = await create_endpoint(client, account, "http://127.0.0.1:9/hooks")
    recover = await client.post(
        f"/v1/webhook-endpoints/{endpoint['id']}/recover", headers=account.headers, json={"since": moment}
    )
    assert_problem(recover, 422, "validation_failed", fields=["since"])


async def test_rfc3339_times_in_any_zone_and_case_are_read(
    client: httpx.AsyncClient, account: Partner
) -> None:
    endpoint = await create_endpoint(client, account, "http://127.0.0.1:9/hooks")
    for moment, canonical in (
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"),
        ("2026-11-21t10:00:00.123456789+01:00", "2026-11-21T09:00:00.123Z"),
        ("2026-11-21 10:00:00z", "2026-11-21T10:00:00.000Z"),
        ("2026-11-21T10:00-02:30", "2026-11-21T12:30:00.000Z"),  # seconds left out, as ISO 8601 allows
    ):
        recover = await client.post(
            f"/v1/webhook-endpoints/{endpoint['id']}/recover", headers=account.headers, json={"since": moment}
        )
        assert recover.status_code == 202, recover.text
        assert recover.json()["since"] == canonical


# --- request shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint_id", [[], {}, 7, True, "ep_x:pending"])
async def test_a_retry_naming_an_endpoint_by_anything_but_its_id_is_refused(
    client: httpx.AsyncClient, account: Partner, endpoint_id: object
) -> None:
    endpoint = await create_endpoint(client, account, "http://127.0.0.1:9/hooks")
    msg_id = await send_test_event(client, account, endpoint["id"])

    response = await client.post(
        f"/v1/deliveries/{msg_id}/retry", headers=account.headers, json={"endpoint_id": endpoint_id}
    )

    body = assert_problem(response, 422, "validation_failed", fields=["endpoint_id"])
    assert "ep_" in body["errors"][0]["message"]


# --- ids -----------------------------------------------------------------------------------------------


async def test_an_id_with_a_suffix_is_no_such_resource(client: httpx.AsyncClient, account: Partner) -> None:
    """`bat_…:images` named the batch's image index in Redis, of another type: a 503 as if Redis were down."""
    image = (await upload(client, account, imagegen.png())).json()
    batch = (await client.post("/v1/batches", headers=account.headers, json={})).json()
    endpoint = await create_endpoint(client, account, "http://127.0.0.1:9/hooks")
    msg_id = await send_test_event(client, account, endpoint["id"])
    ep = f"/v1/webhook-endpoints/{endpoint['id']}:pending"
    requests = [
        ("GET", f"/v1/images/{image['id']}:x"),
        ("DELETE", f"/v1/images/{image['id']}:x"),
        ("GET", f"/v1/images/{image['id']}:x/output"),
        ("GET", f"/v1/batches/{batch['id']}:images"),
        ("GET", f"/v1/batches/{batch['id']}:failures"),
        ("POST", f"/v1/batches/{batch['id']}:images/seal"),
        ("GET", f"/v1/batches/{batch['id']}:images/archive"),
        ("GET", f"/v1/deliveries/{msg_id}:callback"),
        ("POST", f"/v1/deliveries/{msg_id}:callback/retry"),
        ("GET", ep),
        ("DELETE", ep),
        ("GET", f"{ep}/secret"),
        ("POST", f"{ep}/test"),
        # A trailing slash is no route either: 404, not a redirect to the client's own Host header.
        ("GET", f"/v1/images/{image['id']}/"),
        ("GET", f"/v1/images/{image['id']}%2F"),
    ]
    for method, path in requests:
        response = await client.request(method, path, headers=account.headers)
        assert_problem(response, 404, "not_found")

    added = await client.post(
        f"/v1/batches/{batch['id']}:images/images",
        headers=account.headers,
        files={"file": ("a.png", imagegen.png(), "image/png")},
    )
    assert_problem(added, 404, "not_found")
    joined = await upload(client, account, imagegen.png(), batch_id=f"{batch['id']}:images")
    assert_problem(joined, 422, "validation_failed", fields=["batch_id"])
    listing = await client.get(
        "/v1/deliveries", headers=account.headers, params={"endpoint_id": f"{endpoint['id']}:pending"}
    )
    assert_problem(listing, 422, "validation_failed", fields=["endpoint_id"])


# --- animated output of a still picture ----------------------------------------------------------------


@pytest.mark.parametrize(
    "operations",
    [
        [{"type": "convert", "params": {"format": "webp", "animated": True}}],
        [
            {"type": "resize", "params": {"width": 32}},
            {"type": "convert", "params": {"format": "gif", "animated": True}},
        ],
    ],
)
async def test_animated_output_of_a_still_picture_is_its_one_frame(
    client: httpx.AsyncClient, account: Partner, settings: Settings, operations: list[dict[str, Any]]
) -> None:
    created = await upload(client, account, imagegen.jpeg(64, 48), operations=json.dumps(operations))
    assert created.status_code == 202, created.text

    await run_burst(settings)

    image = (await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)).json()
    assert image["status"] == "completed", image["error"]
    result = pyvips.Image.new_from_buffer((await get_output(client, account, image["id"])).content, "", n=-1)
    expected_width = 32 if operations[0]["type"] == "resize" else 64
    assert (result.width, result.get("n-pages") if result.get_typeof("n-pages") else 1) == (expected_width, 1)


async def test_a_batch_naming_a_url_by_anything_but_a_string_is_refused(
    client: httpx.AsyncClient, account: Partner
) -> None:
    """Found by the fuzzer once the body was a model: a callback_url of `true` met no message, a 500."""
    response = await client.post(
        "/v1/batches", headers=account.headers, json={"callback_url": True, "archive": -8.3e260}
    )
    problem = assert_problem(response, 422, "validation_failed")
    assert problem["errors"] == [
        {"field": "callback_url", "message": "must be a string"},
        {"field": "archive", "message": "must be an object"},
    ]
