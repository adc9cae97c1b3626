"""Webhook delivery: retries on the schedule, one id per message, every attempt on record."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from jobs import processing, stats, worker
from jobs.deps import WorkerDeps
from jobs.ids import lowest_id_at, new_id
from jobs.queue import process_job_id
from jobs.settings import Settings
from jobs.store import Store
from tests import imagegen
from tests.conftest import Partner, run_burst, with_settings, worker_deps
from tests.receiver import Receiver
from tests.test_spine import upload
from webhooks.dispatcher import Dispatcher, RetryPolicy
from webhooks.messages import (
    CALLBACK,
    Attempt,
    AttemptCounts,
    Delivery,
    Destination,
    Message,
    account_messages_key,
    batch_messages_key,
    message_key,
    new_message,
    now_ms,
)


async def deliveries_log(client: httpx.AsyncClient, account: Partner, msg_id: str) -> dict[str, object]:
    response = await client.get(f"/v1/deliveries/{msg_id}", headers=account.headers)
    assert response.status_code == 200
    log: dict[str, object] = response.json()
    return log


async def test_failed_attempts_retry_with_the_same_id_and_body(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    receiver.script(500, 503)
    response = await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
    assert response.status_code == 202

    await run_burst(settings)

    first, second, third = receiver.wait_for(3)
    assert {d.headers["webhook-id"] for d in (first, second, third)} == {first.headers["webhook-id"]}
    assert first.body == second.body == third.body
    assert all(d.verified for d in (first, second, third))
    log = await deliveries_log(client, account, first.headers["webhook-id"])
    assert log["status"] == "delivered"
    (destination,) = log["destinations"]
    attempts = destination["attempts"]
    assert isinstance(attempts, list)
    assert [a["status_code"] for a in attempts] == [500, 503, 200]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert attempts[0]["error"] == "HTTP 500"
    assert attempts[0]["next_attempt_at"] is not None
    assert destination["next_attempt_at"] is None


async def test_delivery_gives_up_when_the_schedule_is_spent(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    receiver.script(500, 500, 500, 500)
    await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)

    await run_burst(settings)

    deliveries = receiver.wait_for(4)
    assert len(deliveries) == 1 + len(settings.retry_schedule)
    log = await deliveries_log(client, account, deliveries[0].headers["webhook-id"])
    assert log["status"] == "failed"
    listed = (await client.get("/v1/deliveries?status=failed", headers=account.headers)).json()
    assert [item["id"] for item in listed["data"]] == [log["id"]]


async def test_redirects_are_not_followed(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    receiver.script(302)
    await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)

    await run_burst(with_settings(settings, retry_schedule=()))

    (delivery,) = receiver.wait_for(1)
    log = await deliveries_log(client, account, delivery.headers["webhook-id"])
    assert log["status"] == "failed"
    (destination,) = log["destinations"]
    attempts = destination["attempts"]
    assert isinstance(attempts, list)
    assert "redirect" in attempts[0]["error"]


async def test_unreachable_receiver_is_recorded_and_retried(
    client: httpx.AsyncClient, account: Partner, settings: Settings, unused_tcp_port: int
) -> None:
    response = await upload(
        client, account, imagegen.jpeg(), callback_url=f"http://127.0.0.1:{unused_tcp_port}/hooks"
    )
    image_id = response.json()["id"]

    await run_burst(with_settings(settings, retry_schedule=(0.05,)))

    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "completed"  # the image is fine; only its announcement failed
    listed = (await client.get("/v1/deliveries", headers=account.headers)).json()
    (log,) = listed["data"]
    assert log["status"] == "failed"
    attempts = log["destinations"][0]["attempts"]
    assert [a["status_code"] for a in attempts] == [None, None]
    assert all(a["error"].startswith("connection refused") for a in attempts), attempts


@pytest.fixture
async def deps(settings: Settings) -> AsyncIterator[WorkerDeps]:
    async with worker_deps(settings) as built:
        yield built


async def test_rerun_after_a_crash_announces_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver, deps: WorkerDeps
) -> None:
    """arq runs a job at least once: running the core again must not process or announce twice."""
    image_id = (await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)).json()["id"]
    await run_burst(settings)
    done = await deps.store.get_image(image_id)
    assert done is not None and done.status == "completed"

    await processing.process_image(deps, image_id, job_try=2)
    await run_burst(settings)

    again = await deps.store.get_image(image_id)
    assert again == done
    (delivery,) = receiver.wait_for(1)
    assert delivery.headers["webhook-id"] == done.event_message_id
    listed = (await client.get("/v1/deliveries", headers=account.headers)).json()
    assert len(listed["data"]) == 1
    shown = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert shown["webhooks"] == [
        {"id": done.event_message_id, "type": "image.completed", "endpoint_id": None}
    ]


async def test_rerun_of_an_interrupted_job_overwrites_its_output(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps
) -> None:
    """A job killed mid-processing restarts from `processing`; the output is replaced, not duplicated."""
    image_id = (await upload(client, account, imagegen.jpeg())).json()["id"]
    image = await deps.store.get_image(image_id)
    assert image is not None
    await deps.store.update_image(image.evolve(status="processing", attempts=1))

    await processing.process_image(deps, image_id, job_try=2)
    await processing.process_image(deps, image_id, job_try=3)

    final = await deps.store.get_image(image_id)
    assert final is not None and final.status == "completed" and final.attempts == 2
    folder = deps.storage.path(f"{account.id}/{image_id}")
    assert sorted(p.name for p in folder.iterdir()) == ["original", "output.jpg"]


async def test_a_job_that_keeps_killing_its_worker_ends_failed(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver, deps: WorkerDeps
) -> None:
    image_id = (await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)).json()["id"]

    await processing.process_image(deps, image_id, job_try=settings.max_attempts + 1)
    await run_burst(settings)

    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "failed"
    assert image["error"]["code"] == "worker_crashed"
    (delivery,) = receiver.wait_for(1)
    assert json.loads(delivery.body)["type"] == "image.failed"


async def test_a_job_stopped_by_workers_shutting_down_is_not_blamed_as_a_crash(
    client: httpx.AsyncClient, account: Partner, settings: Settings, deps: WorkerDeps
) -> None:
    """Three deploys in a row each stop the image's job (arq cancels it and runs it again): the fourth
    run completes it instead of failing it `worker_crashed`."""
    image_id = (await upload(client, account, imagegen.jpeg())).json()["id"]
    for job_try in range(1, settings.max_attempts + 1):
        ctx = {"deps": deps, "job_try": job_try, "job_id": process_job_id(image_id)}
        run = asyncio.create_task(worker.process_image(ctx, image_id))
        await asyncio.sleep(0)  # under way: waiting on Redis for its lock
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    ctx = {"deps": deps, "job_try": settings.max_attempts + 1, "job_id": process_job_id(image_id)}
    await worker.process_image(ctx, image_id)

    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "completed", image["error"]


async def test_a_message_whose_worker_died_mid_attempt_is_sent_again_under_the_same_id(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver, deps: WorkerDeps
) -> None:
    """A worker killed mid-delivery held a lease on the message; once it runs out, another sends it."""
    image_id = (await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)).json()["id"]
    await processing.process_image(deps, image_id, job_try=1)  # deps' own dispatcher is not running
    policy = RetryPolicy(())
    dying = Dispatcher(
        deps.redis, deps.http, deps.store.webhook_secrets, policy, new_id=new_id, lease_seconds=0.2
    )
    (claimed,) = (await dying._claim_due(10)).deliveries
    msg_id = claimed.member.partition(":")[0]

    survivor = Dispatcher(
        deps.redis, deps.http, deps.store.webhook_secrets, policy, new_id=new_id, lease_seconds=0.2
    )
    await survivor.run_until_idle()

    (delivery,) = receiver.wait_for(1)
    assert delivery.headers["webhook-id"] == msg_id
    log = await deliveries_log(client, account, msg_id)
    assert log["status"] == "delivered"


async def test_messages_past_the_retention_leave_the_delivery_log(redis: Redis, account: Partner) -> None:
    """Their records expire with Redis TTLs; the account's indexes of them (all, and by the batch they
    concern) are trimmed as new ones come, and a batch's index goes with its newest message."""
    store = Store(redis, message_retention=60)
    now = now_ms()
    old = lowest_id_at("msg", now - 120_000)
    kept = Message(
        lowest_id_at("msg", now - 30_000),
        account.id,
        "image.completed",
        "{}",
        "2026-01-01T00:00:00.000Z",
        (),
        ("img_1", "bat_1"),
    )
    indexes = [account_messages_key(account.id), batch_messages_key(account.id, "bat_1")]
    for index in indexes:
        await redis.zadd(index, {old: 0})  # indexed two minutes ago

    await store.save_message(kept)

    for index in indexes:
        assert await redis.zrange(index, 0, -1) == [kept.id.encode()]
    assert await redis.ttl(message_key(kept.id)) <= 60
    assert 0 < await redis.ttl(indexes[1]) <= 60
    assert await redis.keys("*img_1*") == []  # an image's record names its message: no index of its own


