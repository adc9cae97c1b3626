"""Plans and rate limits: every authenticated response says what is left of the account's allowances;
over one, a 429 with Retry-After, decided before an upload's body is read; the allowance refills."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from redis.asyncio import Redis

from jobs.plans import TIERS, Plan
from jobs.settings import Settings
from jobs.store import Store, hash_api_key
from server import cli
from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.conftest import Partner, make_account
from tests.test_batches import add_files, create_batch
from tests.test_direct_uploads import create_upload, put_bytes
from tests.test_spine import upload
from tests.test_upload_validation import assert_problem

PHOTO = imagegen.jpeg()
LIMIT_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
)


def plan(requests_per_minute: int = 6_000, uploads_per_minute: int = 1_500) -> Plan:
    return replace(
        TIERS["pro"],
        name="custom",
        requests_per_minute=requests_per_minute,
        uploads_per_minute=uploads_per_minute,
    )


def allowance(response: httpx.Response, name: str) -> dict[str, int]:
    """The `r` and `t` of `name` in the response's IETF RateLimit field."""
    found = re.search(rf'"{name}";r=(\d+);t=(\d+)', response.headers["ratelimit"])
    assert found is not None, response.headers["ratelimit"]
    return {"r": int(found[1]), "t": int(found[2])}


def assert_limited(response: httpx.Response, retry_after: int) -> None:
    assert_problem(response, 429, "rate_limited")
    assert response.headers["retry-after"] == str(retry_after)
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.headers["x-ratelimit-reset"] == str(retry_after)


async def test_every_kind_of_authenticated_response_carries_the_limits(
    client: httpx.AsyncClient, redis: object
) -> None:
    # One request back every 10 s, one upload every 20 s: nothing refills while the test runs.
    account = await make_account(redis, "partner", plan(requests_per_minute=6, uploads_per_minute=3))  # type: ignore[arg-type]
    uploaded = await upload(client, account, PHOTO)
    assert uploaded.status_code == 202
    image_id = uploaded.json()["id"]
    listed = await client.get("/v1/images", headers=account.headers)
    streamed = await client.get(f"/v1/images/{image_id}/original", headers=account.headers)
    missing = await client.get("/v1/images/img_missing", headers=account.headers)
    refused = await client.post("/v1/images", headers=account.headers, json={"source_url": 3})
    assert [listed.status_code, streamed.status_code, missing.status_code] == [200, 200, 404]
    assert streamed.content == PHOTO
    assert refused.status_code == 422
    for response in (uploaded, listed, streamed, missing, refused):
        assert response.headers["ratelimit-policy"] == '"requests";q=6;w=60, "uploads";q=3;w=60'
    for response in (listed, streamed, missing, refused):
        assert response.headers["x-ratelimit-limit"] == "6"
    # Each request took one, and each brings the whole allowance 10 s further off.
    answers = (listed, streamed, missing, refused)
    assert [allowance(answer, "requests") for answer in answers] == [
        {"r": 4, "t": 20},
        {"r": 3, "t": 30},
        {"r": 2, "t": 40},
        {"r": 1, "t": 50},
    ]
    assert [answer.headers["x-ratelimit-remaining"] for answer in answers] == ["4", "3", "2", "1"]
    assert [answer.headers["x-ratelimit-reset"] for answer in answers] == ["20", "30", "40", "50"]
    # The upload's X-RateLimit headers describe the uploads allowance; its RateLimit field both.
    assert uploaded.headers["x-ratelimit-limit"] == "3"
    assert uploaded.headers["x-ratelimit-remaining"] == "2"
    assert uploaded.headers["ratelimit"] == '"requests";r=5;t=10, "uploads";r=2;t=20'


async def test_unauthenticated_responses_carry_no_limits(client: httpx.AsyncClient, account: Partner) -> None:
    created = await create_upload(client, account, PHOTO)
    answers = [
        await client.get("/v1/images"),
        await client.get("/v1/images", headers={"Authorization": "Bearer sk_live_nobody"}),
        await client.get("/healthz"),
        # The signed PUT of a direct upload is no request of the account's: its POST counted.
        await put_bytes(client, created, PHOTO),
    ]
    assert [answer.status_code for answer in answers] == [401, 401, 200, 200]
    for answer in answers:
        assert not {*LIMIT_HEADERS, "ratelimit"} & set(answer.headers), answer.headers


