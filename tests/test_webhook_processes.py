"""At least once, with real worker processes: a worker SIGKILLed mid-delivery loses nothing."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from jobs.settings import Settings
from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.conftest import Partner
from tests.receiver import Answer, Receiver
from tests.test_endpoints_api import create_endpoint, delivery_log, send_test_event
from tests.test_processes import BIN, Children, base_env
from tests.test_spine import upload
from tests.test_webhook_engine import wait_until
from webhooks.dispatcher import lease_seconds_for
from webhooks.endpoints import endpoint_leases_key
from webhooks.messages import DUE_KEY, LEASES_KEY, now_ms

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


@pytest.fixture
def processes() -> Iterator[Children]:
    started = Children()
    try:
        yield started
    finally:
        started.stop_all()


def worker_env(settings: Settings, redis_server: EmbeddedRedis) -> dict[str, str]:
    """A worker process sharing this test's Redis and storage (the web app runs in-process)."""
    return {
        **base_env(settings.data_dir, 0),
        "REDIS_URL": redis_server.url,
        "DARKROOM_PUBLIC_URL": settings.public_url,
        "DARKROOM_ALLOW_PRIVATE_CALLBACKS": "1",
    }


async def expire_leases(redis: Redis, endpoint_id: str) -> list[str]:
    """Move the clock past the leases a dead worker left: what its lease running out does, minus the wait.

    A worker process's lease is 2 x the webhook timeout + 5 s (35 s by default), and no environment
    variable shortens it, so the test cannot simply wait for it."""
    moment = now_ms()
    leased = [member.decode() for member, score in await redis.zrange(DUE_KEY, 0, -1, withscores=True)]
    await redis.zadd(DUE_KEY, dict.fromkeys(leased, moment))
    await redis.zadd(LEASES_KEY, dict.fromkeys(leased, moment))
    endpoint_leases = endpoint_leases_key(endpoint_id)
    held = [member for member, _ in await redis.zrange(endpoint_leases, 0, -1, withscores=True)]
    if held:
        await redis.zadd(endpoint_leases, dict.fromkeys(held, moment))
    return leased


async def test_a_worker_killed_mid_delivery_loses_nothing(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    redis: Redis,
    redis_server: EmbeddedRedis,
    processes: Children,
) -> None:
    receiver = Receiver(account.webhook_secret).start()
    try:
        endpoint = await create_endpoint(client, account, receiver.url, ["*"])
        receiver.trust(endpoint["secret"])
        receiver.script(*[Answer(200, hold=True)] * 4)  # the first worker never hears back
        await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)  # callback + endpoint
        tests = [await send_test_event(client, account, endpoint["id"]) for _ in range(2)]
        env = worker_env(settings, redis_server)

        doomed = processes.start("worker", [str(BIN / "arq"), "jobs.worker.WorkerSettings"], env)
        held = await receiver.arrivals(4)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.process.wait()
        receiver.release()

        sent_ids = sorted(delivery.id for delivery in held)
        assert set(tests) < set(sent_ids)
        for msg_id in set(sent_ids):
            log = await delivery_log(client, account, msg_id)
            assert log["status"] == "pending", log  # in flight when the worker died: nothing recorded
            assert all(destination["attempts"] == [] for destination in log["destinations"])
        due = dict(await redis.zrange(DUE_KEY, 0, -1, withscores=True))
        assert len(due) == 4
        lease_ms = lease_seconds_for(Settings.from_env(env).webhook_timeout) * 1000
        assert all(now_ms() < score <= now_ms() + lease_ms for score in due.values()), due

        assert len(await expire_leases(redis, endpoint["id"])) == 4
        processes.start("worker", [str(BIN / "arq"), "jobs.worker.WorkerSettings"], env)
        everything = await receiver.arrivals(8)

        async def all_delivered() -> bool:
            logs = [await delivery_log(client, account, msg_id) for msg_id in set(sent_ids)]
            return all(log["status"] == "delivered" for log in logs)

        await wait_until(all_delivered, "recorded as delivered")
    finally:
        receiver.stop()

    again = everything[4:]
    assert sorted(delivery.id for delivery in again) == sent_ids  # the same ids, each destination once
    assert all(delivery.verified for delivery in again)
    by_destination = {(d.id, d.verified_with) for d in again}
    assert {(d.id, d.verified_with) for d in held} == by_destination
    for msg_id in set(sent_ids):
        log = await delivery_log(client, account, msg_id)
        assert all(
            [a["status_code"] for a in destination["attempts"]] == [200]
            for destination in log["destinations"]
        )
