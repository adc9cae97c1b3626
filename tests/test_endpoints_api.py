"""`/v1/webhook-endpoints`: create, validate, list, read, edit, delete, secrets, and ownership."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobs.settings import Settings
from server.endpoints import MAX_ENDPOINTS_PER_ACCOUNT
from tests.conftest import Partner, api_client, make_account, with_settings, worker_deps
from tests.receiver import Receiver
from tests.test_upload_validation import assert_problem
from webhooks.endpoints import MAX_VALID_SECRETS, EndpointStore, valid_secrets
from webhooks.messages import now_ms

ENDPOINTS = "/v1/webhook-endpoints"
# Endpoint URLs for tests that never deliver: registration does not connect to them.
SOMEWHERE = "http://127.0.0.1:9/hooks"


async def create_endpoint(
    client: httpx.AsyncClient, account: Partner, url: str, events: list[str] | None = None, **fields: Any
) -> dict[str, Any]:
    body = {"url": url, **({} if events is None else {"events": events}), **fields}
    response = await client.post(ENDPOINTS, headers=account.headers, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def send_test_event(client: httpx.AsyncClient, account: Partner, endpoint_id: str) -> str:
    """A `webhook.test` message to the endpoint, pending; its id."""
    response = await client.post(f"{ENDPOINTS}/{endpoint_id}/test", headers=account.headers)
    assert response.status_code == 202, response.text
    msg_id: str = response.json()["id"]
    return msg_id


async def delivery_log(client: httpx.AsyncClient, account: Partner, msg_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/deliveries/{msg_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    log: dict[str, Any] = response.json()
    return log


async def get_endpoint(client: httpx.AsyncClient, account: Partner, endpoint_id: str) -> dict[str, Any]:
    response = await client.get(f"{ENDPOINTS}/{endpoint_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    endpoint: dict[str, Any] = response.json()
    return endpoint


async def deliver(settings: Settings) -> None:
    """Send every due delivery, retries included, as a worker's dispatcher would (in this process)."""
    async with worker_deps(settings) as deps:
        await deps.dispatcher.run_until_idle()


def secret_bytes(secret: str) -> bytes:
    assert secret.startswith("whsec_")
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


async def test_create_answers_201_with_the_endpoint_and_its_own_secret(
    client: httpx.AsyncClient, account: Partner
) -> None:
    response = await client.post(
        ENDPOINTS,
        headers=account.headers,
        json={
            "url": SOMEWHERE,
            "events": ["image.failed", "image.completed", "image.failed"],
            "description": "orders service",
            "max_in_flight": 3,
            "rate_limit": 50,
        },
    )

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["object"] == "webhook_endpoint"
    assert created["id"].startswith("ep_")
    assert created["url"] == SOMEWHERE
    assert created["events"] == ["image.completed", "image.failed"]  # deduplicated
    assert created["description"] == "orders service"
    assert (created["max_in_flight"], created["rate_limit"]) == (3, 50)
    assert created["status"] == "enabled"
    assert created["disabled_reason"] is None and created["failing_since"] is None
    assert 24 <= len(secret_bytes(created["secret"])) <= 64
    assert created["secret"] != account.webhook_secret


async def test_create_defaults_to_every_event_and_ten_in_flight(
    client: httpx.AsyncClient, account: Partner
) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    assert created["events"] == ["*"]
    assert created["description"] == ""
    assert (created["max_in_flight"], created["rate_limit"]) == (10, None)