async def test_over_the_request_limit_429_until_the_allowance_refills(
    client: httpx.AsyncClient, redis: object
) -> None:
    # 60 a minute: one more each second.
    partner = await make_account(redis, "busy", plan(requests_per_minute=60))  # type: ignore[arg-type]
    answers = [await client.get("/v1/images", headers=partner.headers) for _ in range(60)]
    assert {answer.status_code for answer in answers} == {200}
    assert answers[-1].headers["x-ratelimit-remaining"] == "0"
    refused = await client.get("/v1/images", headers=partner.headers)
    assert_limited(refused, retry_after=1)
    assert allowance(refused, "requests") == {"r": 0, "t": 1}
    assert "60 requests per minute" in refused.json()["detail"]
    await asyncio.sleep(int(refused.headers["retry-after"]))
    again = await client.get("/v1/images", headers=partner.headers)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining"] == "0"
    # Another account's allowance is its own.
    other = await make_account(redis, "quiet", plan(requests_per_minute=60))  # type: ignore[arg-type]
    assert (await client.get("/v1/images", headers=other.headers)).headers["x-ratelimit-remaining"] == "59"


async def never_ending_body(sent: asyncio.Event) -> AsyncIterator[bytes]:
    """The start of a multipart upload whose rest never comes: answered only if answered unread."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + PHOTO
    sent.set()
    await asyncio.Event().wait()


@pytest.mark.parametrize("path", ["/v1/images", "/v1/batches/{batch_id}/images"])
async def test_an_upload_over_the_limit_is_refused_before_its_body_is_read(
    client: httpx.AsyncClient, redis: object, path: str
) -> None:
    partner = await make_account(redis, "uploader", plan(uploads_per_minute=1))  # type: ignore[arg-type]
    batch = await create_batch(client, partner)
    assert (await upload(client, partner, PHOTO)).status_code == 202
    sent = asyncio.Event()
    refused = await asyncio.wait_for(
        client.post(
            path.format(batch_id=batch["id"]),
            headers={**partner.headers, "Content-Type": "multipart/form-data; boundary=b"},
            content=never_ending_body(sent),
        ),
        timeout=10,
    )
    assert_limited(refused, retry_after=60)
    assert refused.headers["x-ratelimit-limit"] == "1"
    assert allowance(refused, "uploads") == {"r": 0, "t": 60}
    listed = await client.get("/v1/images", headers=partner.headers)
    assert len(listed.json()["data"]) == 1


async def test_each_image_counts_as_an_upload_however_it_comes(
    client: httpx.AsyncClient, redis: object
) -> None:
    # One upload back every 60/7 = 8.6 s.
    partner = await make_account(redis, "mixed", plan(uploads_per_minute=7))  # type: ignore[arg-type]
    batch = await create_batch(client, partner)
    by_url = {"source_url": "http://127.0.0.1:9/a.jpg"}
    answers = [
        await upload(client, partner, PHOTO),
        await client.post("/v1/images", headers=partner.headers, json=by_url),
        await add_files(client, partner, batch["id"], [("a.jpg", PHOTO), ("b.jpg", PHOTO)]),
        await client.post(
            f"/v1/batches/{batch['id']}/images", headers=partner.headers, json={"images": [by_url]}
        ),
        await client.post(
            "/v1/uploads",
            headers=partner.headers,
            json={"filename": "a.jpg", "content_type": "image/jpeg", "size": len(PHOTO)},
        ),
    ]
    assert [answer.status_code for answer in answers] == [202, 202, 202, 202, 201]
    assert [allowance(answer, "uploads")["r"] for answer in answers] == [6, 5, 3, 2, 1]
    # Two images with one left: none is added (all or nothing), and the 429 says when both fit.
    two_more = await add_files(client, partner, batch["id"], [("c.jpg", PHOTO), ("d.jpg", PHOTO)])
    assert_problem(two_more, 429, "rate_limited")
    assert allowance(two_more, "uploads")["r"] == 1
    assert 1 <= int(two_more.headers["retry-after"]) <= 9
    images = (await client.get("/v1/images", headers=partner.headers)).json()["data"]
    assert len(images) == 6
    # The one left is still there for a single image.
    assert (await upload(client, partner, PHOTO)).status_code == 202


async def test_more_images_in_one_request_than_the_plan_ever_allows_is_422(
    client: httpx.AsyncClient, redis: object
) -> None:
    partner = await make_account(redis, "small", plan(uploads_per_minute=2))  # type: ignore[arg-type]
    batch = await create_batch(client, partner)
    files = [(f"{n}.jpg", PHOTO) for n in range(3)]
    refused = await add_files(client, partner, batch["id"], files)
    body = assert_problem(refused, 422, "too_many_images")
    assert "allows 2 per minute" in body["detail"]
    assert "retry-after" not in refused.headers
    # Nothing was taken: two still fit.
    assert (await add_files(client, partner, batch["id"], files[:2])).status_code == 202


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_accounts_create_update_and_show_set_the_plan(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    code, out, _ = run_cli(capsys, "accounts", "create", "--name", "acme", "--plan", "free", "--json")
    assert code == 0
    account_id = json.loads(out)["account_id"]
    code, out, _ = run_cli(capsys, "accounts", "show", account_id, "--json")
    assert json.loads(out)["plan"] == {
        "name": "free",
        "requests_per_minute": 120,
        "uploads_per_minute": 30,
        "max_processing": 2,
        "share": 1,
    }
    # Custom numbers on top of the account's plan: a custom plan.
    code, out, _ = run_cli(capsys, "accounts", "update", account_id, "--max-processing", "64", "--json")
    assert json.loads(out)["plan"] == {
        "name": "custom",
        "requests_per_minute": 120,
        "uploads_per_minute": 30,
        "max_processing": 64,
        "share": 1,
    }
    # A tier again, in words.
    code, out, _ = run_cli(capsys, "accounts", "update", account_id, "--plan", "scale")
    assert code == 0
    assert "Plan:                 scale" in out and "requests/minute:    30,000" in out
    code, out, _ = run_cli(capsys, "accounts", "show", account_id)
    assert f"Account {account_id} (acme)" in out and "uploads/minute:     10,000" in out
    assert run_cli(capsys, "accounts", "show", "acc_nobody")[::2] == (1, "darkroom: no account acc_nobody\n")
    with pytest.raises(SystemExit):
        run_cli(capsys, "accounts", "update", account_id, "--share", "0")
    assert "must be 1 or more" in capsys.readouterr().err
    for blank in ("", "  "):
        with pytest.raises(SystemExit):
            run_cli(capsys, "accounts", "create", "--name", blank)
        assert "argument --name: must not be blank" in capsys.readouterr().err


def test_accounts_commands_say_redis_is_unreachable_in_one_line(
    unused_tcp_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{unused_tcp_port}/0")
    for command in (
        ("create", "--name", "acme"),
        ("show", "acc_nobody"),
        ("update", "acc_nobody", "--share", "2"),
    ):
        code, out, err = run_cli(capsys, "accounts", *command)
        assert (code, out) == (1, ""), command
        assert err.startswith("darkroom: cannot reach Redis") and err.count("\n") == 1, err


def test_accounts_commands_without_redis_url_say_where_to_find_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run in another terminal than `darkroom dev`, the command has no REDIS_URL: it is told where one is
    (it said 'darkroom dev sets it for you', which it does only for its own processes)."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    code, out, err = run_cli(capsys, "accounts", "create", "--name", "acme")
    assert (code, out) == (2, "")
    assert err.startswith("darkroom: REDIS_URL is not set") and "darkroom dev prints its own" in err, err


def test_accounts_commands_with_a_redis_url_that_is_no_redis_url_say_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`REDIS_URL=localhost:6379` (no scheme) ended in redis-py's ValueError and a 20-line traceback."""
    monkeypatch.setenv("REDIS_URL", "localhost:6379")
    code, out, err = run_cli(capsys, "accounts", "create", "--name", "acme")
    assert (code, out) == (2, "")
    assert err.startswith("darkroom: REDIS_URL must be redis://host:port/0") and err.count("\n") == 1, err
    assert "'localhost:6379'" in err


