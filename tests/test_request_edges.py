"""Requests at the edges of what the batch and endpoint routes read: JSON no response could give back,
and archive downloads with ranges they cannot use or an ETag the client already holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from redis.asyncio import Redis

from jobs.settings import Settings
from server.json_body import parse_json
from tests import imagegen
from tests.conftest import Partner
from tests.test_archive import built_batch
from tests.test_batches import add_files, create_batch
from tests.test_upload_validation import assert_problem

# --- JSON bodies and fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        pytest.param('{"metadata": {"a": 1e309}}', "metadata.a", "finite", id="overflowing-number"),
        pytest.param(
            '{"metadata": {"a": "\\udc00"}}', "metadata.a", "valid Unicode text", id="lone-surrogate"
        ),
        pytest.param('{"metadata": {"\\ud800": 1}}', "metadata", "valid Unicode text", id="surrogate-key"),
        pytest.param(
            '{"operations": [{"type": "resize", "params": {"\\udc00": 1}}]}',
            "operations[0].params",
            "valid Unicode text",
            id="surrogate-param-name",
        ),
        pytest.param(
            '{"metadata": {"n": ' + "1" * 5000 + "}}", "metadata.n", "4300 digits", id="long-integer"
        ),
        pytest.param(
            b'{"metadata": {"a": "\xed\xb0\x80"}}', "metadata.a", "valid Unicode text", id="encoded-surrogate"
        ),
    ],
)
async def test_batch_body_json_no_response_could_give_back_is_422(
    client: httpx.AsyncClient, account: Partner, redis: Redis, body: str | bytes, field: str, says: str
) -> None:
    response = await client.post(
        "/v1/batches", headers={**account.headers, "Content-Type": "application/json"}, content=body
    )
    problem = assert_problem(response, 422, "validation_failed", fields=[field])
    assert says in problem["errors"][0]["message"]
    assert "sys." not in response.text
    assert await redis.keys("dr:batch*") == []
    listed = await client.get("/v1/batches", headers=account.headers)
    assert listed.status_code == 200 and listed.json()["data"] == []


async def test_a_body_that_is_not_json_says_where(client: httpx.AsyncClient, account: Partner) -> None:
    response = await client.post(
        "/v1/batches",
        headers={**account.headers, "Content-Type": "application/json"},
        content=b'{"archive": tru}',
    )
    detail = assert_problem(response, 400, "invalid_json")["detail"]
    assert "line 1 column" in detail


def documented_errors() -> set[tuple[int, str]]:
    """(status, code) of every row of README's Errors table."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Errors", 1)[1].split("\n\n| status | code | when |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \|", table, re.MULTILINE)
    return {(int(status), code) for status, codes in rows for code in re.findall(r"`(\w+)`", codes)}


async def test_a_json_body_that_is_not_an_object_or_empty_is_refused_as_documented(
    client: httpx.AsyncClient, account: Partner
) -> None:
    """`[]` answered 422 `invalid_json`, and an empty body 422 `body_required`: the Errors table had
    `invalid_json` as a 400 only and no `body_required`, so a client keyed on the table missed both."""
    headers = {**account.headers, "Content-Type": "application/json"}
    for body, code in ((b"[]", "invalid_json"), (b"null", "invalid_json"), (b"", "body_required")):
        response = await client.post("/v1/webhook-endpoints", headers=headers, content=body)
        assert response.json()["code"] == code, body
        assert (response.status_code, code) in documented_errors(), body


def test_every_problem_the_service_raises_is_in_the_errors_table() -> None:
    """Each `Problem(status, "code", …)` written out in the source has its row (status and code)."""
    raised = set()
    for source in (Path(__file__).parent.parent / "server").glob("*.py"):
        for status, code in re.findall(r'Problem\(\s*(\d{3}),\s*"(\w+)"', source.read_text()):
            raised.add((int(status), code))
    assert raised - documented_errors() == set()