async def test_every_endpoint_gets_a_different_secret(client: httpx.AsyncClient, account: Partner) -> None:
    first = await create_endpoint(client, account, SOMEWHERE)
    second = await create_endpoint(client, account, SOMEWHERE)
    assert first["secret"] != second["secret"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param({"url": "example.com/hooks"}, "url", "http:// or https://", id="no-scheme"),
        pytest.param({"url": "ftp://example.com/hooks"}, "url", "http:// or https://", id="ftp"),
        pytest.param({"url": 42}, "url", "must be a string", id="url-not-a-string"),
        pytest.param({"events": ["*"]}, "url", "is required", id="url-missing"),
        pytest.param({"url": "http://a b.example/"}, "url", "spaces", id="url-with-space"),
        pytest.param(
            {"url": SOMEWHERE, "events": ["image.done"]},
            "events",
            "unknown event types: image.done",
            id="event",
        ),
        pytest.param({"url": SOMEWHERE, "events": []}, "events", "non-empty list", id="no-events"),
        pytest.param({"url": SOMEWHERE, "events": "image.completed"}, "events", "list", id="events-string"),
        pytest.param({"url": SOMEWHERE, "max_in_flight": 0}, "max_in_flight", "1 to 100", id="in-flight-0"),
        pytest.param(
            {"url": SOMEWHERE, "max_in_flight": 101}, "max_in_flight", "1 to 100", id="in-flight-101"
        ),
        pytest.param(
            {"url": SOMEWHERE, "max_in_flight": "5"}, "max_in_flight", "integer", id="in-flight-text"
        ),
        pytest.param(
            {"url": SOMEWHERE, "max_in_flight": True}, "max_in_flight", "integer", id="in-flight-bool"
        ),
        pytest.param(
            {"url": SOMEWHERE, "max_in_flight": None}, "max_in_flight", "integer", id="in-flight-null"
        ),
        pytest.param({"url": SOMEWHERE, "rate_limit": 0}, "rate_limit", "1 to 10000", id="rate-0"),
        pytest.param({"url": SOMEWHERE, "rate_limit": 2.5}, "rate_limit", "integer", id="rate-float"),
        pytest.param({"url": SOMEWHERE, "rate_limit": 10_001}, "rate_limit", "1 to 10000", id="rate-big"),
        pytest.param({"url": SOMEWHERE, "description": "x" * 257}, "description", "at most", id="long-text"),
        pytest.param({"url": SOMEWHERE, "colour": "red"}, "colour", "unknown field", id="unknown-field"),
        pytest.param({"url": SOMEWHERE, "secret": "whsec_AAAA"}, "secret", "unknown field", id="own-secret"),
        pytest.param(
            {"url": SOMEWHERE, "status": "disabled"}, "status", "unknown field", id="status-on-create"
        ),
    ],
)
async def test_create_refuses_invalid_fields_naming_them(
    client: httpx.AsyncClient, account: Partner, body: dict[str, Any], field: str, message: str
) -> None:
    response = await client.post(ENDPOINTS, headers=account.headers, json=body)

    problem = assert_problem(response, 422, "validation_failed", fields=[field])
    (error,) = [error for error in problem["errors"] if error["field"] == field]
    assert message in error["message"], error
    listed = (await client.get(ENDPOINTS, headers=account.headers)).json()
    assert listed["data"] == []


async def test_every_problem_of_a_create_is_reported_at_once(
    client: httpx.AsyncClient, account: Partner
) -> None:
    body = {"url": "ftp://x", "events": ["nope"], "max_in_flight": 0, "rate_limit": -1, "extra": 1}
    response = await client.post(ENDPOINTS, headers=account.headers, json=body)
    problem = assert_problem(
        response, 422, "validation_failed", fields=["url", "events", "max_in_flight", "rate_limit", "extra"]
    )
    assert len(problem["errors"]) == 5


@pytest.fixture
async def guarded_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API as production runs it: endpoints must reach public addresses only."""
    async with api_client(with_settings(settings, allow_private_callbacks=False)) as http:
        yield http


class PartnerDNS:
    """Names under `.partner.test` resolve to the addresses a test sets (others as usual); every lookup
    of one is counted."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> PartnerDNS:
        real = socket.getaddrinfo

        def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            if not host.endswith(".partner.test"):
                return real(host, port, *args, **kwargs)
            self.lookups.append(host)
            if host not in self.answers:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [
                (
                    socket.AF_INET6 if ":" in address else socket.AF_INET,
                    socket.SOCK_STREAM,
                    6,
                    "",
                    (address, port),
                )
                for address in self.answers[host]
            ]

        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        return self


@pytest.fixture
def partner_dns(monkeypatch: pytest.MonkeyPatch) -> PartnerDNS:
    return PartnerDNS().install(monkeypatch)