def test_accounts_commands_give_up_on_a_redis_that_never_answers() -> None:
    """A frozen Redis (or a dropped network) accepts the connection and answers nothing: the command says
    so and exits, within its timeout (subprocess.run's own timeout fails the test if it hangs)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        command = [
            sys.executable,
            "-c",
            "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))",
        ]
        finished = subprocess.run(
            [*command, "accounts", "show", "acc_nobody"],
            env={**os.environ, "REDIS_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"},
            capture_output=True,
            text=True,
            timeout=cli.REDIS_COMMAND_TIMEOUT_SECONDS + 30,
        )
    assert (finished.returncode, finished.stdout) == (1, "")
    assert finished.stderr.startswith("darkroom: cannot reach Redis"), finished.stderr


async def test_a_changed_plan_applies_from_the_next_request(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: object
) -> None:
    assert (await client.get("/v1/images", headers=account.headers)).headers["x-ratelimit-limit"] == "6000"
    await Store(redis).change_plan(account.id, lambda _: TIERS["free"])  # type: ignore[arg-type]
    after = await client.get("/v1/images", headers=account.headers)
    assert after.headers["x-ratelimit-limit"] == "120"


async def test_a_replayed_request_counts_and_carries_its_own_limits(
    client: httpx.AsyncClient, redis: object
) -> None:
    partner = await make_account(redis, "retrier", plan(requests_per_minute=6))  # type: ignore[arg-type]
    keyed = {**partner.headers, "Idempotency-Key": "create-batch-1"}
    first = await client.post("/v1/batches", headers=keyed, json={})
    replayed = await client.post("/v1/batches", headers=keyed, json={})
    assert [first.status_code, replayed.status_code] == [201, 201]
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json()["id"] == first.json()["id"]
    assert [allowance(first, "requests"), allowance(replayed, "requests")] == [
        {"r": 5, "t": 10},
        {"r": 4, "t": 20},
    ]
    assert replayed.headers["x-ratelimit-remaining"] == "4"


async def test_a_direct_upload_over_the_request_limit_is_429_whatever_its_body(
    client: httpx.AsyncClient, redis: object
) -> None:
    # The create counts its request with its image, after reading the body: the answer is the same.
    partner = await make_account(redis, "hasty", plan(requests_per_minute=2))  # type: ignore[arg-type]
    declared = {"filename": "a.jpg", "content_type": "image/jpeg", "size": len(PHOTO)}
    created = await client.post("/v1/uploads", headers=partner.headers, json=declared)
    refused = await client.post("/v1/uploads", headers=partner.headers, json={**declared, "size": 0})
    assert [created.status_code, refused.status_code] == [201, 422]
    assert [allowance(created, "requests"), allowance(refused, "requests")] == [
        {"r": 1, "t": 30},
        {"r": 0, "t": 60},
    ]
    assert allowance(created, "uploads")["r"] == 1_499
    answers = [
        await client.post("/v1/uploads", headers=partner.headers, json=declared),
        await client.post("/v1/uploads", headers=partner.headers, json={**declared, "size": 0}),
        await client.post("/v1/uploads", headers=partner.headers, content=b"{"),
    ]
    for answer in answers:
        assert_limited(answer, retry_after=30)
        assert "uploads" not in answer.headers["ratelimit"]
    listed = await client.get("/v1/images", headers=partner.headers)
    assert listed.status_code == 429
    images = await Store(redis).list_images(partner.id, limit=10)  # type: ignore[arg-type]
    assert [image.id for image in images] == [created.json()["image"]["id"]]


async def test_a_direct_upload_by_a_key_seen_before_counts_on_its_account_as_it_is_now(
    client: httpx.AsyncClient, redis: object
) -> None:
    # The web process remembers the key's account and checks it in the step that saves the image.
    partner = await make_account(redis, "seen", plan(requests_per_minute=60, uploads_per_minute=60))  # type: ignore[arg-type]
    declared = {"filename": "a.jpg", "content_type": "image/jpeg", "size": len(PHOTO)}
    first = await client.post("/v1/uploads", headers=partner.headers, json=declared)
    assert first.headers["ratelimit"] == '"requests";r=59;t=1, "uploads";r=59;t=1'
    await Store(redis).change_plan(partner.id, lambda _: plan(requests_per_minute=60, uploads_per_minute=2))  # type: ignore[arg-type]
    second = await client.post("/v1/uploads", headers=partner.headers, json=declared)
    assert second.status_code == 201
    assert second.headers["ratelimit-policy"] == '"requests";q=60;w=60, "uploads";q=2;w=60'
    assert [allowance(second, "requests")["r"], allowance(second, "uploads")["r"]] == [58, 0]
    third = await client.post("/v1/uploads", headers=partner.headers, json=declared)
    assert_problem(third, 429, "rate_limited")
    assert allowance(third, "requests")["r"] == 57


async def test_a_key_that_names_no_account_any_more_creates_nothing_though_seen_before(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    partner = await make_account(redis, "gone")
    declared = {"filename": "a.jpg", "content_type": "image/jpeg", "size": len(PHOTO)}
    assert (await client.post("/v1/uploads", headers=partner.headers, json=declared)).status_code == 201
    await redis.delete(f"dr:apikey:{hash_api_key(partner.api_key)}")
    answers = [
        await client.post("/v1/uploads", headers=partner.headers, json=declared),
        await client.post("/v1/uploads", headers=partner.headers, json={**declared, "size": 0}),
    ]
    for answer in answers:
        assert_problem(answer, 401, "invalid_api_key")
        assert "ratelimit" not in answer.headers
    assert len(await Store(redis).list_images(partner.id, limit=10)) == 1