async def test_every_json_body_is_read_strictly(client: httpx.AsyncClient, account: Partner) -> None:
    """The endpoint routes share the reader: one of them stands for the rest."""
    response = await client.post(
        "/v1/webhook-endpoints",
        headers={**account.headers, "Content-Type": "application/json"},
        content='{"url": "https://example.com/hooks", "events": ["*"], "description": "\\udfff"}',
    )
    assert_problem(response, 422, "validation_failed", fields=["description"])


@pytest.mark.parametrize(
    ("name", "raw", "field"),
    [
        pytest.param("metadata", '{"a": "\\udc00"}', "metadata.a", id="metadata"),
        pytest.param(
            "operations", '[{"type": "resize", "params": {"\\udc00": 1}}]', "operations[0].params", id="ops"
        ),
        pytest.param("metadata", '{"a": 1e309}', "metadata.a", id="overflowing-number"),
    ],
)
async def test_batch_upload_fields_are_read_strictly(
    client: httpx.AsyncClient, account: Partner, name: str, raw: str, field: str
) -> None:
    batch_id = (await create_batch(client, account))["id"]
    response = await add_files(client, account, batch_id, [("a.jpg", imagegen.jpeg())], **{name: raw})
    assert_problem(response, 422, "validation_failed", fields=[field])
    batch = (await client.get(f"/v1/batches/{batch_id}", headers=account.headers)).json()
    assert batch["counts"]["total"] == 0


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=40,
)


@examples(max_examples=300, derandomize=True, database=None)
@given(value=JSON_VALUES, ascii_only=st.booleans())
def test_json_read_quickly_is_read_as_the_strict_reader_reads_it(value: Any, ascii_only: bool) -> None:
    """Most JSON is read by pydantic-core's reader, the rest by Python's: both read it the same."""
    raw = json.dumps(value, ensure_ascii=ascii_only)
    expected = json.loads(raw)
    for given_as in (raw, raw.encode()):
        read = parse_json(given_as)
        assert read == expected
        assert json.dumps(read) == json.dumps(expected)  # 1 and 1.0, -0.0 and 0.0 told apart


# --- archive downloads -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("items=0-5", id="another-unit"),
        pytest.param("bytes=10-5", id="last-before-first"),
        pytest.param("bytes=abc", id="not-a-range"),
        pytest.param("bytes=", id="empty-set"),
        pytest.param("bytes=1-2,x", id="one-bad-spec"),
    ],
)
async def test_a_range_the_server_cannot_use_is_ignored_with_the_whole_archive(
    client: httpx.AsyncClient, account: Partner, settings: Settings, value: str
) -> None:
    """RFC 9110 §14.2: a range in another unit, or of bad syntax, is ignored (200), not an error."""
    batch = await built_batch(client, account, settings, count=1, archive=True)
    whole = await client.get(batch["archive"]["url"], headers=account.headers)
    ranged = await client.get(batch["archive"]["url"], headers={**account.headers, "Range": value})
    assert ranged.status_code == 200, ranged.text
    assert ranged.content == whole.content
    assert "content-range" not in ranged.headers


async def test_if_none_match_with_the_archive_etag_is_304(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch = await built_batch(client, account, settings, count=1, archive=True)
    url = batch["archive"]["url"]
    etag = (await client.get(url, headers=account.headers)).headers["etag"]
    for held in (etag, f'"other", W/{etag}', "*"):
        response = await client.get(url, headers={**account.headers, "If-None-Match": held})
        assert response.status_code == 304, held
        assert response.content == b"" and response.headers["etag"] == etag
    changed = await client.get(url, headers={**account.headers, "If-None-Match": '"an-older-build"'})
    assert changed.status_code == 200 and changed.headers["etag"] == etag
    still_ranged = await client.get(url, headers={**account.headers, "Range": "bytes=0-9"})
    assert still_ranged.status_code == 206 and len(still_ranged.content) == 10