@pytest.mark.parametrize(
    ("url", "answer", "message"),
    [
        pytest.param("http://127.0.0.1:8787/hooks", [], "loopback", id="loopback"),
        pytest.param("http://169.254.169.254/latest/", [], "link-local", id="cloud-metadata"),
        pytest.param("http://[::ffff:10.0.0.7]/hooks", [], "hiding 10.0.0.7", id="ipv4-mapped"),
        pytest.param("http://localhost:8787/hooks", [], "local name", id="localhost"),
        pytest.param(
            "https://hooks.partner.test/", ["192.168.1.20"], "private address", id="name-to-rfc1918"
        ),
        pytest.param(
            "https://hooks.partner.test/",
            ["93.184.216.34", "10.0.0.7"],
            "10.0.0.7",
            id="name-to-public-and-private",
        ),
        pytest.param("https://nowhere.partner.test/", [], "cannot resolve", id="name-not-resolving"),
    ],
)
async def test_create_refuses_private_destinations_in_production(
    guarded_client: httpx.AsyncClient,
    account: Partner,
    partner_dns: PartnerDNS,
    url: str,
    answer: list[str],
    message: str,
) -> None:
    if answer:
        partner_dns.answers["hooks.partner.test"] = answer
    response = await guarded_client.post(ENDPOINTS, headers=account.headers, json={"url": url})

    problem = assert_problem(response, 422, "validation_failed", fields=["url"])
    assert message in problem["errors"][0]["message"], problem


async def test_create_accepts_public_destinations_in_production(
    guarded_client: httpx.AsyncClient, account: Partner, partner_dns: PartnerDNS
) -> None:
    partner_dns.answers["hooks.partner.test"] = ["93.184.216.34"]
    for url in ("https://hooks.partner.test/in", "https://93.184.216.34/hooks"):
        await create_endpoint(guarded_client, account, url)


async def test_list_and_get_show_the_accounts_endpoints_without_secrets(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    first = await create_endpoint(client, account, SOMEWHERE, ["image.completed"])
    second = await create_endpoint(client, account, "http://127.0.0.1:10/other", ["*"])
    stranger = await make_account(redis, "stranger")
    await create_endpoint(client, stranger, SOMEWHERE)

    listed = (await client.get(ENDPOINTS, headers=account.headers)).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert sorted(item["id"] for item in listed["data"]) == sorted([first["id"], second["id"]])
    assert all("secret" not in item for item in listed["data"])

    shown = await get_endpoint(client, account, first["id"])
    assert shown == {key: value for key, value in first.items() if key != "secret"}


async def test_the_secret_is_readable_and_rotates(client: httpx.AsyncClient, account: Partner) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    path = f"{ENDPOINTS}/{created['id']}"

    read = (await client.get(f"{path}/secret", headers=account.headers)).json()
    assert read == {"object": "webhook_secret", "secret": created["secret"]}

    rotated = await client.post(f"{path}/rotate-secret", headers=account.headers)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret != created["secret"]
    assert 24 <= len(secret_bytes(new_secret)) <= 64
    assert rotated.json()["id"] == created["id"]
    again = (await client.get(f"{path}/secret", headers=account.headers)).json()
    assert again["secret"] == new_secret


async def test_patch_changes_only_the_fields_given(client: httpx.AsyncClient, account: Partner) -> None:
    created = await create_endpoint(client, account, SOMEWHERE, ["image.completed"], description="a")
    path = f"{ENDPOINTS}/{created['id']}"

    response = await client.patch(
        path,
        headers=account.headers,
        json={"url": "http://127.0.0.1:10/moved", "events": ["image.failed", "batch.completed"]},
    )

    assert response.status_code == 200, response.text
    edited = response.json()
    assert edited["url"] == "http://127.0.0.1:10/moved"
    assert edited["events"] == ["batch.completed", "image.failed"]
    assert edited["description"] == "a"
    assert "secret" not in edited
    assert await get_endpoint(client, account, created["id"]) == edited

    limits = await client.patch(
        path, headers=account.headers, json={"max_in_flight": 1, "rate_limit": 5, "description": ""}
    )
    assert (limits.json()["max_in_flight"], limits.json()["rate_limit"], limits.json()["description"]) == (
        1,
        5,
        "",
    )
    unlimited = await client.patch(path, headers=account.headers, json={"rate_limit": None})
    assert unlimited.json()["rate_limit"] is None
    secret = (await client.get(f"{path}/secret", headers=account.headers)).json()["secret"]
    assert secret == created["secret"]  # an edit keeps the secret


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "paused"}, "status"),
        ({"url": "ftp://example.com/"}, "url"),
        ({"events": ["image.done"]}, "events"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"secret": "whsec_AAAA"}, "secret"),
        ({"id": "ep_other"}, "id"),
    ],
)
async def test_patch_refuses_invalid_fields_and_changes_nothing(
    client: httpx.AsyncClient, account: Partner, body: dict[str, Any], field: str
) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    before = await get_endpoint(client, account, created["id"])

    response = await client.patch(f"{ENDPOINTS}/{created['id']}", headers=account.headers, json=body)

    assert_problem(response, 422, "validation_failed", fields=[field])
    assert await get_endpoint(client, account, created["id"]) == before


