"""The webhook delivery engine against real receivers on 127.0.0.1: retries, fan-out, rotation, health,
limits, manual control and the delivery log, with real Redis and the worker's own dispatcher."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobs.deps import WorkerDeps
from jobs.ids import new_id
from jobs.settings import Settings
from jobs.worker import WEBHOOK_CONNECTIONS_PER_ORIGIN
from tests import imagegen
from tests.conftest import Partner, api_client, make_account, run_burst, with_settings, worker_deps
from tests.receiver import Answer, Receiver, SilentOrigins
from tests.test_endpoints_api import (
    ENDPOINTS,
    PartnerDNS,
    create_endpoint,
    deliver,
    delivery_log,
    get_endpoint,
    send_test_event,
)
from tests.test_spine import upload
from tests.test_transport import DROP, Server
from tests.test_upload_validation import assert_problem
from webhooks.messages import (
    CALLBACK,
    RESPONSE_EXCERPT_BYTES,
    Destination,
    delivery_key,
    message_key,
    new_message,
)

MakeReceiver = Callable[..., Receiver]
WAIT_SECONDS = 10.0


@pytest.fixture
def receivers() -> Iterator[MakeReceiver]:
    """Started receivers trusting the given secrets, all stopped at teardown."""
    made: list[Receiver] = []

    def make(*secrets: str) -> Receiver:
        server = Receiver()
        server.trust(*secrets)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


async def wait_until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """`await check()` until it returns something truthy, within a bounded deadline."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {WAIT_SECONDS:g} s")
        await asyncio.sleep(0.01)
    return result


