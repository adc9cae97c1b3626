"""Batches: images that complete together, exactly once, and the ZIP of their results.

A batch is the Redis hash `dr:batch:{id}` (jobs.records.BatchRecord): its fixed fields, its images'
counters, `sealed_at`, `completed_at` and the archive's state, each a field of its own. The counters move
in the very transactions that add, start, finish or delete its images (jobs.store.stage_image_change), so
they are always exact. `dr:batch:{id}:images` indexes its images, `dr:batch:{id}:failures` describes each
failed one, `dr:account:{id}:batches` indexes the account's batches.

Completion: a batch completes when it is sealed and none of its images is queued or processing. Whoever
may have made that true — the worker that finished an image, the request that sealed the batch or deleted
an image — calls `complete_if_done` after its own transaction, so the last of them always sees it. That
check is a transaction watching the batch: of several workers finishing the last images at the same
moment, exactly one commits the completion with its batch.completed message; the others find it done. A
worker that dies between its image's transaction and the check leaves its arq job unfinished, and the
re-run, finding the image finished, makes the check again.

The archive: the completion writes its `pending` state and lists the batch in `dr:archives:pending` in the
same transaction, then enqueues the build (jobs/archive.py). The periodic sweep enqueues again any archive
still pending after a minute, so an enqueue lost to a crash only comes late; the job id makes duplicates
harmless. A ready archive is listed in `dr:archives:expiring` until the sweep deletes it.

Retention: a batch is listed in `dr:batches:expiring` from its creation, scored by the later of its
creation plus DARKROOM_IMAGE_RETENTION and its images' expiries; once that passes and its last image has
expired, the retention sweep (jobs/retention.py) deletes it, its indexes and its archive.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from arq.connections import ArqRedis
from redis.exceptions import WatchError

from jobs import events
from jobs.ids import new_id
from jobs.queue import enqueue
from jobs.records import ArchiveState, BatchRecord, ImageRecord, epoch_ms, utc_now
from jobs.settings import Settings
from jobs.store import (
    EXPIRING_BATCHES_KEY,
    Store,
    batch_failures_key,
    batch_images_key,
    batch_key,
    image_key,
)
from webhooks.changes import stage_change
from webhooks.messages import new_message, now_ms

BUILD_ARCHIVE = "build_archive"
SWEEP_ARCHIVES = "sweep_archives"
# Batch ids scored by when their archive was asked for, until it is ready or failed (epoch ms).
PENDING_ARCHIVES_KEY = "dr:archives:pending"
# Batch ids scored by when their ready archive expires (epoch ms).
EXPIRING_ARCHIVES_KEY = "dr:archives:expiring"
MAX_IMAGES_PER_BATCH = 10_000
# Records read per round trip when a batch's images are listed.
READ_CHUNK = 500

# What a transaction writes, given its pipeline in MULTI mode.
Writes = Callable[[Any], None]
Outcome = TypeVar("Outcome")


def account_batches_key(account_id: str) -> str:
    return f"dr:account:{account_id}:batches"


def archive_job_id(batch_id: str) -> str:
    return f"archive:{batch_id}"


class BatchClosed(Exception):
    """The batch is sealed (or completed): it takes no more images and cannot be sealed again."""

    def __init__(self, batch: BatchRecord) -> None:
        super().__init__(f"batch {batch.id} is {batch.status}")
        self.batch = batch


class BatchEmpty(Exception):
    """A batch without images cannot be sealed: it would complete at once, with nothing in it."""


class BatchFull(Exception):
    """Adding these images would take the batch over MAX_IMAGES_PER_BATCH."""


class BatchMissing(LookupError):
    """No batch has this id (any more: the retention sweep deletes batches whose images have all gone)."""


class Batches:
    def __init__(self, store: Store, queue: ArqRedis, settings: Settings) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings

    async def create(self, batch: BatchRecord) -> None:
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch.id), "record", batch.fixed_json())
            pipe.zadd(account_batches_key(batch.account_id), {batch.id: 0})
            if batch.expires_at is not None:
                pipe.hset(batch_key(batch.id), "expires_at", batch.expires_at)
                pipe.zadd(EXPIRING_BATCHES_KEY, {batch.id: epoch_ms(batch.expires_at)})
            stage_change(pipe, batch.account_id, "batch", batch.id)
            await pipe.execute()

    async def get(self, batch_id: str) -> BatchRecord | None:
        return BatchRecord.from_hash(await self.store.redis.hgetall(batch_key(batch_id)))  # type: ignore[misc]

    async def get_for_account(self, account_id: str, batch_id: str) -> BatchRecord | None:
        """Another account's batch is indistinguishable from a missing one."""
        batch = await self.get(batch_id)
        return batch if batch is not None and batch.account_id == account_id else None

    async def list_for_account(
        self, account_id: str, *, limit: int, before: str | None = None, status: str | None = None
    ) -> list[BatchRecord]:
        """Newest first; `before` is the id of the last batch of the previous page."""
        found: list[BatchRecord] = []
        maximum = f"({before}" if before else "+"
        index = account_batches_key(account_id)
        while len(found) < limit:
            ids = await self.store.redis.zrevrangebylex(index, maximum, "-", start=0, num=max(limit * 2, 50))
            if not ids:
                break
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hgetall(batch_key(batch_id.decode()))
                raws = await pipe.execute()
            for raw in raws:
                batch = BatchRecord.from_hash(raw)
                if batch is not None and (status is None or batch.status == status):
                    found.append(batch)
            maximum = f"({ids[-1].decode()}"
        return found[:limit]

    async def add_images(self, batch_id: str, images: Sequence[ImageRecord]) -> None:
        """Save new images into an open batch, all in one transaction with the check that it is open, so
        an image can never slip in after the seal. The batch is kept at least as long as they are."""
        latest = max((image.expires_at for image in images if image.expires_at is not None), default=None)

        async def plan(batch: BatchRecord | None) -> tuple[Writes, None]:
            if batch is None:
                raise BatchMissing(batch_id)
            if batch.sealed_at is not None:
                raise BatchClosed(batch)
            if batch.counts.total + len(images) > MAX_IMAGES_PER_BATCH:
                raise BatchFull(batch_id)

            def writes(pipe: Any) -> None:
                for image in images:
                    self.store.stage_new_image(pipe, image, self.settings.queue_name)
                if latest is not None and (batch.expires_at is None or latest > batch.expires_at):
                    pipe.hset(batch_key(batch_id), "expires_at", latest)
                    pipe.zadd(EXPIRING_BATCHES_KEY, {batch_id: epoch_ms(latest)})

            return writes, None

        await self._transaction(batch_id, plan)

    async def seal(self, batch_id: str) -> BatchRecord:
        """No more images; the batch completes now if every image is already finished."""

        async def plan(batch: BatchRecord | None) -> tuple[Writes, None]:
            if batch is None:
                raise BatchMissing(batch_id)
            if batch.sealed_at is not None:
                raise BatchClosed(batch)
            if batch.counts.total == 0:
                raise BatchEmpty(batch_id)
            moment = utc_now()
            return lambda pipe: pipe.hset(batch_key(batch_id), "sealed_at", moment), None

        await self._transaction(batch_id, plan)
        await self.complete_if_done(batch_id)
        sealed = await self.get(batch_id)
        assert sealed is not None, "a sealed batch has images, so the retention sweep keeps it"
        return sealed

    async def complete_if_done(self, batch_id: str) -> BatchRecord | None:
        """Complete the batch if it is sealed and none of its images is unfinished, committing
        batch.completed with it. Returns the batch if this call completed it: of any number of callers
        racing, exactly one does."""
        seen: BatchRecord | None = None

        async def plan(batch: BatchRecord | None) -> tuple[Writes, BatchRecord] | None:
            nonlocal seen
            seen = batch
            if batch is None or batch.sealed_at is None or batch.counts.unfinished or batch.completed_at:
                return None
            moment = utc_now()
            archive = ArchiveState() if batch.archive is not None else None
            to = await events.destinations(
                self.store, batch.account_id, "batch.completed", batch.callback_url
            )
            completed = replace(
                batch,
                completed_at=moment,
                archive_state=archive,
                completion_message_id=new_id("msg") if to else None,
            )
            message = None
            if completed.completion_message_id is not None:
                data = {
                    **completed.resource(self.settings.public_url, moment),
                    "failures": await self.failures(batch_id),
                }
                message = new_message(
                    completed.completion_message_id,
                    batch.account_id,
                    "batch.completed",
                    data,
                    to,
                    [batch_id],
                    request_id=batch.request_id,
                )

            def writes(pipe: Any) -> None:
                fields = {"completed_at": moment}
                if message is not None:
                    fields["completion_message_id"] = message.id
                    self.store.messages.stage_new(pipe, message)
                if archive is not None:
                    fields["archive"] = archive.to_json()
                    pipe.zadd(PENDING_ARCHIVES_KEY, {batch_id: now_ms()})
                pipe.hset(batch_key(batch_id), mapping=fields)

            return writes, completed

        completed = await self._transaction(batch_id, plan)
        # Ours, or (on a re-run after a crash) one completed before whose build may not have been queued.
        settled = completed or seen
        if (
            settled is not None
            and settled.archive_state is not None
            and settled.archive_state.status == "pending"
        ):
            await self.enqueue_archive(batch_id)
        return completed

    async def failures(self, batch_id: str) -> list[dict[str, Any]]:
        """Each failed image: `{image_id, filename, error: {code, message}}`, in upload order."""
        raw: dict[bytes, bytes] = await self.store.redis.hgetall(batch_failures_key(batch_id))  # type: ignore[misc]
        return [json.loads(raw[image_id]) for image_id in sorted(raw)]

    async def images(self, batch_id: str) -> list[ImageRecord]:
        """Every image of the batch, in upload order."""
        ids = [each.decode() for each in await self.store.redis.zrange(batch_images_key(batch_id), 0, -1)]
        found: list[ImageRecord] = []
        for start in range(0, len(ids), READ_CHUNK):
            keys = [image_key(image_id) for image_id in ids[start : start + READ_CHUNK]]
            found.extend(ImageRecord.from_json(raw) for raw in await self.store.redis.mget(keys) if raw)
        return found

    async def enqueue_archive(self, batch_id: str) -> None:
        await enqueue(
            self.queue, self.settings.queue_name, BUILD_ARCHIVE, batch_id, job_id=archive_job_id(batch_id)
        )

    async def start_archive(self, batch_id: str) -> BatchRecord | None:
        """Mark the archive building; the batch, or None when there is none left to build."""

        async def plan(batch: BatchRecord | None) -> tuple[Writes, BatchRecord] | None:
            state = None if batch is None else batch.archive_state
            if batch is None or state is None or state.status not in ("pending", "building"):
                return None
            building = replace(state, status="building")

            def writes(pipe: Any) -> None:
                pipe.hset(batch_key(batch_id), "archive", building.to_json())

            return writes, replace(batch, archive_state=building)

        return await self._transaction(batch_id, plan)

    async def finish_archive(self, batch_id: str, outcome: ArchiveState) -> BatchRecord | None:
        """Record the archive `ready` or `failed` with its announcement, in one transaction; the batch as
        recorded, or None if an overlapping run of the build recorded its outcome first."""
        event_type = "batch.archive.ready" if outcome.status == "ready" else "batch.archive.failed"

        async def plan(batch: BatchRecord | None) -> tuple[Writes, BatchRecord] | None:
            state = None if batch is None else batch.archive_state
            if batch is None or state is None or state.status not in ("pending", "building"):
                return None
            to = await events.destinations(self.store, batch.account_id, event_type, batch.callback_url)
            final = replace(outcome, message_id=new_id("msg") if to else None)
            finished = replace(batch, archive_state=final)
            message = None
            if final.message_id is not None:
                data = finished.resource(self.settings.public_url)
                message = new_message(
                    final.message_id,
                    batch.account_id,
                    event_type,
                    data,
                    to,
                    [batch_id],
                    request_id=batch.request_id,
                )

            def writes(pipe: Any) -> None:
                pipe.hset(batch_key(batch_id), "archive", final.to_json())
                pipe.zrem(PENDING_ARCHIVES_KEY, batch_id)
                if final.expires_at is not None:
                    pipe.zadd(EXPIRING_ARCHIVES_KEY, {batch_id: epoch_ms(final.expires_at)})
                if message is not None:
                    self.store.messages.stage_new(pipe, message)

            return writes, finished

        return await self._transaction(batch_id, plan)

    async def expire_archive(self, batch_id: str) -> None:
        """Mark a ready archive past its expiry as expired (its file is deleted first) and forget it."""

        async def plan(batch: BatchRecord | None) -> tuple[Writes, None]:
            state = None if batch is None else batch.archive_state
            expired = None if state is None else state.seen_at(utc_now())

            def writes(pipe: Any) -> None:
                if state is not None and expired is not None and expired.status != state.status:
                    pipe.hset(batch_key(batch_id), "archive", expired.to_json())
                pipe.zrem(EXPIRING_ARCHIVES_KEY, batch_id)

            return writes, None

        await self._transaction(batch_id, plan)

    async def forget(self, batch_id: str) -> bool | None:
        """Delete the batch, its indexes and its archive's listings (the caller deleted its files first):
        True if this call deleted it, False if it was gone already, None if it has images (kept)."""

        async def plan(batch: BatchRecord | None) -> tuple[Writes, bool] | None:
            if batch is not None and batch.counts.total:
                return None

            def writes(pipe: Any) -> None:
                pipe.delete(batch_key(batch_id), batch_images_key(batch_id), batch_failures_key(batch_id))
                if batch is not None:
                    pipe.zrem(account_batches_key(batch.account_id), batch_id)
                for listing in (PENDING_ARCHIVES_KEY, EXPIRING_ARCHIVES_KEY, EXPIRING_BATCHES_KEY):
                    pipe.zrem(listing, batch_id)

            return writes, batch is not None

        return await self._transaction(batch_id, plan)

    async def due_expiries(self, moment_ms: int) -> list[str]:
        ids = await self.store.redis.zrangebyscore(EXPIRING_ARCHIVES_KEY, "-inf", moment_ms)
        return [each.decode() for each in ids]

    async def overdue_archives(self, asked_before_ms: int) -> list[str]:
        """Archives asked for before then and still not ready or failed."""
        ids = await self.store.redis.zrangebyscore(PENDING_ARCHIVES_KEY, "-inf", asked_before_ms)
        return [each.decode() for each in ids]

    async def _transaction(
        self,
        batch_id: str,
        plan: Callable[[BatchRecord | None], Awaitable[tuple[Writes, Outcome] | None]],
    ) -> Outcome | None:
        """Commit the writes `plan` decides on from the batch as stored, atomically with what it read: if
        the batch changed meanwhile, plan again on its new state. Returns the outcome of the plan that
        committed; None when the last plan decided to write nothing. `plan` may raise to refuse. The
        change is announced on the account's channel as it commits."""
        key = batch_key(batch_id)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    batch = BatchRecord.from_hash(await pipe.hgetall(key))  # type: ignore[misc]
                    decided = await plan(batch)
                    if decided is None:
                        return None
                    writes, outcome = decided
                    pipe.multi()  # type: ignore[no-untyped-call]
                    writes(pipe)
                    if batch is not None:
                        stage_change(pipe, batch.account_id, "batch", batch_id)
                    await pipe.execute()
                    return outcome
                except WatchError:
                    continue