async def test_a_disabled_endpoint_receives_nothing_until_enabled(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    created = await create_endpoint(client, account, receiver.url)
    path = f"{ENDPOINTS}/{created['id']}"

    disabled = (await client.patch(path, headers=account.headers, json={"status": "disabled"})).json()
    assert disabled["status"] == "disabled"
    refused = await client.post(f"{path}/test", headers=account.headers)
    assert_problem(refused, 409, "endpoint_disabled")

    enabled = (await client.patch(path, headers=account.headers, json={"status": "enabled"})).json()
    assert (enabled["status"], enabled["disabled_reason"], enabled["disabled_at"]) == ("enabled", None, None)
    receiver.trust(created["secret"])
    msg_id = await send_test_event(client, account, created["id"])
    await deliver(settings)
    (delivery,) = receiver.wait_for(1)
    assert delivery.id == msg_id and created["secret"] in delivery.verified_with


async def test_delete_answers_204_and_pending_deliveries_then_fail(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    created = await create_endpoint(client, account, receiver.url)
    msg_id = await send_test_event(client, account, created["id"])

    response = await client.delete(f"{ENDPOINTS}/{created['id']}", headers=account.headers)

    assert response.status_code == 204
    gone = await client.get(f"{ENDPOINTS}/{created['id']}", headers=account.headers)
    assert_problem(gone, 404, "not_found")
    assert (await client.get(ENDPOINTS, headers=account.headers)).json()["data"] == []

    await deliver(settings)

    assert receiver.deliveries == []
    log = await delivery_log(client, account, msg_id)
    assert log["status"] == "failed"
    (destination,) = log["destinations"]
    (attempt,) = destination["attempts"]
    assert attempt["error"] == "the endpoint was deleted"
    assert attempt["status_code"] is None
    assert destination["next_attempt_at"] is None


async def test_another_accounts_endpoint_is_404_on_every_route(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    theirs = await create_endpoint(client, account, SOMEWHERE)
    stranger = await make_account(redis, "stranger")
    path = f"{ENDPOINTS}/{theirs['id']}"

    attempts = [
        client.get(path, headers=stranger.headers),
        client.patch(path, headers=stranger.headers, json={"description": "mine now"}),
        client.get(f"{path}/secret", headers=stranger.headers),
        client.post(f"{path}/rotate-secret", headers=stranger.headers),
        client.post(f"{path}/test", headers=stranger.headers),
        client.post(f"{path}/recover", headers=stranger.headers, json={"since": "2020-01-01T00:00:00Z"}),
        client.delete(path, headers=stranger.headers),
    ]
    for pending in attempts:
        assert_problem(await pending, 404, "not_found")

    unknown = await client.get(f"{ENDPOINTS}/ep_00000000000000000000000000", headers=account.headers)
    assert_problem(unknown, 404, "not_found")
    assert await get_endpoint(client, account, theirs["id"]) == {
        key: value for key, value in theirs.items() if key != "secret"
    }
    secret = (await client.get(f"{path}/secret", headers=account.headers)).json()["secret"]
    assert secret == theirs["secret"]


async def test_an_account_has_at_most_fifty_endpoints(client: httpx.AsyncClient, account: Partner) -> None:
    for _ in range(MAX_ENDPOINTS_PER_ACCOUNT):
        await create_endpoint(client, account, SOMEWHERE)

    response = await client.post(ENDPOINTS, headers=account.headers, json={"url": SOMEWHERE})

    assert_problem(response, 409, "too_many_endpoints")


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["since"]),
        ({"since": "yesterday"}, ["since"]),
        ({"since": "2026-11-21T10:00:00"}, ["since"]),  # no zone: ambiguous
        ({"since": "2026-11-21T10:00:00Z", "until": "2026-11-22T10:00:00Z"}, ["until"]),
    ],
)
async def test_recover_refuses_a_missing_or_ambiguous_time(
    client: httpx.AsyncClient, account: Partner, body: dict[str, Any], fields: list[str]
) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    response = await client.post(f"{ENDPOINTS}/{created['id']}/recover", headers=account.headers, json=body)
    assert_problem(response, 422, fields=fields)