def ms(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


def only_destination(log: dict[str, Any]) -> dict[str, Any]:
    (destination,) = log["destinations"]
    found: dict[str, Any] = destination
    return found


async def endpoint_with_receiver(
    client: httpx.AsyncClient, account: Partner, receivers: MakeReceiver, wanted: list[str], **fields: Any
) -> tuple[dict[str, Any], Receiver]:
    """A registered endpoint for the `wanted` events and the receiver behind it, which verifies with the
    endpoint's secret."""
    receiver = receivers()
    endpoint = await create_endpoint(client, account, receiver.url, wanted, **fields)
    receiver.trust(endpoint["secret"])
    return endpoint, receiver


async def failed_test_event(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    receivers: MakeReceiver,
    *then: int | Answer,
) -> tuple[dict[str, Any], Receiver, str]:
    """An endpoint whose receiver answered 500 to a test event that has no retry left: the endpoint,
    its receiver (answering `then`, and 200 after those) and the failed message's id."""
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    receiver.script(500, *then)
    msg_id = await send_test_event(client, account, endpoint["id"])
    await deliver(with_settings(settings, retry_schedule=()))
    return endpoint, receiver, msg_id


# --- retries ------------------------------------------------------------------------------------------


async def test_a_failing_receiver_is_retried_until_it_answers(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    """Refused, 500, 503 with Retry-After, a timeout, a redirect, then 200: one message, six attempts."""
    receiver = Receiver(account.webhook_secret)  # bound but not listening: connections are refused
    receiver.script(500, Answer(503, {"Retry-After": "1"}), Answer(200, delay=5.0), 302)
    flaky = with_settings(settings, retry_schedule=(0.5, 0.05, 0.05, 0.05, 0.05), webhook_timeout=0.2)
    delivering = None
    try:
        await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
        delivering = asyncio.create_task(run_burst(flaky))

        async def first_attempt_made() -> str | None:
            listed = (await client.get("/v1/deliveries", headers=account.headers)).json()["data"]
            return listed[0]["id"] if listed and listed[0]["destinations"][0]["attempts"] else None

        msg_id = await wait_until(first_attempt_made, "attempted once")
        receiver.start()
        await delivering
        arrived = receiver.wait_for(5)
    finally:
        if delivering is not None and not delivering.done():
            delivering.cancel()
        receiver.stop()

    assert len(arrived) == 5
    assert {delivery.id for delivery in arrived} == {msg_id}
    assert {delivery.body for delivery in arrived} == {arrived[0].body}
    assert all(delivery.verified for delivery in arrived)
    assert [delivery.answered for delivery in arrived] == [500, 503, 200, 302, 200]

    log = await delivery_log(client, account, msg_id)
    assert log["status"] == "delivered"
    destination = only_destination(log)
    assert destination["endpoint_id"] is None and destination["url"] == receiver.url
    assert destination["status"] == "delivered" and destination["next_attempt_at"] is None
    attempts = destination["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3, 4, 5, 6]
    assert [a["status_code"] for a in attempts] == [None, 500, 503, None, 302, 200]
    refused, error_500, unavailable, timed_out, redirect, success = attempts
    assert refused["error"] == f"connection refused by 127.0.0.1:{receiver.port}"
    assert error_500["error"] == "HTTP 500" and error_500["response_excerpt"] == "ok"
    assert unavailable["error"] == "HTTP 503"
    assert timed_out["error"] == "timed out after 0.2 s waiting for the response"
    assert timed_out["response_excerpt"] == ""
    assert "redirect" in redirect["error"]
    assert success["error"] is None and success["response_excerpt"] == "ok"
    assert success["next_attempt_at"] is None
    assert all(isinstance(a["latency_ms"], float) and a["latency_ms"] >= 0 for a in attempts)
    assert 200 <= timed_out["latency_ms"] < 1000
    for attempt, following in itertools.pairwise(attempts):
        assert attempt["next_attempt_at"] is not None
        assert ms(following["at"]) >= ms(attempt["next_attempt_at"])  # never earlier than announced

    def wait_after(attempt: dict[str, Any]) -> float:
        return ms(attempt["next_attempt_at"]) - ms(attempt["at"]) - float(attempt["latency_ms"])

    # Retry-After: 1 s asked, 50 ms scheduled: waited, up to the schedule's longest delay (0.5 s).
    assert 498 <= wait_after(unavailable) < 900
    # A timeout waits at least the slow-down (0.3 s in tests), however short the schedule.
    assert 298 <= wait_after(timed_out) < 1000
    assert 48 <= wait_after(error_500) < 250  # the schedule, not a slow-down


async def test_410_gone_stops_at_once_and_disables_the_endpoint(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    gone, gone_receiver = await endpoint_with_receiver(client, account, receivers, ["image.completed"])
    watcher, watcher_receiver = await endpoint_with_receiver(
        client, account, receivers, ["endpoint.disabled"]
    )
    _, bystander_receiver = await endpoint_with_receiver(client, account, receivers, ["image.completed"])
    gone_receiver.script(410)
    msg_id = await send_test_event(client, account, gone["id"])

    await deliver(settings)  # three retries left in the schedule: none is used

    assert len(gone_receiver.deliveries) == 1
    log = await delivery_log(client, account, msg_id)
    assert log["status"] == "failed"
    (attempt,) = only_destination(log)["attempts"]
    assert (attempt["status_code"], attempt["error"], attempt["next_attempt_at"]) == (410, "HTTP 410", None)

    shown = await get_endpoint(client, account, gone["id"])
    assert shown["status"] == "disabled"
    assert shown["disabled_reason"] == "the endpoint answered 410 Gone"
    assert ms(shown["disabled_at"]) >= ms(attempt["at"])

    (announcement,) = watcher_receiver.wait_for(1)
    assert announcement.verified_with == (watcher["secret"],)
    event = announcement.event
    assert event["type"] == "endpoint.disabled"
    assert event["data"]["id"] == gone["id"]
    assert event["data"]["status"] == "disabled"
    assert event["data"]["disabled_reason"] == "the endpoint answered 410 Gone"
    assert "secret" not in event["data"]
    assert bystander_receiver.deliveries == []
    listed = (
        await client.get("/v1/deliveries?event_type=endpoint.disabled", headers=account.headers)
    ).json()["data"]
    assert [item["id"] for item in listed] == [announcement.id]
    assert [d["endpoint_id"] for d in listed[0]["destinations"]] == [watcher["id"]]
    assert listed[0]["status"] == "delivered"

    refused = await client.post(f"{ENDPOINTS}/{gone['id']}/test", headers=account.headers)
    assert refused.status_code == 409

    enabled = await client.patch(
        f"{ENDPOINTS}/{gone['id']}", headers=account.headers, json={"status": "enabled"}
    )
    assert enabled.status_code == 200
    assert {
        key: enabled.json()[key] for key in ("status", "disabled_reason", "disabled_at", "failing_since")
    } == {
        "status": "enabled",
        "disabled_reason": None,
        "disabled_at": None,
        "failing_since": None,
    }
    again = await send_test_event(client, account, gone["id"])
    await deliver(settings)
    assert (await delivery_log(client, account, again))["status"] == "delivered"
    assert gone_receiver.deliveries[-1].id == again


async def test_410_gone_from_a_callback_url_stops_at_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    receiver = receivers(account.webhook_secret)
    receiver.script(410)
    await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)

    await run_burst(settings)  # three retries left in the schedule: none is used

    (delivery,) = receiver.deliveries
    log = await delivery_log(client, account, delivery.id)
    assert log["status"] == "failed"
    assert [a["status_code"] for a in only_destination(log)["attempts"]] == [410]


async def test_an_endpoint_is_announced_disabled_once_when_several_attempts_get_410(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    gone, gone_receiver = await endpoint_with_receiver(client, account, receivers, ["image.completed"])
    _, watcher_receiver = await endpoint_with_receiver(client, account, receivers, ["endpoint.disabled"])
    gone_receiver.script(*[Answer(410, delay=0.2)] * 3)
    for _ in range(3):
        await send_test_event(client, account, gone["id"])

    await deliver(settings)

    assert gone_receiver.most_in_flight == 3
    announced = (
        await client.get("/v1/deliveries?event_type=endpoint.disabled", headers=account.headers)
    ).json()["data"]
    assert len(announced) == 1
    assert len(watcher_receiver.deliveries) == 1


async def test_an_endpoint_failing_past_the_limit_is_disabled(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    failing, failing_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    watcher, watcher_receiver = await endpoint_with_receiver(
        client, account, receivers, ["endpoint.disabled"]
    )
    failing_receiver.script(*[500] * 30)
    patient = with_settings(settings, endpoint_disable_after=0.3, retry_schedule=(0.08,) * 30)
    msg_id = await send_test_event(client, account, failing["id"])

    await deliver(patient)

    shown = await get_endpoint(client, account, failing["id"])
    assert shown["status"] == "disabled"
    assert shown["disabled_reason"].startswith("every delivery failed for")
    arrived = failing_receiver.deliveries
    assert all(delivery.answered == 500 for delivery in arrived)
    assert arrived[-1].received_at - arrived[0].received_at >= 0.3  # failing that long, and no sooner
    assert len(arrived) < 10  # not every retry of the schedule: it stopped once disabled
    log = await delivery_log(client, account, msg_id)
    assert log["status"] == "failed"
    attempts = only_destination(log)["attempts"]
    assert len(attempts) == len(arrived) + 1
    assert attempts[-1]["status_code"] is None
    assert attempts[-1]["error"] == f"the endpoint is disabled ({shown['disabled_reason']})"
    (announcement,) = watcher_receiver.wait_for(1)
    assert announcement.event["data"]["id"] == failing["id"]
    assert watcher["secret"] in announcement.verified_with


async def test_an_endpoint_deleted_during_an_attempt_stays_deleted(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"], max_in_flight=1)
    receiver.script(Answer(500, hold=True))
    first = await send_test_event(client, account, endpoint["id"])
    second = await send_test_event(client, account, endpoint["id"])
    async with worker_deps(settings) as deps:
        deps.dispatcher.start()
        await receiver.arrivals(1)
        deleted = await client.delete(f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers)
        assert deleted.status_code == 204
        receiver.release()

        async def first_attempt_recorded() -> bool:
            return bool(only_destination(await delivery_log(client, account, first))["attempts"])

        await wait_until(first_attempt_recorded, "the held attempt recorded")
        gone = await client.get(f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers)
        assert gone.status_code == 404

        async def both_failed() -> bool:
            logs = [await delivery_log(client, account, msg_id) for msg_id in (first, second)]
            return all(log["status"] == "failed" for log in logs)

        await wait_until(both_failed, "both deliveries failed")
    last = only_destination(await delivery_log(client, account, second))["attempts"][-1]
    assert last["error"] == "the endpoint was deleted"
    assert len(receiver.deliveries) == 1


async def test_deleting_an_endpoint_ends_its_pending_deliveries_at_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    """One delivery waits an hour for its next retry, another's attempt is under way: the first ends
    failed on DELETE, the second when its attempt ends (a 500, which would have been retried)."""
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    receiver.script(500, Answer(500, hold=True))
    patient = with_settings(settings, retry_schedule=(3600.0,))
    sent = [await send_test_event(client, account, endpoint["id"]) for _ in range(2)]
    async with worker_deps(patient) as deps:
        deps.dispatcher.start()
        first, second = await receiver.arrivals(2)  # answered in order of arrival: 500, then held
        waiting, held = first.id, second.id

        async def first_attempt_recorded() -> bool:
            return bool(only_destination(await delivery_log(client, account, waiting))["attempts"])

        await wait_until(first_attempt_recorded, "the first attempt recorded")
        deleted = await client.delete(f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers)
        assert deleted.status_code == 204

        ended = only_destination(await delivery_log(client, account, waiting))
        assert (ended["status"], ended["next_attempt_at"]) == ("failed", None)
        assert [(a["status_code"], a["error"]) for a in ended["attempts"]] == [
            (500, "HTTP 500"),
            (None, "the endpoint was deleted"),
        ]
        assert (await delivery_log(client, account, held))["status"] == "pending"  # still in flight

        receiver.release()

        async def held_attempt_ended() -> bool:
            return (await delivery_log(client, account, held))["status"] == "failed"

        await wait_until(held_attempt_ended, "the held attempt ended")
    (attempt,) = only_destination(await delivery_log(client, account, held))["attempts"]
    assert (attempt["status_code"], attempt["next_attempt_at"]) == (500, None)
    assert sorted(sent) == sorted([waiting, held]) and len(receiver.deliveries) == 2


async def test_a_success_ends_the_failure_record(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    receiver.script(500)
    once = with_settings(settings, retry_schedule=())

    await send_test_event(client, account, endpoint["id"])
    await deliver(once)
    failing = await get_endpoint(client, account, endpoint["id"])
    assert failing["status"] == "enabled" and failing["failing_since"] is not None

    await send_test_event(client, account, endpoint["id"])
    await deliver(once)
    recovered = await get_endpoint(client, account, endpoint["id"])
    assert recovered["status"] == "enabled" and recovered["failing_since"] is None


async def test_responses_are_kept_truncated_and_a_dropped_connection_is_an_error(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    receiver.script(Answer(500, body=b"e" * 20_000), Answer(drop=True))
    msg_id = await send_test_event(client, account, endpoint["id"])

    await deliver(settings)

    attempts = only_destination(await delivery_log(client, account, msg_id))["attempts"]
    assert [a["status_code"] for a in attempts] == [500, None, 200]
    assert attempts[0]["response_excerpt"] == "e" * RESPONSE_EXCERPT_BYTES
    assert attempts[1]["error"] == "the receiver closed the connection without answering"


async def test_payloads_and_attempts_expire_after_the_retention(
    account: Partner, settings: Settings, redis: Redis, receivers: MakeReceiver
) -> None:
    keeping = with_settings(settings, webhook_retention=120)
    async with api_client(keeping) as client:
        endpoint, _ = await endpoint_with_receiver(client, account, receivers, ["*"])
        msg_id = await send_test_event(client, account, endpoint["id"])
        await deliver(keeping)
        assert (await delivery_log(client, account, msg_id))["status"] == "delivered"

    for key in (message_key(msg_id), delivery_key(msg_id, endpoint["id"])):
        assert 100 < await redis.ttl(key) <= 120, key


# --- fan-out and signatures -----------------------------------------------------------------------


async def test_an_event_fans_out_to_the_callback_and_every_subscribed_endpoint(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    callback_receiver = receivers()
    completed, completed_receiver = await endpoint_with_receiver(
        client, account, receivers, ["image.completed"]
    )
    everything, everything_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    failed, failed_receiver = await endpoint_with_receiver(client, account, receivers, ["image.failed"])
    secrets = [account.webhook_secret, completed["secret"], everything["secret"], failed["secret"]]
    for receiver in (callback_receiver, completed_receiver, everything_receiver, failed_receiver):
        receiver.secrets = list(secrets)  # each checks every secret: only its own may have signed

    image_id = (await upload(client, account, imagegen.jpeg(), callback_url=callback_receiver.url)).json()[
        "id"
    ]
    await run_burst(settings)

    (by_callback,) = callback_receiver.deliveries
    (by_completed,) = completed_receiver.deliveries
    (by_everything,) = everything_receiver.deliveries
    assert failed_receiver.deliveries == []
    assert by_callback.verified_with == (account.webhook_secret,)
    assert by_completed.verified_with == (completed["secret"],)
    assert by_everything.verified_with == (everything["secret"],)
    fanned = (by_callback, by_completed, by_everything)
    assert {delivery.id for delivery in fanned} == {by_callback.id}
    assert {delivery.body for delivery in fanned} == {by_callback.body}
    assert by_callback.event["type"] == "image.completed"
    assert by_callback.event["data"]["id"] == image_id
    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    log = await delivery_log(client, account, by_callback.id)
    assert log["status"] == "delivered"
    assert [d["endpoint_id"] for d in log["destinations"]] == [
        None,
        *sorted([completed["id"], everything["id"]]),
    ]
    assert log["payload"] == by_callback.event
    assert image["status"] == "completed"

    broken_id = (
        await upload(client, account, imagegen.truncated_jpeg(), callback_url=callback_receiver.url)
    ).json()["id"]
    await run_burst(settings)

    assert len(completed_receiver.deliveries) == 1  # not subscribed to image.failed
    (by_failed,) = failed_receiver.deliveries
    assert [d.id for d in callback_receiver.deliveries[1:]] == [by_failed.id]
    assert [d.id for d in everything_receiver.deliveries[1:]] == [by_failed.id]
    assert by_failed.event["type"] == "image.failed"
    assert by_failed.event["data"]["id"] == broken_id
    assert by_failed.verified_with == (failed["secret"],)


async def test_an_endpoint_rotation_signs_with_old_and_new_until_the_grace_ends(
    account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    grace = 0.5
    brief = with_settings(settings, secret_rotation_grace=grace)
    async with api_client(brief) as client, worker_deps(brief) as deps:
        endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
        old = endpoint["secret"]
        response = await client.post(f"{ENDPOINTS}/{endpoint['id']}/rotate-secret", headers=account.headers)
        grace_ends = time.monotonic() + grace
        new = response.json()["secret"]
        receiver.trust(new)

        during = await send_test_event(client, account, endpoint["id"])
        await deps.dispatcher.run_until_idle()
        (rotating,) = receiver.deliveries
        assert time.monotonic() < grace_ends, "too slow to deliver within the grace period"
        assert rotating.id == during
        assert len(rotating.signatures) == 2
        assert rotating.verified_with == (old, new)

        await asyncio.sleep(grace_ends - time.monotonic())  # the old secret's expiry, not a guess
        after = await send_test_event(client, account, endpoint["id"])
        await deps.dispatcher.run_until_idle()

    rotated = receiver.deliveries[-1]
    assert rotated.id == after
    assert len(rotated.signatures) == 1
    assert rotated.verified_with == (new,)


async def test_a_callback_secret_rotation_signs_with_old_and_new_until_the_grace_ends(
    account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    grace = 0.5
    brief = with_settings(settings, secret_rotation_grace=grace)
    receiver = receivers(account.webhook_secret)
    async with api_client(brief) as client:
        await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
        await run_burst(brief)
        (before,) = receiver.deliveries
        assert before.verified_with == (account.webhook_secret,)

        async with worker_deps(brief) as deps:
            response = await client.post("/v1/webhook-secret/rotate", headers=account.headers)
            grace_ends = time.monotonic() + grace
            new = response.json()["secret"]
            assert new != account.webhook_secret
            assert (await client.get("/v1/webhook-secret", headers=account.headers)).json()["secret"] == new
            receiver.trust(new)

            await client.post(f"/v1/deliveries/{before.id}/retry", headers=account.headers)
            await deps.dispatcher.run_until_idle()
            during = receiver.deliveries[-1]
            assert time.monotonic() < grace_ends, "too slow to deliver within the grace period"

            await asyncio.sleep(grace_ends - time.monotonic())
            await client.post(f"/v1/deliveries/{before.id}/retry", headers=account.headers)
            await deps.dispatcher.run_until_idle()
            after = receiver.deliveries[-1]

    assert during.id == after.id == before.id
    assert len(during.signatures) == 2
    assert during.verified_with == (account.webhook_secret, new)
    assert len(after.signatures) == 1
    assert after.verified_with == (new,)


# --- per-endpoint limits --------------------------------------------------------------------------


async def test_an_endpoint_never_has_more_than_max_in_flight_across_workers(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"], max_in_flight=2)
    receiver.script(*[Answer(200, delay=0.1)] * 8)
    sent = [await send_test_event(client, account, endpoint["id"]) for _ in range(8)]

    # Two workers' delivery loops, as they run in production, each free to run 50 attempts at once.
    async with worker_deps(settings) as first, worker_deps(settings) as second:
        first.dispatcher.start()
        second.dispatcher.start()
        arrived = await receiver.arrivals(8)

        async def all_delivered() -> bool:
            logs = [await delivery_log(client, account, msg_id) for msg_id in sent]
            return all(log["status"] == "delivered" for log in logs)

        await wait_until(all_delivered, "all recorded as delivered")

    assert sorted(delivery.id for delivery in arrived) == sorted(sent)
    assert receiver.most_in_flight == 2


async def test_a_busy_endpoints_backlog_does_not_hold_back_other_endpoints(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    busy, busy_receiver = await endpoint_with_receiver(client, account, receivers, ["*"], max_in_flight=1)
    busy_receiver.script(*[Answer(200, delay=0.05)] * 50)
    idle, idle_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    async with worker_deps(settings) as deps:
        # A burst for the busy endpoint (a batch of 1,100 images finishing, say), due at once.
        async with deps.redis.pipeline(transaction=False) as pipe:
            for _ in range(1100):
                to = [Destination(busy["id"], busy["url"])]
                deps.store.messages.stage_new(
                    pipe, new_message(new_id("msg"), account.id, "webhook.test", {}, to)
                )
            await pipe.execute()
        deps.dispatcher.start()
        await busy_receiver.arrivals(1)

        msg_id = await send_test_event(client, account, idle["id"])
        deps.dispatcher.nudge()
        (delivery,) = await asyncio.to_thread(idle_receiver.wait_for, 1, 1.0)

    assert delivery.id == msg_id


async def test_a_rate_limit_spreads_deliveries_over_seconds(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"], rate_limit=2)
    sent = [await send_test_event(client, account, endpoint["id"]) for _ in range(5)]

    await deliver(settings)

    arrived = receiver.deliveries
    assert sorted(delivery.id for delivery in arrived) == sorted(sent)
    # Five at two a second take three clock seconds: the first and the last are more than 1 s apart.
    assert arrived[-1].received_at - arrived[0].received_at > 0.95


async def stage_test_events(deps: WorkerDeps, account: Partner, to: list[Destination], count: int) -> None:
    """`count` webhook.test messages, due at once, spread over the destinations `to` in turn."""
    async with deps.redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            message = new_message(new_id("msg"), account.id, "webhook.test", {"n": n}, [to[n % len(to)]])
            deps.store.messages.stage_new(pipe, message)
        await pipe.execute()


@pytest.mark.parametrize("route", ["callback", "endpoints"])
async def test_a_receiver_that_never_answers_does_not_hold_back_other_deliveries(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver, route: str
) -> None:
    """150 deliveries due for a receiver that takes connections and never answers (at its callback URL, or
    at two endpoints on its host allowed 100 in flight each): another receiver's webhook still goes at
    once, the hanging one never has more requests than the worker has connections to it, and its backlog
    follows as soon as it answers."""
    hanging = receivers(account.webhook_secret)
    hanging.script(*[Answer(hold=True)] * 150)
    healthy = receivers(account.webhook_secret)
    if route == "callback":
        to = [Destination(CALLBACK, hanging.url)]
    else:
        endpoints = [
            await create_endpoint(client, account, f"{hanging.url}/{name}", ["*"], max_in_flight=100)
            for name in ("orders", "billing")
        ]
        to = [Destination(endpoint["id"], endpoint["url"]) for endpoint in endpoints]
    async with worker_deps(settings) as deps:
        await stage_test_events(deps, account, to, 150)
        deps.dispatcher.start()
        await hanging.arrivals(WEBHOOK_CONNECTIONS_PER_ORIGIN)

        urgent = new_message(
            new_id("msg"), account.id, "webhook.test", {}, [Destination(CALLBACK, healthy.url)]
        )
        await deps.store.save_message(urgent)
        (delivery,) = await asyncio.to_thread(healthy.wait_for, 1, 2.0)
        assert hanging.most_in_flight == WEBHOOK_CONNECTIONS_PER_ORIGIN

        hanging.release()
        arrived = await hanging.arrivals(150)

    assert delivery.id == urgent.id
    assert len({each.id for each in arrived}) == 150
    assert hanging.most_in_flight == WEBHOOK_CONNECTIONS_PER_ORIGIN


async def test_any_number_of_hanging_origins_leaves_a_prompt_receiver_its_webhooks_at_once(
    account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    """Twelve receivers on origins of their own take connections and never answer, each with a backlog
    of 40 webhooks (a fixed share per origin let two of them hold every slot for the whole timeout):
    a receiver that has answered before still gets each new webhook at once, one after another."""
    healthy = receivers(account.webhook_secret)
    hanging = await SilentOrigins().start(12)
    to_healthy = [Destination(CALLBACK, healthy.url)]
    try:
        async with worker_deps(settings) as deps:
            deps.dispatcher.start()
            await deps.store.save_message(
                new_message(new_id("msg"), account.id, "webhook.test", {}, to_healthy)
            )
            await healthy.arrivals(1)

            await stage_test_events(deps, account, [Destination(CALLBACK, url) for url in hanging.urls], 480)
            deps.dispatcher.nudge()
            async with asyncio.timeout(WAIT_SECONDS):
                await hanging.wait_all_requested()
            sent = []
            for count in range(2, 12):
                urgent = new_message(new_id("msg"), account.id, "webhook.test", {}, to_healthy)
                await deps.store.save_message(urgent)
                sent.append(urgent.id)
                await asyncio.to_thread(healthy.wait_for, count, 3.0)
            await hanging.close()
    finally:
        await hanging.close()

    assert [delivery.id for delivery in healthy.deliveries[1:]] == sent


async def test_a_receiver_never_heard_from_is_not_queued_behind_new_origins_that_hang(
    account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    """Sixty origins this worker has never sent to, each with 40 webhooks due, turn out to hang; a
    partner's first webhook, due after all of theirs, must not wait while they are being found out
    (when new origins shared 20 slots, it waited 6 s)."""
    hanging = await SilentOrigins().start(60)
    healthy = receivers(account.webhook_secret)
    try:
        async with worker_deps(settings) as deps:
            await stage_test_events(deps, account, [Destination(CALLBACK, url) for url in hanging.urls], 2400)
            first = new_message(
                new_id("msg"), account.id, "webhook.test", {}, [Destination(CALLBACK, healthy.url)]
            )
            await deps.store.save_message(first)
            deps.dispatcher.start()
            (delivery,) = await asyncio.to_thread(healthy.wait_for, 1, 1.0)
            await hanging.close()
    finally:
        await hanging.close()
    assert delivery.id == first.id


async def test_receivers_that_start_hanging_give_back_the_prompt_slots_within_seconds(
    account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    """Six receivers answer once, promptly, then hang with 40 webhooks each due: together they could
    hold every prompt slot, until their requests have gone unanswered for a second. A receiver that
    still answers gets its next webhook within seconds, not after their 15 s timeout."""
    turned = [receivers(account.webhook_secret) for _ in range(6)]
    for receiver in turned:
        receiver.script(200, *[Answer(hold=True)] * 40)
    healthy = receivers(account.webhook_secret)
    async with worker_deps(settings) as deps:
        deps.dispatcher.start()
        everyone = [*turned, healthy]
        await stage_test_events(deps, account, [Destination(CALLBACK, each.url) for each in everyone], 7)
        for each in everyone:
            await each.arrivals(1)

        for each in turned:  # one receiver's backlog after another's: the first ones take what they may
            await stage_test_events(deps, account, [Destination(CALLBACK, each.url)], 40)
        deps.dispatcher.nudge()
        for each in turned:
            await each.arrivals(2)
        urgent = new_message(
            new_id("msg"), account.id, "webhook.test", {}, [Destination(CALLBACK, healthy.url)]
        )
        await deps.store.save_message(urgent)
        arrived = await asyncio.to_thread(healthy.wait_for, 2, 3.0)
        for each in turned:
            each.release()

    assert arrived[1].id == urgent.id


# --- manual control -------------------------------------------------------------------------------


async def test_a_worker_stopping_as_it_claims_still_sends_what_it_claimed(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    """A deploy stops the worker between Redis claiming a delivery for it and its reading the answer:
    the webhook goes out before the worker ends, where it waited out the claim's lease (a minute)."""
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    msg_id = await send_test_event(client, account, endpoint["id"])
    async with worker_deps(settings) as deps:
        dispatcher = deps.dispatcher
        claim, claimed, answer_read = dispatcher._claim, asyncio.Event(), asyncio.Event()

        async def claim_then_wait_for_the_answer(**arguments: Any) -> Any:
            answer = await claim(**arguments)
            if answer[0]:
                claimed.set()
                await answer_read.wait()
            return answer

        dispatcher._claim = claim_then_wait_for_the_answer
        dispatcher.start()
        await claimed.wait()
        stopping = asyncio.create_task(dispatcher.stop())
        await asyncio.sleep(0)  # stop() under way
        answer_read.set()
        await stopping

    assert [delivery.id for delivery in receiver.deliveries] == [msg_id]
    assert (await delivery_log(client, account, msg_id))["status"] == "delivered"


async def test_a_test_event_goes_to_that_endpoint_only(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    tested, tested_receiver = await endpoint_with_receiver(client, account, receivers, ["image.failed"])
    _, other_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])

    response = await client.post(f"{ENDPOINTS}/{tested['id']}/test", headers=account.headers)

    assert response.status_code == 202
    queued = response.json()
    assert queued["event_type"] == "webhook.test" and queued["status"] == "pending"
    assert [d["endpoint_id"] for d in queued["destinations"]] == [tested["id"]]
    await deliver(settings)
    (delivery,) = tested_receiver.deliveries
    assert delivery.id == queued["id"]
    assert delivery.verified_with == (tested["secret"],)
    assert delivery.event["type"] == "webhook.test"
    assert delivery.event["data"]["endpoint_id"] == tested["id"]
    assert other_receiver.deliveries == []


async def test_a_manual_retry_redelivers_under_the_same_id_and_numbering_goes_on(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    _, receiver, msg_id = await failed_test_event(client, account, settings, receivers)
    once = with_settings(settings, retry_schedule=())
    assert (await delivery_log(client, account, msg_id))["status"] == "failed"

    response = await client.post(f"/v1/deliveries/{msg_id}/retry", headers=account.headers)

    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    await deliver(once)
    first, second = receiver.deliveries
    assert first.id == second.id == msg_id and first.body == second.body
    log = await delivery_log(client, account, msg_id)
    assert log["status"] == "delivered"
    attempts = only_destination(log)["attempts"]
    assert [(a["number"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]

    wrong = await client.post(
        f"/v1/deliveries/{msg_id}/retry", headers=account.headers, json={"endpoint_id": "ep_elsewhere"}
    )
    assert wrong.status_code == 422


async def test_a_manual_retry_can_name_one_destination(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    callback_receiver = receivers(account.webhook_secret)
    endpoint, endpoint_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    callback_receiver.script(500)
    endpoint_receiver.script(500)
    await upload(client, account, imagegen.jpeg(), callback_url=callback_receiver.url)
    await run_burst(with_settings(settings, retry_schedule=()))
    (failed,) = callback_receiver.deliveries
    assert (await delivery_log(client, account, failed.id))["status"] == "failed"

    response = await client.post(
        f"/v1/deliveries/{failed.id}/retry", headers=account.headers, json={"endpoint_id": endpoint["id"]}
    )
    assert response.status_code == 202, response.text
    await deliver(settings)

    assert len(callback_receiver.deliveries) == 1
    assert [d.id for d in endpoint_receiver.deliveries] == [failed.id, failed.id]
    log = await delivery_log(client, account, failed.id)
    statuses = {d["endpoint_id"]: d["status"] for d in log["destinations"]}
    assert statuses == {None: "failed", endpoint["id"]: "delivered"}
    assert log["status"] == "failed"  # one destination failed for good


async def test_attempts_go_to_the_endpoints_current_url(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, old_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    new_receiver = receivers(endpoint["secret"])
    msg_id = await send_test_event(client, account, endpoint["id"])
    moved = await client.patch(
        f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers, json={"url": new_receiver.url}
    )
    assert moved.status_code == 200

    await deliver(settings)

    assert old_receiver.deliveries == []
    (delivery,) = new_receiver.deliveries
    assert delivery.id == msg_id and delivery.verified_with == (endpoint["secret"],)


async def test_a_manual_retry_leaves_a_pending_delivery_alone(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    msg_id = await send_test_event(client, account, endpoint["id"])

    response = await client.post(f"/v1/deliveries/{msg_id}/retry", headers=account.headers)
    await deliver(settings)

    assert response.status_code == 202
    assert len(receiver.deliveries) == 1
    assert len(only_destination(await delivery_log(client, account, msg_id))["attempts"]) == 1


async def test_a_manual_retry_brings_a_waiting_retry_forward(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    receiver.script(500)
    patient = with_settings(settings, retry_schedule=(3600.0,))
    msg_id = await send_test_event(client, account, endpoint["id"])
    async with worker_deps(patient) as deps:
        deps.dispatcher.start()

        async def waiting_an_hour() -> bool:
            destination = only_destination(await delivery_log(client, account, msg_id))
            return destination["status"] == "pending" and destination["next_attempt_at"] is not None

        await wait_until(waiting_an_hour, "waiting for its next retry")
        response = await client.post(f"/v1/deliveries/{msg_id}/retry", headers=account.headers)
        assert response.status_code == 202, response.text
        await asyncio.to_thread(receiver.wait_for, 2, 2.0)

        async def delivered() -> bool:
            return (await delivery_log(client, account, msg_id))["status"] == "delivered"

        await wait_until(delivered, "delivered")
    attempts = only_destination(await delivery_log(client, account, msg_id))["attempts"]
    assert [(a["number"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]


async def test_a_manual_retry_during_an_attempt_waits_for_it(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    _, receiver, msg_id = await failed_test_event(
        client, account, settings, receivers, Answer(200, hold=True)
    )
    once = with_settings(settings, retry_schedule=())
    retry = f"/v1/deliveries/{msg_id}/retry"
    async with worker_deps(once) as deps:
        deps.dispatcher.start()
        assert (await client.post(retry, headers=account.headers)).status_code == 202
        await receiver.arrivals(2)  # the retry's attempt, held by the receiver

        refused = await asyncio.gather(*(client.post(retry, headers=account.headers) for _ in range(20)))
        receiver.release()

        async def delivered() -> bool:
            return (await delivery_log(client, account, msg_id))["status"] == "delivered"

        await wait_until(delivered, "delivered")
    for answer in refused:
        assert_problem(answer, 409, "attempt_in_progress")
    assert len(receiver.deliveries) == 2 and receiver.most_in_flight == 1
    attempts = only_destination(await delivery_log(client, account, msg_id))["attempts"]
    assert [(a["number"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]


async def test_concurrent_retries_send_one_at_a_time_and_log_every_request(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    """60 retries at once of a failed delivery to a slow receiver: never two requests at once, and every
    request that went out is in the log."""
    _, receiver, msg_id = await failed_test_event(
        client, account, settings, receivers, *[Answer(200, delay=0.3)] * 60
    )
    once = with_settings(settings, retry_schedule=())
    retry = f"/v1/deliveries/{msg_id}/retry"
    async with worker_deps(once) as deps:
        deps.dispatcher.start()
        answers = await asyncio.gather(*(client.post(retry, headers=account.headers) for _ in range(60)))

        async def settled() -> bool:
            log = await delivery_log(client, account, msg_id)
            return log["status"] == "delivered" and receiver.in_flight == 0

        await wait_until(settled, "delivered")
    assert {answer.status_code for answer in answers} <= {202, 409}
    assert receiver.most_in_flight == 1
    attempts = only_destination(await delivery_log(client, account, msg_id))["attempts"]
    assert len(attempts) == len(receiver.deliveries)
    assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1))


async def test_a_manual_retry_to_a_disabled_endpoint_is_refused(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver, msg_id = await failed_test_event(client, account, settings, receivers)
    once = with_settings(settings, retry_schedule=())
    await client.patch(f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers, json={"status": "disabled"})

    response = await client.post(f"/v1/deliveries/{msg_id}/retry", headers=account.headers)
    await deliver(once)

    assert_problem(response, 409, "endpoint_disabled")
    destination = only_destination(await delivery_log(client, account, msg_id))
    assert destination["status"] == "failed"
    assert [a["status_code"] for a in destination["attempts"]] == [500]  # no made-up attempt
    assert len(receiver.deliveries) == 1


async def test_a_request_sent_again_on_a_new_connection_shows_in_the_delivery_log(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    """The receiver closes a kept-alive connection just as the next webhook goes out on it: the request
    goes again on a new connection, and the log says so (the receiver may have seen it twice)."""
    server = await Server().start()
    to = [Destination(CALLBACK, server.url())]
    first = new_message(new_id("msg"), account.id, "webhook.test", {"n": 1}, to)
    second = new_message(new_id("msg"), account.id, "webhook.test", {"n": 2}, to)
    try:
        async with worker_deps(settings) as deps:
            await deps.store.save_message(first)
            await deps.dispatcher.run_until_idle()
            server.script.append(DROP)
            await deps.store.save_message(second)
            await deps.dispatcher.run_until_idle()
    finally:
        await server.stop()

    assert [(r.connection, r.headers["webhook-id"]) for r in server.received] == [
        (1, first.id),
        (1, second.id),
        (2, second.id),
    ]
    (plain,) = only_destination(await delivery_log(client, account, first.id))["attempts"]
    (resent,) = only_destination(await delivery_log(client, account, second.id))["attempts"]
    assert plain["resent"] is None
    assert (resent["status_code"], resent["error"]) == (200, None)
    assert resent["resent"] == (
        "the receiver closed the kept-alive connection without answering; sent again on a new connection"
    )


async def test_attempts_record_the_url_they_went_to(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, old_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    new_receiver = receivers(endpoint["secret"])
    old_receiver.script(500)
    once = with_settings(settings, retry_schedule=())
    msg_id = await send_test_event(client, account, endpoint["id"])
    await deliver(once)
    await client.patch(
        f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers, json={"url": new_receiver.url}
    )

    await client.post(f"/v1/deliveries/{msg_id}/retry", headers=account.headers)
    await deliver(once)

    attempts = only_destination(await delivery_log(client, account, msg_id))["attempts"]
    assert [(a["status_code"], a["url"]) for a in attempts] == [
        (500, old_receiver.url),
        (200, new_receiver.url),
    ]


async def test_recover_redelivers_the_endpoints_failures_since_a_time(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    recovering, recovering_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    other, other_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    recovering_receiver.script(500, 500, 500)
    other_receiver.script(500)
    once = with_settings(settings, retry_schedule=())
    older = await send_test_event(client, account, recovering["id"])
    await deliver(once)
    since = datetime.now().astimezone()  # a local time with its offset: any zone is accepted
    recent = [await send_test_event(client, account, recovering["id"]) for _ in range(2)]
    elsewhere = await send_test_event(client, account, other["id"])
    await deliver(once)
    assert len(recovering_receiver.deliveries) == 3

    response = await client.post(
        f"{ENDPOINTS}/{recovering['id']}/recover", headers=account.headers, json={"since": since.isoformat()}
    )

    assert response.status_code == 202, response.text
    recovery = response.json()
    assert recovery["redelivered"] == 2
    assert recovery["since"].endswith("Z") and ms(recovery["since"]) == int(since.timestamp() * 1000)
    await deliver(once)
    assert sorted(d.id for d in recovering_receiver.deliveries[3:]) == sorted(recent)
    assert len(other_receiver.deliveries) == 1
    for msg_id in recent:
        log = await delivery_log(client, account, msg_id)
        assert log["status"] == "delivered"
        assert [a["status_code"] for a in only_destination(log)["attempts"]] == [500, 200]
    assert (await delivery_log(client, account, older))["status"] == "failed"
    assert (await delivery_log(client, account, elsewhere))["status"] == "failed"


async def test_recover_after_re_enabling_brings_back_what_happened_while_disabled(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["image.completed"])
    receiver.script(410)
    since = datetime.now().astimezone().isoformat()
    first = await upload(client, account, imagegen.jpeg(16, 16))
    await run_burst(settings)
    assert (await get_endpoint(client, account, endpoint["id"]))["status"] == "disabled"
    for _ in range(6):
        assert (await upload(client, account, imagegen.jpeg(16, 16))).status_code == 202
    await run_burst(settings)
    assert len(receiver.deliveries) == 1

    missed = await client.get(
        f"/v1/deliveries?endpoint_id={endpoint['id']}&status=skipped", headers=account.headers
    )
    assert missed.status_code == 200, missed.text
    skipped = [only_destination(log) for log in missed.json()["data"]]
    assert len(skipped) == 6
    assert {(d["status"], d["attempts"][0]["status_code"], d["attempts"][0]["url"]) for d in skipped} == {
        ("skipped", None, None)
    }
    assert skipped[0]["attempts"][0]["error"].startswith("not sent: the endpoint was disabled")

    enabled = await client.patch(
        f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers, json={"status": "enabled"}
    )
    assert enabled.status_code == 200, enabled.text
    response = await client.post(
        f"{ENDPOINTS}/{endpoint['id']}/recover", headers=account.headers, json={"since": since}
    )

    assert response.status_code == 202, response.text
    assert response.json()["redelivered"] == 7
    await deliver(settings)
    recovered = receiver.deliveries[1:]
    assert len(recovered) == 7 and all(delivery.verified for delivery in recovered)
    assert receiver.deliveries[0].id in {delivery.id for delivery in recovered}
    listed = await client.get(f"/v1/deliveries?endpoint_id={endpoint['id']}", headers=account.headers)
    assert sorted(log["id"] for log in listed.json()["data"]) == sorted(d.id for d in recovered)
    assert {log["status"] for log in listed.json()["data"]} == {"delivered"}
    assert first.json()["id"] in {d.event["data"]["id"] for d in recovered}


async def test_a_deleted_endpoint_is_not_recorded_for_later_events(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    endpoint, receiver = await endpoint_with_receiver(client, account, receivers, ["image.completed"])
    await client.patch(f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers, json={"status": "disabled"})
    assert (await client.delete(f"{ENDPOINTS}/{endpoint['id']}", headers=account.headers)).status_code == 204

    assert (await upload(client, account, imagegen.jpeg(16, 16))).status_code == 202
    await run_burst(settings)

    listed = await client.get("/v1/deliveries", headers=account.headers)
    assert listed.json()["data"] == []
    assert receiver.deliveries == []


# --- the delivery log -----------------------------------------------------------------------------


async def listed_ids(client: httpx.AsyncClient, account: Partner, query: str) -> list[str]:
    response = await client.get(f"/v1/deliveries?{query}", headers=account.headers)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


async def test_the_delivery_log_filters_and_pages(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receivers: MakeReceiver
) -> None:
    first, _ = await endpoint_with_receiver(client, account, receivers, ["*"])
    second, second_receiver = await endpoint_with_receiver(client, account, receivers, ["*"])
    second_receiver.script(500)
    once = with_settings(settings, retry_schedule=())
    first_test = await send_test_event(client, account, first["id"])
    second_test = await send_test_event(client, account, second["id"])
    await deliver(once)
    mark = datetime.now().astimezone().isoformat()
    callback = receivers(account.webhook_secret)
    await upload(client, account, imagegen.jpeg(), callback_url=callback.url)
    await run_burst(once)
    (announced,) = callback.deliveries
    completed = announced.id
    pending = await send_test_event(client, account, first["id"])

    assert await listed_ids(client, account, "") == [pending, completed, second_test, first_test]
    assert await listed_ids(client, account, "status=delivered") == [completed, first_test]
    assert await listed_ids(client, account, "status=failed") == [second_test]
    assert await listed_ids(client, account, "status=pending") == [pending]
    assert await listed_ids(client, account, f"endpoint_id={second['id']}") == [completed, second_test]
    assert await listed_ids(client, account, f"endpoint_id={second['id']}&status=failed") == [second_test]
    assert await listed_ids(client, account, f"endpoint_id={first['id']}&status=pending") == [pending]
    assert await listed_ids(client, account, "event_type=image.completed") == [completed]
    assert await listed_ids(client, account, "event_type=webhook.test") == [pending, second_test, first_test]
    after = httpx.QueryParams({"created_after": mark})
    assert await listed_ids(client, account, str(after)) == [pending, completed]
    before = httpx.QueryParams({"created_before": mark})
    assert await listed_ids(client, account, str(before)) == [second_test, first_test]
    both = httpx.QueryParams({"created_after": mark, "event_type": "webhook.test"})
    assert await listed_ids(client, account, str(both)) == [pending]

    page = (await client.get("/v1/deliveries?limit=2", headers=account.headers)).json()
    assert [item["id"] for item in page["data"]] == [pending, completed]
    assert page["has_more"] is True and page["next_cursor"] == completed
    rest = (
        await client.get(f"/v1/deliveries?limit=2&cursor={page['next_cursor']}", headers=account.headers)
    ).json()
    assert [item["id"] for item in rest["data"]] == [second_test, first_test]
    assert rest["has_more"] is False and rest["next_cursor"] is None
    filtered = (
        await client.get("/v1/deliveries?limit=1&event_type=webhook.test", headers=account.headers)
    ).json()
    assert [item["id"] for item in filtered["data"]] == [pending] and filtered["next_cursor"] == pending
    following = await listed_ids(client, account, f"limit=1&event_type=webhook.test&cursor={pending}")
    assert following == [second_test]


async def test_an_image_names_its_webhooks_and_the_delivery_log_filters_by_image_and_batch(
    client: httpx.AsyncClient, account: Partner, settings: Settings, redis: Redis, receivers: MakeReceiver
) -> None:
    endpoint, heard = await endpoint_with_receiver(client, account, receivers, ["*"])
    callback = receivers(account.webhook_secret)
    batch = (await client.post("/v1/batches", json={}, headers=account.headers)).json()
    alone = (await upload(client, account, imagegen.jpeg(), callback_url=callback.url)).json()
    batched = (await upload(client, account, imagegen.jpeg(), batch_id=batch["id"])).json()
    sealed = await client.post(f"/v1/batches/{batch['id']}/seal", headers=account.headers)
    assert sealed.status_code == 200, sealed.text
    await run_burst(settings)
    await deliver(settings)
    other = await make_account(redis, "another partner")

    done = (await client.get(f"/v1/images/{alone['id']}", headers=account.headers)).json()
    (to_callback,) = callback.deliveries
    announced = to_callback.id
    assert done["webhooks"] == [
        {"id": announced, "type": "image.completed", "endpoint_id": None},
        {"id": announced, "type": "image.completed", "endpoint_id": endpoint["id"]},
    ]
    assert await listed_ids(client, account, f"image_id={alone['id']}") == [announced]
    assert await listed_ids(client, account, f"image_id={alone['id']}&event_type=image.failed") == []
    assert await listed_ids(client, account, f"image_id={alone['id']}&cursor={announced}") == []
    batched_done = (await client.get(f"/v1/images/{batched['id']}", headers=account.headers)).json()
    batched_announced = batched_done["webhooks"][0]["id"]
    (batch_completed,) = await listed_ids(client, account, "event_type=batch.completed")
    assert {delivery.id for delivery in heard.deliveries} == {announced, batched_announced, batch_completed}
    in_batch = await listed_ids(client, account, f"batch_id={batch['id']}")
    assert in_batch == [batch_completed, batched_announced]
    both = f"batch_id={batch['id']}&image_id={batched['id']}"
    assert await listed_ids(client, account, both) == [batched_announced]
    assert await listed_ids(client, account, f"batch_id={batch['id']}&image_id={alone['id']}") == []
    assert await listed_ids(client, other, f"image_id={alone['id']}") == []
    deleted = await client.delete(f"/v1/images/{alone['id']}", headers=account.headers)
    assert deleted.status_code == 204
    assert await listed_ids(client, account, f"image_id={alone['id']}") == []
    assert announced in await listed_ids(client, account, "")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("image_id=bat_0123", "image_id"),
        ("batch_id=hooks", "batch_id"),
        ("status=lost", "status"),
        ("event_type=image.done", "event_type"),
        ("endpoint_id=hooks", "endpoint_id"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2026-11-21T10:00:00", "created_before"),
        ("limit=0", "limit"),
        ("cursor=msg_nope", "cursor"),
    ],
)
async def test_the_delivery_log_refuses_bad_filters(
    client: httpx.AsyncClient, account: Partner, query: str, field: str
) -> None:
    response = await client.get(f"/v1/deliveries?{query}", headers=account.headers)
    assert response.status_code == 422
    assert field in {error["field"] for error in response.json()["errors"]}


# --- the SSRF guard at delivery time --------------------------------------------------------------


@pytest.fixture
def partner_dns(monkeypatch: pytest.MonkeyPatch) -> PartnerDNS:
    return PartnerDNS().install(monkeypatch)


@pytest.fixture
async def guarded_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API as production runs it: destinations must be public."""
    async with api_client(with_settings(settings, allow_private_callbacks=False)) as http:
        yield http


@pytest.mark.parametrize(
    ("addresses", "refusal"),
    [
        pytest.param(["127.0.0.1"], "blocked: 127.0.0.1 is a loopback address", id="loopback"),
        pytest.param(["10.0.0.7"], "blocked: 10.0.0.7 is a private address", id="rfc1918"),
        pytest.param(["169.254.169.254"], "blocked: 169.254.169.254 is a link-local address", id="metadata"),
        pytest.param(
            ["100.64.1.1"], "blocked: 100.64.1.1 is a shared (carrier-grade NAT) address", id="cgnat"
        ),
        pytest.param(["::ffff:127.0.0.1"], "blocked: ::ffff:7f00:1 is hiding 127.0.0.1", id="ipv4-mapped"),
        pytest.param(["64:ff9b::7f00:1"], "blocked: 64:ff9b::7f00:1 is hiding 127.0.0.1", id="nat64"),
        pytest.param(["2002:7f00:1::"], "blocked: 2002:7f00:1:: is hiding 127.0.0.1", id="6to4"),
        pytest.param(["fd00::1"], "blocked: fd00::1 is a private (unique local) address", id="ula"),
        pytest.param(
            ["93.184.216.34", "127.0.0.1"], "blocked: 127.0.0.1 is a loopback address", id="rebinding"
        ),
    ],
)
async def test_a_name_that_now_resolves_to_a_private_address_is_blocked_at_delivery(
    guarded_client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    receivers: MakeReceiver,
    partner_dns: PartnerDNS,
    addresses: list[str],
    refusal: str,
) -> None:
    receiver = receivers()
    partner_dns.answers["hooks.partner.test"] = ["93.184.216.34"]  # public when registered
    endpoint = await create_endpoint(
        guarded_client, account, f"http://hooks.partner.test:{receiver.port}/in", ["*"]
    )
    partner_dns.answers["hooks.partner.test"] = addresses  # then the partner's DNS changes
    msg_id = await send_test_event(guarded_client, account, endpoint["id"])

    await deliver(with_settings(settings, allow_private_callbacks=False, retry_schedule=()))

    assert "hooks.partner.test" in partner_dns.lookups  # resolved again at delivery
    assert receiver.deliveries == []
    (attempt,) = only_destination(await delivery_log(guarded_client, account, msg_id))["attempts"]
    assert attempt["status_code"] is None
    assert attempt["error"].startswith(refusal), attempt["error"]


async def test_a_callback_whose_name_now_resolves_to_loopback_is_blocked_at_delivery(
    guarded_client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    receivers: MakeReceiver,
    partner_dns: PartnerDNS,
) -> None:
    receiver = receivers(account.webhook_secret)
    partner_dns.answers["hooks.partner.test"] = ["93.184.216.34"]
    url = f"http://hooks.partner.test:{receiver.port}/in"
    response = await upload(guarded_client, account, imagegen.jpeg(), callback_url=url)
    assert response.status_code == 202, response.text
    partner_dns.answers["hooks.partner.test"] = ["127.0.0.1"]

    await run_burst(with_settings(settings, allow_private_callbacks=False, retry_schedule=()))

    assert receiver.deliveries == []
    (log,) = (await guarded_client.get("/v1/deliveries", headers=account.headers)).json()["data"]
    assert log["status"] == "failed"
    (attempt,) = only_destination(log)["attempts"]
    assert attempt["error"] == "blocked: 127.0.0.1 is a loopback address"


async def test_delivery_connects_to_the_address_it_resolved(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    receivers: MakeReceiver,
    partner_dns: PartnerDNS,
) -> None:
    """With private addresses allowed (development), a name is resolved once and that address used."""
    receiver = receivers()
    partner_dns.answers["hooks.partner.test"] = ["127.0.0.1"]
    endpoint = await create_endpoint(client, account, f"http://hooks.partner.test:{receiver.port}/in", ["*"])
    receiver.trust(endpoint["secret"])
    msg_id = await send_test_event(client, account, endpoint["id"])

    await deliver(settings)

    (delivery,) = receiver.deliveries
    assert delivery.id == msg_id and delivery.verified
    assert delivery.headers["host"] == f"hooks.partner.test:{receiver.port}"
    assert partner_dns.lookups == ["hooks.partner.test"]