def test_lowest_id_at_sorts_below_every_later_id_and_above_every_earlier_one() -> None:
    now = now_ms()
    assert lowest_id_at("msg", now - 1) < lowest_id_at("msg", now) <= new_id("msg")
    assert new_id("msg") < lowest_id_at("msg", now_ms() + 1)


async def test_attempts_finishing_together_are_recorded_in_shared_transactions(
    redis: Redis, settings: Settings, account: Partner, receiver: Receiver
) -> None:
    """At volume a delivery's cost is mostly its Redis round trips: attempts that end while one record
    is being written share the next transaction, and every one of them is still recorded."""
    store = Store(redis)
    messages = [
        new_message(
            new_id("msg"), account.id, "webhook.test", {"n": n}, [Destination(CALLBACK, receiver.url)]
        )
        for n in range(40)
    ]
    for message in messages:
        await store.save_message(message)
    await redis.config_resetstat()

    async with worker_deps(settings) as deps:
        await deps.dispatcher.run_until_idle()

    receiver.wait_for(40)
    transactions = (await redis.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)
    assert transactions < len(messages)
    for message in messages:
        logged = await store.messages.get_logged(message.id)
        assert logged is not None and logged.status == "delivered"


async def test_an_attempt_whose_transaction_is_replayed_is_logged_and_counted_once(
    redis: Redis, account: Partner
) -> None:
    """A worker whose Redis connection died under EXEC sends the transaction again once Redis is back
    (jobs/queue.py): if the first had been applied, the delivery log must still show the attempt once,
    and /metrics count it once."""
    store = Store(redis)
    message = new_message(
        new_id("msg"), account.id, "webhook.test", {}, [Destination(CALLBACK, "http://127.0.0.1:9/")]
    )
    await store.save_message(message)
    delivery = Delivery(message.id, CALLBACK)
    attempt = Attempt(
        number=1,
        at="2026-12-06T10:00:00.123Z",
        status_code=500,
        latency_ms=1500.0,
        response_excerpt="",
        error=None,
        url="http://127.0.0.1:9/",
    )
    counts = AttemptCounts()
    stats.count_attempt(counts, message, delivery, attempt)
    for _ in range(2):
        async with redis.pipeline(transaction=True) as pipe:
            store.messages.stage_attempt(
                pipe, account.id, delivery, attempt, "pending", now_ms() + 60_000, counts
            )
            await pipe.execute()
    later = Attempt(
        number=2,
        at="2026-12-06T10:01:00.456Z",
        status_code=200,
        latency_ms=1.0,
        response_excerpt="",
        error=None,
    )
    async with redis.pipeline(transaction=True) as pipe:
        store.messages.stage_attempt(pipe, account.id, delivery, later, "delivered", None)
        await pipe.execute()

    logged = await store.messages.get_logged(message.id)
    assert logged is not None
    (recorded,) = logged.deliveries
    assert [(each.number, each.status_code) for each in recorded.attempts] == [(1, 500), (2, 200)]
    assert recorded.status == "delivered"
    assert (await stats.read(redis))["webhook_attempts:failed"] == 1
    attempt_seconds = (await stats.read_histograms(redis))[stats.WEBHOOK_ATTEMPT]
    assert attempt_seconds.buckets[-1] == (math.inf, 1)
    assert attempt_seconds.sum == 1.5
