"""The dashboard's sign-in, session and CSRF rules, over HTTP to the app in-process (the browser test,
tests/test_dashboard_browser.py, goes through the pages themselves)."""

from __future__ import annotations

import json
import re

import httpx
from redis.asyncio import Redis

from jobs.settings import Settings
from server.dashboard import CONTENT_SECURITY_POLICY
from tests import imagegen
from tests.conftest import Partner, api_client, api_clients, make_account, with_settings
from tests.test_upload_validation import assert_problem

SESSION_KEYS = "dr:dashboard:session:*"


def form_token(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found[1]


async def sign_in(http: httpx.AsyncClient, api_key: str) -> httpx.Response:
    form = await http.get("/dashboard/sign-in")
    return await http.post("/dashboard/sign-in", data={"api_key": api_key, "csrf_token": form_token(form)})


async def signed_in_token(http: httpx.AsyncClient, account: Partner) -> str:
    """Signs in; the session's CSRF token, as the pages carry it."""
    assert (await sign_in(http, account.api_key)).status_code == 303
    return form_token(await http.get("/dashboard"))


async def test_pages_forbid_framing_and_inline_script_and_lead_to_sign_in(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard")
    assert page.status_code == 303 and page.headers["location"] == "/dashboard/sign-in"
    form = await client.get("/dashboard/sign-in")
    assert form.status_code == 200
    policy = form.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert form.headers["x-frame-options"] == "DENY"
    assert form.headers["cache-control"] == "no-store"
    assert "<script>" not in form.text and " style=" not in form.text


async def test_signing_in_keeps_a_session_id_in_a_strict_cookie_and_never_the_key(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    signed_in = await sign_in(client, account.api_key)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    cookie = next(c for c in signed_in.headers.get_list("set-cookie") if c.startswith("dr_session="))
    session_id = cookie.split(";")[0].removeprefix("dr_session=")
    attributes = cookie.lower()
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/dashboard" in attributes
    assert "secure" not in attributes  # plain http here; see the https test
    assert account.api_key not in cookie

    (key,) = await redis.keys(SESSION_KEYS)
    stored = (await redis.get(key)).decode()
    assert session_id not in key.decode() and session_id not in stored and account.api_key not in stored
    assert settings.dashboard_session_ttl - 5 <= await redis.ttl(key) <= settings.dashboard_session_ttl

    page = await client.get("/dashboard")
    assert page.status_code == 200 and "partner" in page.text
    assert account.api_key not in page.text


async def test_a_wrong_key_shows_the_form_again_without_echoing_it(client: httpx.AsyncClient) -> None:
    refused = await sign_in(client, "sk_live_not-a-key")
    assert refused.status_code == 401
    assert "not valid: no account has it" in refused.text and "sk_live_not-a-key" not in refused.text
    # What to do about it, as the API says: a webhook secret pasted in the key's place is named.
    secret = await sign_in(client, "whsec_pasted-by-mistake")
    assert secret.status_code == 401 and "this is a webhook secret" in secret.text


async def test_a_sign_in_posted_without_its_form_token_is_refused(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    """As a form on another site would post it: no sign-in cookie, no token."""
    refused = await client.post("/dashboard/sign-in", data={"api_key": account.api_key})
    assert refused.status_code == 403 and "expired" in refused.text
    assert "dr_session" not in refused.headers.get("set-cookie", "")
    assert await redis.keys(SESSION_KEYS) == []


async def test_over_https_the_session_cookie_is_secure(settings: Settings, account: Partner) -> None:
    async with api_client(with_settings(settings, public_url="https://darkroom.example")) as http:
        form = await http.get("/dashboard/sign-in")
        assert "secure" in form.headers["set-cookie"].lower()
        # httpx sends no Secure cookie over this client's http://; a browser on https would send it.
        token = form_token(form)
        signed_in = await http.post(
            "/dashboard/sign-in",
            data={"api_key": account.api_key, "csrf_token": token},
            headers={"Cookie": f"dr_sign_in={token}"},
        )
    assert signed_in.status_code == 303, signed_in.text
    cookie = next(c for c in signed_in.headers.get_list("set-cookie") if c.startswith("dr_session="))
    assert "secure" in cookie.lower()


async def test_changes_need_the_sessions_csrf_token_and_sign_out_ends_the_session(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    token = await signed_in_token(client, account)
    photo = {"file": ("dot.png", imagegen.png(8, 8), "image/png")}

    assert_problem(await client.post("/dashboard/images", files=photo), 403, "csrf_failed")
    forged = await client.post("/dashboard/images", files=photo, headers={"X-CSRF-Token": "guessed"})
    assert_problem(forged, 403, "csrf_failed")
    assert_problem(await client.post("/dashboard/sign-out"), 403, "csrf_failed")
    assert (await client.get("/v1/images", headers=account.headers)).json()["data"] == []

    uploaded = await client.post(
        "/dashboard/images",
        files=photo,
        data={"operations": json.dumps([{"type": "resize", "params": {"width": 4}}])},
        headers={"X-CSRF-Token": token},
    )
    assert uploaded.status_code == 202, uploaded.text
    assert uploaded.json()["operations"][0]["type"] == "resize"
    assert "x-ratelimit-remaining" in uploaded.headers  # counted as the API request it is

    signed_out = await client.post("/dashboard/sign-out", data={"csrf_token": token})
    assert signed_out.status_code == 303 and signed_out.headers["location"] == "/dashboard/sign-in"
    assert await redis.keys(SESSION_KEYS) == []
    assert (await client.get("/dashboard")).status_code == 303
    assert_problem(await client.get("/dashboard/events?table=images"), 401, "not_signed_in")


async def test_one_accounts_session_reaches_only_its_own_images(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    with_another = await client.post(
        "/v1/images",
        files={"file": ("theirs.png", imagegen.png(8, 8), "image/png")},
        headers=account.headers,
    )
    assert with_another.status_code == 202
    image_id = with_another.json()["id"]

    other = await make_account(redis, "someone else")
    await signed_in_token(client, other)
    assert "theirs.png" not in (await client.get("/dashboard")).text
    assert_problem(await client.get(f"/dashboard/images/{image_id}/output?width=10"), 404, "not_found")


async def test_an_address_whose_sign_ins_keep_failing_is_refused_without_checking_the_key(
    settings: Settings, account: Partner, redis: Redis
) -> None:
    limited = with_settings(settings, failed_auth_limit=2, failed_auth_window=120)
    async with api_clients(limited, ["198.51.100.4", "198.51.100.5"]) as (guesser, colleague):
        # A sign-in that works counts for nothing.
        for _ in range(3):
            assert (await sign_in(guesser, account.api_key)).status_code == 303
            guesser.cookies.clear()
        for _ in range(2):
            assert (await sign_in(guesser, "sk_live_guess")).status_code == 401
        await redis.delete(*await redis.keys(SESSION_KEYS))

        refused = await sign_in(guesser, account.api_key)
        assert refused.status_code == 429
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert "Too many sign-ins from your network failed. Please try again in 1 minute." in refused.text
        assert refused.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert await redis.keys(SESSION_KEYS) == []
        # Failures on the API and on the sign-in form count together.
        assert_problem(
            await guesser.get("/v1/images", headers={"X-API-Key": "sk_live_guess"}),
            429,
            "too_many_failed_authentications",
        )

        assert (await sign_in(colleague, account.api_key)).status_code == 303


async def test_an_endpoint_is_added_with_its_secret_shown_once_and_deleted_as_the_api_would(
    client: httpx.AsyncClient, account: Partner
) -> None:
    token = await signed_in_token(client, account)
    wanted = {"url": "https://example.com/hooks", "events": ["image.completed"], "description": "ours"}
    assert_problem(await client.post("/dashboard/webhook-endpoints", json=wanted), 403, "csrf_failed")

    added = await client.post("/dashboard/webhook-endpoints", json=wanted, headers={"X-CSRF-Token": token})
    assert added.status_code == 201 and added.headers["cache-control"] == "no-store"
    (endpoint,) = (await client.get("/v1/webhook-endpoints", headers=account.headers)).json()["data"]
    assert (endpoint["url"], endpoint["events"], endpoint["description"]) == (
        wanted["url"],
        ["image.completed"],
        "ours",
    )
    secret = (
        await client.get(f"/v1/webhook-endpoints/{endpoint['id']}/secret", headers=account.headers)
    ).json()
    assert f'value="{secret["secret"]}"' in added.text and f'id="{endpoint["id"]}"' in added.text
    page = await client.get("/dashboard/webhooks")
    assert endpoint["id"] in page.text and secret["secret"] not in page.text

    # The API's validation, word for word.
    refused = await client.post(
        "/dashboard/webhook-endpoints",
        json={"url": "ftp://example.com", "events": []},
        headers={"X-CSRF-Token": token},
    )
    assert {error["field"] for error in assert_problem(refused, 422, "validation_failed")["errors"]} == {
        "url",
        "events",
    }

    path = f"/dashboard/webhook-endpoints/{endpoint['id']}"
    assert_problem(await client.delete(path), 403, "csrf_failed")
    deleted = await client.delete(path, headers={"X-CSRF-Token": token})
    assert deleted.status_code == 200 and "No endpoints yet" in deleted.text
    assert (await client.get("/v1/webhook-endpoints", headers=account.headers)).json()["data"] == []
    assert_problem(await client.delete(path, headers={"X-CSRF-Token": token}), 404, "not_found")


async def test_a_batch_is_created_filled_from_the_drop_zone_and_sealed(
    client: httpx.AsyncClient, account: Partner
) -> None:
    token = await signed_in_token(client, account)
    wanted = {"operations": [{"type": "resize", "params": {"width": 4}}], "archive": {"format": "jpeg"}}
    assert_problem(await client.post("/dashboard/batches", json=wanted), 403, "csrf_failed")
    created = await client.post("/dashboard/batches", json=wanted, headers={"X-CSRF-Token": token})
    assert created.status_code == 201, created.text
    (batch,) = (await client.get("/v1/batches", headers=account.headers)).json()["data"]
    assert batch["operations"][0]["params"]["width"] == 4 and batch["archive"]["status"] == "pending"
    assert f'data-action="/dashboard/batches/{batch["id"]}/images"' in created.text
    assert f'data-csrf-token="{token}"' in created.text

    refused = await client.post(
        "/dashboard/batches", json={"archive": {"format": "gif"}}, headers={"X-CSRF-Token": token}
    )
    assert_problem(refused, 422, "validation_failed", fields=["archive.format"])

    photos = [("file", (f"{name}.png", imagegen.png(8, 8), "image/png")) for name in ("a", "b")]
    images_path = f"/dashboard/batches/{batch['id']}/images"
    assert_problem(await client.post(images_path, files=photos), 403, "csrf_failed")
    added = await client.post(images_path, files=photos, headers={"X-CSRF-Token": token})
    assert added.status_code == 202, added.text
    assert [image["operations"] for image in added.json()["data"]] == [batch["operations"]] * 2

    seal_path = f"/dashboard/batches/{batch['id']}/seal"
    assert_problem(await client.post(seal_path), 403, "csrf_failed")
    sealed = await client.post(seal_path, headers={"X-CSRF-Token": token})
    assert sealed.status_code == 200 and f"Batch {batch['id']} is sealed with 2 images" in sealed.text
    assert "Create batch" in sealed.text
    assert (await client.get(f"/v1/batches/{batch['id']}", headers=account.headers)).json()[
        "status"
    ] != "open"
    assert_problem(await client.post(seal_path, headers={"X-CSRF-Token": token}), 409, "batch_sealed")
