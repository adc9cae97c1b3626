"""Long polling (`Prefer: wait=N` on an image or a batch) and the web's change feed it waits on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis

from jobs.records import utc_now
from jobs.settings import DEFAULT_LONG_POLL_MAX_WAIT, Settings
from server import changes
from server.changes import CLIENT_NAME
from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.conftest import Partner, api_client, make_account, make_worker, run_burst, with_settings
from tests.test_batches import add_files, create_batch, seal
from tests.test_processes import (
    Child,
    Children,
    create_account,
    free_port,
    poll,
    procfile_command,
    service_env,
    wait_until_ready,
)
from tests.test_processes import children as children  # the fixture
from tests.test_spine import upload
from tests.test_webhook_engine import wait_until
from webhooks.changes import changes_channel


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[None]:
    """A worker in the background from now on, as in production; stopped once its jobs under way end."""
    worker = make_worker(settings)
    task = asyncio.create_task(worker.async_run())
    try:
        yield
    finally:
        await asyncio.gather(*worker.tasks.values())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()


async def new_image(client: httpx.AsyncClient, account: Partner) -> str:
    response = await upload(client, account, imagegen.jpeg(24, 16))
    assert response.status_code == 202, response.text
    image_id: str = response.json()["id"]
    return image_id


async def long_poll(
    client: httpx.AsyncClient, account: Partner, path: str, wait: str
) -> tuple[httpx.Response, float]:
    """The answer to a GET with `Prefer: wait=…`, and how long it took (seconds)."""
    started = time.monotonic()
    response = await client.get(path, headers={**account.headers, "Prefer": wait}, timeout=90)
    assert response.status_code == 200, response.text
    return response, time.monotonic() - started


async def poll_while_a_worker_starts(
    client: httpx.AsyncClient, account: Partner, settings: Settings, path: str
) -> dict[str, Any]:
    """The answer to a `Prefer: wait=20` asked before a worker starts: well before the 20 s."""
    polling = asyncio.create_task(long_poll(client, account, path, "wait=20"))
    async with running_worker(settings):
        response, took = await polling
    assert took < 10
    assert response.headers["Preference-Applied"] == "wait=20"
    answer: dict[str, Any] = response.json()
    return answer


async def test_a_long_poll_answers_as_the_worker_completes_the_image(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image_id = await new_image(client, account)
    asked_at = utc_now()
    image = await poll_while_a_worker_starts(client, account, settings, f"/v1/images/{image_id}")
    # Not before its completion, which came after the poll was asked.
    assert image["status"] == "completed"
    assert image["completed_at"] > asked_at


async def test_a_long_poll_of_an_unfinished_image_answers_its_state_when_the_wait_ends(
    client: httpx.AsyncClient, account: Partner
) -> None:
    image_id = await new_image(client, account)  # no worker: it stays queued
    response, took = await long_poll(client, account, f"/v1/images/{image_id}", "wait=1")
    assert response.json()["status"] == "queued"
    assert 1 <= took < 5
    assert response.headers["Preference-Applied"] == "wait=1"


async def test_a_finished_image_answers_at_once_and_the_wait_is_capped(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    image_id = await new_image(client, account)
    await run_burst(settings)
    response, took = await long_poll(client, account, f"/v1/images/{image_id}", "respond-async, wait=3600")
    assert response.json()["status"] == "completed"
    assert took < 2
    assert response.headers["Preference-Applied"] == f"wait={DEFAULT_LONG_POLL_MAX_WAIT}"

    plain = await client.get(f"/v1/images/{image_id}", headers=account.headers)
    assert "Preference-Applied" not in plain.headers
    ignored = await client.get(f"/v1/images/{image_id}", headers={**account.headers, "Prefer": "wait=soon"})
    assert "Preference-Applied" not in ignored.headers


async def test_the_operator_sets_the_longest_wait_or_turns_long_polls_off(
    account: Partner, settings: Settings
) -> None:
    """Behind a proxy that allows less time before a response starts, DARKROOM_LONG_POLL_MAX_WAIT
    shortens every wait; 0 ignores the preference (RFC 7240 lets a server), answering at once."""
    async with api_client(with_settings(settings, long_poll_max_wait=1)) as client:
        image_id = await new_image(client, account)  # no worker: it stays queued
        response, took = await long_poll(client, account, f"/v1/images/{image_id}", "wait=20")
        assert response.json()["status"] == "queued"
        assert 1 <= took < 5
        assert response.headers["Preference-Applied"] == "wait=1"
    async with api_client(with_settings(settings, long_poll_max_wait=0)) as client:
        response, took = await long_poll(client, account, f"/v1/images/{image_id}", "wait=20")
        assert response.json()["status"] == "queued"
        assert took < 1
        assert "Preference-Applied" not in response.headers


async def test_a_long_poll_of_another_accounts_image_is_404_at_once(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    other = await make_account(redis, "other")
    image_id = await new_image(client, other)
    started = time.monotonic()
    response = await client.get(f"/v1/images/{image_id}", headers={**account.headers, "Prefer": "wait=5"})
    assert response.status_code == 404
    assert time.monotonic() - started < 2


async def test_a_long_poll_of_a_batch_answers_once_its_archive_is_ready(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    batch = await create_batch(client, account, archive=True)
    added = await add_files(client, account, batch["id"], [("a.jpg", imagegen.jpeg(20, 20))])
    assert added.status_code == 202, added.text
    assert (await seal(client, account, batch["id"])).status_code == 200
    settled = await poll_while_a_worker_starts(client, account, settings, f"/v1/batches/{batch['id']}")
    assert settled["status"] == "completed"
    assert settled["archive"]["status"] == "ready"


async def pubsub_clients(redis: Redis) -> list[dict[str, Any]]:
    return [each for each in await redis.client_list(_type="pubsub") if each["name"] == CLIENT_NAME]


async def test_the_change_feed_subscribes_again_after_its_connection_is_killed(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Redis
) -> None:
    # The feed connects in the background of the app's start.
    (before,) = await wait_until(lambda: pubsub_clients(redis), "the change feed connected")
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    # Whether it asks while the feed is away or after it is back, the poll hears of the completion.
    image_id = await new_image(client, account)
    image = await poll_while_a_worker_starts(client, account, settings, f"/v1/images/{image_id}")
    assert image["status"] == "completed"
    (after,) = await wait_until(lambda: pubsub_clients(redis), "the change feed connected again")
    assert after["id"] != before["id"]

    # And a poll asked once it is back is woken by the new subscription too.
    second = await new_image(client, account)
    image = await poll_while_a_worker_starts(client, account, settings, f"/v1/images/{second}")
    assert image["status"] == "completed"


async def subscribers(redis: Redis, account: Partner) -> int:
    ((_, count),) = await redis.pubsub_numsub(changes_channel(account.id))
    return int(count)


async def test_a_process_hears_only_the_accounts_it_waits_on(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cluster's changes do not all reach every web process: an account's channel is subscribed while
    someone waits on it there, and a while after (UNSUBSCRIBE_AFTER_SECONDS, here none)."""
    assert await subscribers(redis, account) == 0
    image_id = await new_image(client, account)
    polling = asyncio.create_task(long_poll(client, account, f"/v1/images/{image_id}", "wait=20"))
    await wait_until(lambda: subscribers(redis, account), "the long poll's subscription")
    async with running_worker(settings):
        response, took = await polling
    assert response.json()["status"] == "completed"
    assert took < 10

    monkeypatch.setattr(changes, "UNSUBSCRIBE_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(changes, "QUIET_PING_SECONDS", 0.05)  # the feed looks for idle channels as often
    await new_image(client, account)  # a change, which wakes the feed from its longer wait
    await wait_until(lambda: _none(subscribers(redis, account)), "the idle channel unsubscribed")


async def _none(count: Awaitable[int]) -> bool:
    return await count == 0


async def test_openapi_documents_the_wait_preference(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/images/{image_id}", "/v1/batches/{batch_id}"):
        operation = spec["paths"][path]["get"]
        assert {"$ref": "#/components/parameters/PreferWait"} in operation["parameters"]
        assert "Preference-Applied" in operation["responses"]["200"]["headers"]
    assert spec["components"]["parameters"]["PreferWait"]["name"] == "Prefer"
    description = spec["components"]["parameters"]["PreferWait"]["description"]
    assert f"{DEFAULT_LONG_POLL_MAX_WAIT} on a default install" in description


@dataclass(frozen=True)
class QueuedOnWeb:
    web: Child
    base_url: str
    partner: Partner
    image_path: str


def queued_on_a_web_process(redis_server: EmbeddedRedis, children: Children, tmp_path: Path) -> QueuedOnWeb:
    """A Procfile web process, and an account's image on it that stays queued (no worker runs)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = service_env(tmp_path / "data", port, redis_server.url)
    web = children.start("web", procfile_command("web", port), env)
    wait_until_ready(base_url, [web])
    partner = create_account(env, "waiting")
    with httpx.Client(base_url=base_url, headers=partner.headers, timeout=30) as http:
        queued = http.post("/v1/images", files={"file": ("a.jpg", imagegen.jpeg(24, 16), "image/jpeg")})
    assert queued.status_code == 202, queued.text
    return QueuedOnWeb(web, base_url, partner, f"/v1/images/{queued.json()['id']}")


def test_a_stopping_web_process_answers_its_long_polls_at_once(
    redis_server: EmbeddedRedis, children: Children, tmp_path: Path
) -> None:
    """SIGTERM (a deploy, a scale-down): a web process waits for the requests under way before it exits,
    and a long poll is told to answer now with the state it has, instead of holding the exit (and the
    deploy) for the rest of its wait; the client asks again, of another process."""
    queued = queued_on_a_web_process(redis_server, children, tmp_path)
    web, partner = queued.web, queued.partner
    with httpx.Client(base_url=queued.base_url, headers=partner.headers, timeout=30) as http:
        answered: list[tuple[httpx.Response, float]] = []

        def long_poll() -> None:
            asked = time.monotonic()
            response = http.get(queued.image_path, headers={"Prefer": "wait=20"})
            answered.append((response, time.monotonic() - asked))

        polling = threading.Thread(target=long_poll)
        polling.start()
        # The poll waits once its account's change channel is subscribed.
        with redis.Redis.from_url(redis_server.url) as store:
            channel = changes_channel(partner.id)
            poll(lambda: store.pubsub_numsub(channel) == [(channel.encode(), 1)], "the long poll waiting")
        stopped = time.monotonic()
        web.process.send_signal(signal.SIGTERM)
        polling.join(10)
        # Stopped in good order (uvicorn then raises the signal again, as its exit status).
        assert web.process.wait(10) == -signal.SIGTERM
        assert any("Finished server process" in line for line in web.lines)
    ((response, took),) = answered
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert took < 10 and time.monotonic() - stopped < 10  # not the 20 s asked for


def test_a_long_poll_ends_when_its_client_gives_up(
    redis_server: EmbeddedRedis, children: Children, tmp_path: Path
) -> None:
    """A client whose own timeout is shorter than its wait (or a closed tab) leaves nobody to answer:
    the web process stops waiting then, not N seconds later."""
    queued = queued_on_a_web_process(redis_server, children, tmp_path)
    web, path = queued.web, queued.image_path
    with (
        httpx.Client(base_url=queued.base_url, headers=queued.partner.headers) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.get(path, headers={"Prefer": "wait=20"}, timeout=1)

    def answered() -> list[dict[str, Any]]:
        logged = [json.loads(line) for line in web.lines if line.startswith("{")]
        return [entry for entry in logged if entry.get("message", "").startswith(f"GET {path}")]

    (logged,) = poll(answered, "the long poll's log line", timeout=10)
    assert logged["latency_ms"] < 5000  # not the 20 s asked for