async def test_recover_of_a_disabled_endpoint_is_refused(client: httpx.AsyncClient, account: Partner) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    path = f"{ENDPOINTS}/{created['id']}"
    await client.patch(path, headers=account.headers, json={"status": "disabled"})

    response = await client.post(
        f"{path}/recover", headers=account.headers, json={"since": "2020-01-01T00:00Z"}
    )

    assert_problem(response, 409, "endpoint_disabled")


async def stored_secrets(redis: Redis, endpoint_id: str) -> list[str]:
    endpoint = await EndpointStore(redis).get(endpoint_id)
    assert endpoint is not None
    return valid_secrets(endpoint.secrets, now_ms())


async def test_concurrent_rotations_keep_every_new_secret(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    rotate = f"{ENDPOINTS}/{created['id']}/rotate-secret"

    answers = await asyncio.gather(*(client.post(rotate, headers=account.headers) for _ in range(4)))

    returned = [answer.json()["secret"] for answer in answers]
    assert len(set(returned)) == 4
    assert sorted(await stored_secrets(redis, created["id"])) == sorted([created["secret"], *returned])
    current = (await client.get(f"{ENDPOINTS}/{created['id']}/secret", headers=account.headers)).json()
    assert current["secret"] in returned


async def test_rotation_keeps_at_most_the_newest_few_secrets_signing(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    rotate = f"{ENDPOINTS}/{created['id']}/rotate-secret"

    returned = [(await client.post(rotate, headers=account.headers)).json()["secret"] for _ in range(8)]

    assert await stored_secrets(redis, created["id"]) == returned[::-1][:MAX_VALID_SECRETS]


async def test_concurrent_creates_never_pass_the_endpoint_limit(
    client: httpx.AsyncClient, account: Partner
) -> None:
    for _ in range(MAX_ENDPOINTS_PER_ACCOUNT - 5):
        await create_endpoint(client, account, SOMEWHERE)

    answers = await asyncio.gather(
        *(client.post(ENDPOINTS, headers=account.headers, json={"url": SOMEWHERE}) for _ in range(20))
    )

    assert sorted(answer.status_code for answer in answers) == [201] * 5 + [409] * 15
    listed = (await client.get(ENDPOINTS, headers=account.headers)).json()["data"]
    assert len(listed) == MAX_ENDPOINTS_PER_ACCOUNT


async def test_disabling_an_endpoint_records_when_and_why(
    client: httpx.AsyncClient, account: Partner
) -> None:
    created = await create_endpoint(client, account, SOMEWHERE)
    path = f"{ENDPOINTS}/{created['id']}"

    disabled = (await client.patch(path, headers=account.headers, json={"status": "disabled"})).json()
    again = (await client.patch(path, headers=account.headers, json={"status": "disabled"})).json()

    assert (disabled["status"], disabled["disabled_reason"]) == ("disabled", "disabled by you")
    assert disabled["disabled_at"] is not None and disabled["disabled_at"] >= created["created_at"]
    assert again["disabled_at"] == disabled["disabled_at"]  # still the moment it was disabled
