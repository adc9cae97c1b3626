"""API keys and account isolation: a missing or wrong key is 401, another account's id is 404."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import cast

import httpx
import pytest
from redis.asyncio import Redis

from jobs.settings import Settings
from tests import imagegen
from tests.conftest import Partner, api_clients, make_account, run_burst, with_settings
from tests.receiver import Receiver
from tests.test_spine import upload
from tests.test_upload_validation import assert_nothing_kept, assert_problem, staged_files

# Every route that needs a key, with an id that does not exist: without a valid key the answer is 401,
# never 404, so a caller without a key learns nothing about which ids exist.
PROTECTED = [
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("GET", "/v1/images/img_01jd0000000000000000000000"),
    ("GET", "/v1/images/img_01jd0000000000000000000000/output"),
    ("GET", "/v1/images/img_01jd0000000000000000000000/original"),
    ("DELETE", "/v1/images/img_01jd0000000000000000000000"),
    ("GET", "/v1/deliveries"),
    ("GET", "/v1/deliveries/msg_01jd0000000000000000000000"),
    ("GET", "/v1/webhook-secret"),
]


def assert_unauthorized(response: httpx.Response) -> None:
    assert_problem(response, 401)
    challenge = response.headers["www-authenticate"]
    assert challenge.lower().startswith("bearer")


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_no_key_is_401_with_a_challenge(
    client: httpx.AsyncClient, account: Partner, method: str, path: str
) -> None:
    response = await client.request(method, path)
    assert_unauthorized(response)
    assert "Bearer" in response.json()["detail"]  # tells the partner how to send it


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_wrong_key_is_401(client: httpx.AsyncClient, account: Partner, method: str, path: str) -> None:
    wrong = account.api_key[:-4] + ("aaaa" if not account.api_key.endswith("aaaa") else "bbbb")
    response = await client.request(method, path, headers={"Authorization": f"Bearer {wrong}"})
    assert_unauthorized(response)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("", id="empty"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="scheme-and-space"),
        pytest.param("sk_live_abc", id="no-scheme"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer sk_test_abcdef", id="other-prefix"),
        pytest.param("Bearer not-a-key-at-all", id="garbage"),
        pytest.param("Bearer sk_live_" + "a" * 5000, id="very-long"),
    ],
)
async def test_malformed_authorization_is_401(
    client: httpx.AsyncClient, account: Partner, authorization: str
) -> None:
    response = await client.get("/v1/images", headers={"Authorization": authorization})
    assert_unauthorized(response)


@pytest.mark.parametrize(
    ("sent", "said"),
    [
        pytest.param("whsec_", "this is a webhook secret (whsec_…), which verifies webhooks", id="secret"),
        pytest.param("sk_test_abc", "API keys start with sk_live_", id="other-prefix"),
        pytest.param("sk_live_", "no account has it", id="unknown"),
    ],
)
async def test_a_refused_key_says_what_to_send_instead(
    client: httpx.AsyncClient, account: Partner, sent: str, said: str
) -> None:
    """A partner who pasted the webhook secret, or a key of another kind, is told so."""
    key = account.webhook_secret if sent == "whsec_" else sent + ("x" * 43 if sent == "sk_live_" else "")
    response = await client.get("/v1/images", headers={"Authorization": f"Bearer {key}"})
    assert_unauthorized(response)
    assert said in response.json()["detail"]


async def test_key_without_bearer_scheme_is_refused(client: httpx.AsyncClient, account: Partner) -> None:
    """A real key pasted without `Bearer ` is still not accepted: the scheme is part of the contract."""
    response = await client.get("/v1/images", headers={"Authorization": account.api_key})
    assert_unauthorized(response)


async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient, account: Partner) -> None:
    response = await client.get("/v1/images", headers={"Authorization": f"bearer {account.api_key}"})
    assert response.status_code == 200, response.text


async def test_x_api_key_header_works(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    headers = {"X-API-Key": account.api_key}
    created = await client.post(
        "/v1/images", headers=headers, files={"file": ("photo.jpg", imagegen.jpeg(), "image/jpeg")}
    )
    assert created.status_code == 202, created.text
    image_id = created.json()["id"]
    fetched = await client.get(f"/v1/images/{image_id}", headers=headers)
    assert fetched.status_code == 200
    assert fetched.json()["id"] == image_id
    listing = await client.get("/v1/images", headers=headers)
    assert [image["id"] for image in listing.json()["data"]] == [image_id]


@pytest.mark.parametrize("padding", [" ", "\t", "  \t "])
async def test_x_api_key_is_trimmed_like_bearer_credentials(
    client: httpx.AsyncClient, account: Partner, padding: str
) -> None:
    bearer = await client.get("/v1/images", headers={"Authorization": f"Bearer {account.api_key}{padding}"})
    assert bearer.status_code == 200, bearer.text
    response = await client.get("/v1/images", headers={"X-API-Key": f"{padding}{account.api_key}{padding}"})
    assert response.status_code == 200, response.text
    blank = await client.get("/v1/images", headers={"X-API-Key": padding})
    assert_unauthorized(blank)
    assert blank.json()["code"] == "missing_api_key"


async def test_wrong_x_api_key_is_401(client: httpx.AsyncClient, account: Partner) -> None:
    response = await client.get("/v1/images", headers={"X-API-Key": "sk_live_wrong"})
    assert_unauthorized(response)


async def test_unauthenticated_upload_stores_nothing(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    """The key is checked before the body is read: nothing is staged for a caller without one."""
    response = await client.post(
        "/v1/images",
        headers={"Authorization": "Bearer sk_live_wrong"},
        files={"file": ("photo.jpg", imagegen.jpeg(), "image/jpeg")},
    )
    assert_unauthorized(response)
    assert staged_files(settings) == []
    await assert_nothing_kept(client, account, redis, settings)


async def everything_in_redis(redis: Redis) -> bytes:
    """Every key and every value, whatever its type, as one blob to search."""
    found: list[bytes] = []
    for key in await redis.keys("*"):
        kind = (await redis.type(key)).decode()
        found.append(key)
        if kind == "string":
            found.append(await redis.get(key) or b"")
        elif kind == "zset":
            found.extend(await redis.zrange(key, 0, -1))
        elif kind == "hash":
            fields = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(key))
            found.extend(part for item in fields.items() for part in item)
        elif kind == "list":
            found.extend(await cast(Awaitable[list[bytes]], redis.lrange(key, 0, -1)))
        elif kind == "set":
            found.extend(await cast(Awaitable[set[bytes]], redis.smembers(key)))
        else:
            raise AssertionError(f"{key!r} is a {kind}; teach this search to read it")
    return b"\n".join(found)


async def test_keys_are_stored_only_as_hashes(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    assert (await upload(client, account, imagegen.jpeg())).status_code == 202
    await run_burst(settings)
    stored = await everything_in_redis(redis)
    assert account.id.encode() in stored  # the search does see the account
    assert account.api_key.removeprefix("sk_live_").encode() not in stored


# --- another account's resources ------------------------------------------------------------------


async def test_another_accounts_image_is_404_everywhere(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    owner_image = await upload(client, account, imagegen.jpeg())
    assert owner_image.status_code == 202
    image_id = owner_image.json()["id"]
    await run_burst(settings)  # completed, so /output exists for its owner
    intruder = await make_account(redis, "intruder")

    for method, path in [
        ("GET", f"/v1/images/{image_id}"),
        ("GET", f"/v1/images/{image_id}/output"),
        ("GET", f"/v1/images/{image_id}/original"),
        ("DELETE", f"/v1/images/{image_id}"),
    ]:
        response = await client.request(method, path, headers=intruder.headers)
        assert_problem(response, 404, "not_found")

    # Indistinguishable from an id that never existed (asked under one request id, which both echo).
    asking = {**intruder.headers, "X-Request-Id": "probe"}
    missing = await client.get("/v1/images/img_01jd0000000000000000000000", headers=asking)
    foreign = await client.get(f"/v1/images/{image_id}", headers=asking)
    assert missing.json() == foreign.json()

    # The owner still has everything, the intruder's DELETE changed nothing.
    for path in (
        f"/v1/images/{image_id}",
        f"/v1/images/{image_id}/output",
        f"/v1/images/{image_id}/original",
    ):
        assert (await client.get(path, headers=account.headers)).status_code == 200, path
    assert (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()[
        "status"
    ] == "completed"


async def test_another_accounts_delivery_is_404(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings, receiver: Receiver
) -> None:
    response = await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
    assert response.status_code == 202
    await run_burst(settings)
    (delivery,) = await asyncio.to_thread(receiver.wait_for, 1)
    msg_id = delivery.headers["webhook-id"]
    assert (await client.get(f"/v1/deliveries/{msg_id}", headers=account.headers)).status_code == 200

    intruder = await make_account(redis, "intruder")
    assert_problem(await client.get(f"/v1/deliveries/{msg_id}", headers=intruder.headers), 404, "not_found")
    listing = await client.get("/v1/deliveries", headers=intruder.headers)
    assert listing.status_code == 200
    assert listing.json()["data"] == []


async def test_listings_never_show_another_accounts_images(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    other = await make_account(redis, "other")
    mine = [(await upload(client, account, imagegen.jpeg())).json()["id"] for _ in range(3)]
    theirs = [(await upload(client, other, imagegen.png())).json()["id"] for _ in range(2)]
    await run_burst(settings)
    mine.append((await upload(client, account, imagegen.jpeg())).json()["id"])  # one still queued

    for partner, own, foreign in ((account, mine, theirs), (other, theirs, mine)):
        for query in ("", "?status=completed", "?status=queued", "?limit=1"):
            listed = await client.get(f"/v1/images{query}", headers=partner.headers)
            assert listed.status_code == 200
            ids = {image["id"] for image in listed.json()["data"]}
            assert ids <= set(own), query
            assert not ids & set(foreign), query
        everything = await client.get("/v1/images?limit=100", headers=partner.headers)
        assert {image["id"] for image in everything.json()["data"]} == set(own)


async def test_webhook_secret_is_the_accounts_own(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    other = await make_account(redis, "other")
    mine = (await client.get("/v1/webhook-secret", headers=account.headers)).json()
    theirs = (await client.get("/v1/webhook-secret", headers=other.headers)).json()
    assert mine["secret"] == account.webhook_secret
    assert theirs["secret"] == other.webhook_secret
    assert mine["secret"] != theirs["secret"]


async def commands_run(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_an_address_that_keeps_sending_wrong_keys_is_refused_without_lookups(
    settings: Settings, redis: Redis
) -> None:
    guessing = {"Authorization": "Bearer sk_live_guess"}
    partner = await make_account(redis, "partner")
    newcomer = await make_account(redis, "newcomer")
    limited = with_settings(settings, failed_auth_limit=3, failed_auth_window=600)
    async with api_clients(limited, ["203.0.113.7", "203.0.113.8"]) as (guesser, neighbour):
        assert (await guesser.get("/v1/images", headers=partner.headers)).status_code == 200
        for _ in range(3):
            assert_problem(await guesser.get("/v1/images", headers=guessing), 401, "invalid_api_key")
        refused = await guesser.get("/v1/images", headers=guessing)
        assert_problem(refused, 429, "too_many_failed_authentications")
        # GCRA: one failure of the three comes back every 200 s.
        assert 190 <= int(refused.headers["retry-after"]) <= 200
        assert "ratelimit" not in refused.headers

        await redis.config_resetstat()
        for _ in range(5):
            answer = await guesser.get("/v1/images", headers=guessing)
            assert_problem(answer, 429, "too_many_failed_authentications")
        # A key this process has not accepted before is not looked up either, valid or not.
        assert_problem(await guesser.get("/v1/images", headers=newcomer.headers), 429)
        assert await commands_run(redis, "evalsha") == 0

        # A key accepted before still works from there; and another address is not limited.
        assert (await guesser.get("/v1/images", headers=partner.headers)).status_code == 200
        assert_problem(await neighbour.get("/v1/images", headers=guessing), 401, "invalid_api_key")
        assert (await neighbour.get("/v1/images", headers=newcomer.headers)).status_code == 200


async def test_a_missing_key_is_no_failed_authentication(settings: Settings) -> None:
    async with api_clients(with_settings(settings, failed_auth_limit=1), ["203.0.113.9"]) as (client,):
        for _ in range(3):
            assert_problem(await client.get("/v1/images"), 401, "missing_api_key")
        assert_problem(await client.get("/v1/images", headers={"X-API-Key": "sk_live_x"}), 401)


async def test_a_client_on_this_machine_is_answered_401_however_often(settings: Settings) -> None:
    loopback = ["127.0.0.1", "::1", "::ffff:127.0.0.1"]
    async with api_clients(with_settings(settings, failed_auth_limit=1), loopback) as clients:
        for client in clients:
            for _ in range(3):
                assert_problem(await client.get("/v1/images", headers={"X-API-Key": "sk_live_x"}), 401)


async def test_ipv6_clients_count_their_failures_by_64_prefix(settings: Settings) -> None:
    guessing = {"Authorization": "Bearer sk_live_guess"}
    addresses = ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:8::1"]
    async with api_clients(with_settings(settings, failed_auth_limit=1), addresses) as (one, same, other):
        assert_problem(await one.get("/v1/images", headers=guessing), 401)
        assert_problem(await same.get("/v1/images", headers=guessing), 429, "too_many_failed_authentications")
        assert_problem(await other.get("/v1/images", headers=guessing), 401)
