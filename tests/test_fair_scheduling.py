"""Workers share themselves between accounts by plan, and cap each account's images in processing."""

from __future__ import annotations

import asyncio
import itertools
import re

import httpx
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from jobs.plans import DEFAULT_TIER, TIERS, plan_with
from jobs.queue import Lane, QueuePool, admitted_jobs_key, process_job_id
from jobs.records import ImageRecord
from jobs.settings import Settings
from jobs.store import Store
from tests import imagegen
from tests.conftest import Partner, make_account, run_burst, with_settings

PHOTO = imagegen.jpeg(32, 24)


async def give_plan(redis: Redis, partner: Partner, *, max_processing: int, share: int) -> None:
    """As `darkroom accounts update` does: the queue reads the plan at each admission."""
    numbers: dict[str, int | None] = {"max_processing": max_processing, "share": share}
    changed = await Store(redis).change_plan(partner.id, lambda _: plan_with(TIERS[DEFAULT_TIER], numbers))
    assert changed is not None


async def upload(client: httpx.AsyncClient, partner: Partner, count: int = 1) -> list[str]:
    ids = []
    for _ in range(count):
        response = await client.post(
            "/v1/images", headers=partner.headers, files={"file": ("photo.jpg", PHOTO, "image/jpeg")}
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


async def backlog_then_another_accounts_photo(
    client: httpx.AsyncClient, account: Partner, redis: Redis, backlog_size: int
) -> tuple[list[str], str]:
    """`backlog_size` images of `account`'s, then one of another account's: their ids."""
    backlog = await upload(client, account, backlog_size)
    other = await make_account(redis, "other")
    (single,) = await upload(client, other)
    return backlog, single


async def finished_images(redis: Redis, image_ids: list[str]) -> list[ImageRecord]:
    """The images in the order they started processing (each started_at is set as it starts)."""
    store = Store(redis)
    images = [await store.get_image(image_id) for image_id in image_ids]
    assert all(image is not None and image.status == "completed" for image in images), images
    return sorted((image for image in images if image is not None), key=lambda image: image.started_at or "")


async def admit(settings: Settings, lane: Lane = Lane.ALL) -> list[bytes]:
    """One poll of the queue, as a worker (of `lane`) with a free slot makes: what it would start."""
    pool = QueuePool.connect(settings.redis_url, settings.queue_name, lane=lane)
    try:
        startable: list[bytes] = await pool.zrangebyscore(settings.queue_name, min=float("-inf"), max="+inf")
        return startable
    finally:
        await pool.aclose()


async def take(settings: Settings, redis: Redis, lane: Lane) -> list[bytes]:
    """One poll, as a worker of `lane` makes, and that worker's claim of what it got (arq's lock): the
    next poll offers something else however long after it comes, where an offer alone lapses in
    200 ms."""
    taken = await admit(settings, lane)
    for job_id in taken:
        await redis.psetex(in_progress_key_prefix + job_id.decode(), 60_000, b"1")
    return taken


async def test_one_image_of_another_account_starts_before_a_backlog_of_fifty(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    backlog, single = await backlog_then_another_accounts_photo(client, account, redis, 50)

    await run_burst(with_settings(settings, worker_concurrency=1))

    order = [image.id for image in await finished_images(redis, [*backlog, single])]
    assert order.index(single) < 2, order


async def test_accounts_are_served_in_proportion_to_their_shares(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    other = await make_account(redis, "other")
    await give_plan(redis, account, max_processing=100, share=2)
    await give_plan(redis, other, max_processing=100, share=1)
    double = await upload(client, account, 30)
    single = await upload(client, other, 30)

    await run_burst(with_settings(settings, worker_concurrency=1))

    first = [image.id for image in await finished_images(redis, [*double, *single])][:15]
    served_double = sum(image_id in double for image_id in first)
    assert 9 <= served_double <= 11, first


async def test_an_account_has_at_most_max_processing_images_in_processing(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    other = await make_account(redis, "other")
    await give_plan(redis, account, max_processing=1, share=4)
    capped = await upload(client, account, 5)
    free = await upload(client, other, 8)

    await run_burst(with_settings(settings, worker_concurrency=4))

    one_at_a_time = await finished_images(redis, capped)
    for before, after in itertools.pairwise(one_at_a_time):
        assert before.completed_at is not None and after.started_at is not None
        assert after.started_at >= before.completed_at, (before, after)
    await finished_images(redis, free)  # served meanwhile by the other workers


async def test_a_job_whose_worker_died_keeps_its_slot_and_completes(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    await give_plan(redis, account, max_processing=1, share=4)
    first, second = await upload(client, account, 2)
    (claimed,) = await admit(settings)
    assert claimed.decode() == process_job_id(first)
    # A worker took it and died: arq's lock on it stays until it runs out, then the job runs again.
    await redis.psetex(in_progress_key_prefix + claimed.decode(), 300, b"1")
    assert await admit(settings) == []  # the second waits: the first still holds the slot

    await run_burst(with_settings(settings, worker_concurrency=4))

    ran = await finished_images(redis, [first, second])
    assert [image.id for image in ran] == [first, second]
    assert ran[1].started_at is not None and ran[0].completed_at is not None
    assert ran[1].started_at >= ran[0].completed_at
    assert await redis.scard(admitted_jobs_key(settings.queue_name, account.id)) == 0


async def test_deleting_an_image_waiting_its_turn_lets_the_next_ones_run(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    await give_plan(redis, account, max_processing=1, share=4)
    deleted, waiting, last = await upload(client, account, 3)
    assert await admit(settings) == [process_job_id(deleted).encode()]
    response = await client.delete(f"/v1/images/{deleted}", headers=account.headers)
    assert response.status_code == 204, response.text

    await run_burst(settings)

    assert len(await finished_images(redis, [waiting, last])) == 2
    assert (await client.get(f"/v1/images/{deleted}", headers=account.headers)).status_code == 404


async def test_a_slot_held_by_a_job_arq_gave_up_on_is_reclaimed(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    """A job that ended without giving its slot back (arq's own time limit cancelled it) leaves arq's
    queue; a later poll reclaims its slot."""
    await give_plan(redis, account, max_processing=1, share=4)
    abandoned, waiting = await upload(client, account, 2)
    assert await admit(settings) == [process_job_id(abandoned).encode()]
    await redis.zrem(settings.queue_name, process_job_id(abandoned))  # as arq does when it gives up
    await redis.delete(f"{settings.queue_name}:fair:reclaimed")  # the next poll's turn to look

    assert await admit(settings) == [process_job_id(waiting).encode()]


async def test_metrics_count_images_waiting_their_turn(
    client: httpx.AsyncClient, account: Partner, redis: Redis
) -> None:
    await give_plan(redis, account, max_processing=1, share=4)
    await upload(client, account, 3)

    metrics = (await client.get("/metrics")).text

    assert re.search(r"^darkroom_queue_jobs 3(\.0)?$", metrics, re.MULTILINE), metrics


async def test_without_fair_scheduling_jobs_start_in_the_order_they_came(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    other = await make_account(redis, "other")
    await give_plan(redis, account, max_processing=1, share=4)
    backlog = await upload(client, account, 5)
    (single,) = await upload(client, other)

    await run_burst(with_settings(settings, worker_concurrency=1, fair_scheduling=False))

    order = [image.id for image in await finished_images(redis, [*backlog, single])]
    assert order == [*backlog, single]


async def test_workers_polling_together_are_each_handed_a_job_of_their_own(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    images = await upload(client, account, 2)

    handed = await asyncio.gather(admit(settings), admit(settings))

    expected = sorted(process_job_id(image_id).encode() for image_id in images)
    assert sorted(job for jobs in handed for job in jobs) == expected


async def test_lowering_max_processing_lets_the_admitted_images_finish_then_holds_to_it(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    await give_plan(redis, account, max_processing=3, share=4)
    images = await upload(client, account, 6)
    await admit(settings)  # the first three are in the queue
    await give_plan(redis, account, max_processing=1, share=4)

    await run_burst(with_settings(settings, worker_concurrency=4))

    ran = await finished_images(redis, images)
    for position in range(3, len(ran)):
        latest_end = max(image.completed_at or "" for image in ran[:position])
        assert (ran[position].started_at or "") >= latest_end, ran


async def test_a_single_photo_is_for_the_express_lane_and_a_backlog_for_the_bulk_lane(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    backlog, single = await backlog_then_another_accounts_photo(client, account, redis, 3)

    assert await take(settings, redis, Lane.EXPRESS) == [process_job_id(single).encode()]
    handed_to_bulk = [await take(settings, redis, Lane.BULK) for _ in backlog]

    assert handed_to_bulk == [[process_job_id(image_id).encode()] for image_id in backlog]


async def test_a_photo_is_for_the_bulk_lane_while_one_of_its_account_is_in_processing(
    client: httpx.AsyncClient, account: Partner, redis: Redis, settings: Settings
) -> None:
    (first,) = await upload(client, account)
    assert await take(settings, redis, Lane.EXPRESS) == [process_job_id(first).encode()]
    (second,) = await upload(client, account)

    assert process_job_id(second).encode() not in await admit(settings, Lane.EXPRESS)
    assert await admit(settings, Lane.BULK) == [process_job_id(second).encode()]


async def test_with_no_express_lane_polling_the_bulk_lane_takes_a_single_photo_too(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    (single,) = await upload(client, account)

    assert await admit(settings, Lane.BULK) == [process_job_id(single).encode()]
