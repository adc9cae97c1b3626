"""Redis unreachable: partners get a clear 503, and image jobs are retried rather than lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from arq.worker import Retry, func
from redis.asyncio import Redis
from redis.exceptions import WatchError

from jobs import worker
from jobs.queue import PROCESS_IMAGE, WakeableArqRedis
from jobs.settings import Settings
from jobs.store import PUBLIC_URL_KEY
from server.app import REDIS_COMMAND_TIMEOUT_SECONDS
from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.conftest import api_client, make_account, make_worker, with_settings, worker_deps
from tests.test_spine import upload
from tests.test_webhook_engine import wait_until


@pytest.fixture
def unreachable(settings: Settings, unused_tcp_port: int) -> Settings:
    return with_settings(settings, redis_url=f"redis://127.0.0.1:{unused_tcp_port}/0")


async def test_api_answers_503_problem_when_redis_is_down(unreachable: Settings) -> None:
    async with api_client(unreachable) as client:
        response = await client.post(
            "/v1/images",
            headers={"Authorization": "Bearer sk_live_" + "a" * 43},
            files={"file": ("photo.jpg", imagegen.jpeg(), "image/jpeg")},
        )
        ready = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    assert response.json()["code"] == "store_unavailable"
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("unreachable")


async def test_redis_outage_mid_job_is_retried_not_failed(unreachable: Settings) -> None:
    """arq fails a job that raises for good, which would leave its image `processing` forever."""
    async with worker_deps(unreachable) as deps:
        with pytest.raises(Retry):
            await worker.process_image(
                {"deps": deps, "job_try": 1, "job_id": "process:img_01m8000000000000000000000"},
                "img_01m8000000000000000000000",
            )


async def test_a_watch_cut_off_from_redis_still_reads_but_its_transaction_is_refused(
    redis: Redis, redis_server: EmbeddedRedis, settings: Settings
) -> None:
    """A worker's WATCH dies with its connection (a Redis restart): the reads before MULTI still answer,
    and the transaction fails as if the keys had changed, so the caller reads again, as arq and our
    optimistic loops do, rather than the worker exiting on a connection error."""
    await redis.set("dr:test:watched", "before")
    pool = WakeableArqRedis.connect(redis_server.url, settings.queue_name)
    try:
        async with pool.pipeline(transaction=True) as pipe:
            await pipe.watch("dr:test:watched")
            await redis.client_kill_filter(_type="normal", skipme=True)  # every client but this one
            assert await pipe.get("dr:test:watched") == b"before"
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set("dr:test:watched", "after")
            with pytest.raises(WatchError):
                await pipe.execute()
        assert await redis.get("dr:test:watched") == b"before"
        assert await pool.get("dr:test:watched") == b"before"
    finally:
        await pool.aclose()


async def test_a_frozen_redis_answers_503_in_seconds_rather_than_hanging_requests(settings: Settings) -> None:
    """A Redis that accepts connections but answers nothing (SIGSTOPped here; a hung host or a dropped
    network route in production): a request ends with the same 503 as an unreachable one."""
    with EmbeddedRedis(None) as server:
        probe = Redis.from_url(server.url)
        pid = int((await probe.info("server"))["process_id"])
        async with api_client(with_settings(settings, redis_url=server.url)) as client:
            # The web's own start-up write (its link base) done, so only the request meets the freeze.
            await wait_until(lambda: probe.exists(PUBLIC_URL_KEY), "the web announced its link base")
            await probe.aclose()
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                response = await asyncio.wait_for(
                    client.get("/v1/images", headers={"Authorization": "Bearer sk_live_" + "a" * 43}),
                    timeout=REDIS_COMMAND_TIMEOUT_SECONDS * 3,
                )
                waited = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
    assert response.status_code == 503
    assert response.json()["code"] == "store_unavailable"
    assert response.headers["retry-after"] == "5"
    assert waited < REDIS_COMMAND_TIMEOUT_SECONDS * 2


async def test_a_job_whose_time_limit_runs_out_while_redis_is_down_runs_again(
    settings: Settings, tmp_path: Path
) -> None:
    """An outage longer than a job's time limit: arq cancels the job while it waits for Redis. Failed
    for good, its image would stay `processing`; it is tried again once Redis is back, and completes."""
    first = EmbeddedRedis(tmp_path / "redis")
    first.start()
    port = first.port
    own = with_settings(settings, redis_url=first.url)
    async with Redis.from_url(first.url) as direct:
        partner = await make_account(direct, "partner")

    async def redis_goes_away(ctx: dict[str, Any]) -> None:
        if ctx["job_try"] == 1:
            await asyncio.to_thread(first.stop)

    async with api_client(own) as client:
        response = await upload(client, partner, imagegen.jpeg(64, 48))
        image_id = response.json()["id"]
        running = make_worker(
            own,
            functions=[func(worker.process_image, name=PROCESS_IMAGE, timeout=1)],
            on_job_start=redis_goes_away,
        )
        task = asyncio.create_task(running.async_run())
        try:

            async def ended_its_first_try() -> int:
                return running.jobs_retried + running.jobs_failed

            await wait_until(ended_its_first_try, "the job cut off by its time limit")
            assert (running.jobs_retried, running.jobs_failed) == (1, 0)
            with EmbeddedRedis(tmp_path / "redis", port=port):

                async def completed() -> bool:
                    image = await client.get(f"/v1/images/{image_id}", headers=partner.headers)
                    # arq's own bookkeeping done too: a job stopped in it would end the test cancelled.
                    arq_done = all(job.done() for job in running.tasks.values())
                    return image.json()["status"] == "completed" and arq_done

                await wait_until(completed, "the image completed")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await running.close()
        finally:
            task.cancel()


async def test_a_worker_stopped_before_it_reached_redis_shuts_down_cleanly() -> None:
    """SIGTERM while Redis was down at start: arq runs the shutdown hook with no pool in ctx yet."""
    await worker.shutdown({})
