"""Retention: images, batches and staging leftovers are deleted once they have been kept long enough.

An image expires DARKROOM_IMAGE_RETENTION after its upload (or sooner, if the upload asked for a shorter
`retention`): from then on the API answers 404 for it, as for a deleted image, and the sweep — an arq cron
job every few minutes — deletes its files (original, output, variants), its record and its index entries,
moving its batch's counters as a DELETE would. A batch goes once its last image has gone and its own
expiry (creation plus DARKROOM_IMAGE_RETENTION, or its latest image's expiry) has passed, with its archive.

The sweep reads what is due from two sorted sets scored by expiry, a chunk at a time, and every step is
safe to repeat: several workers may sweep at once, and a sweep killed midway leaves the rest listed for
the next one. Files go before the record that lists them, so nothing on disk is ever left unlisted.
Webhook messages are not images': they keep DARKROOM_WEBHOOK_RETENTION.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from jobs.batches import Batches
from jobs.deps import WorkerDeps
from jobs.settings import Settings
from jobs.store import EXPIRING_BATCHES_KEY, EXPIRING_IMAGES_KEY
from webhooks.messages import now_ms

SWEEP_EXPIRED = "sweep_expired"
# Ids read per round trip: each chunk's work is bounded, however many are due.
SWEEP_CHUNK = 200
# The shortest `retention` an upload may ask for.
MIN_IMAGE_RETENTION_SECONDS = 3600


@dataclass(frozen=True)
class SweepOutcome:
    images: int
    batches: int
    staging_files: int
    # Multipart uploads to S3 that killed processes left unfinished (their parts cost storage).
    stale_uploads: int = 0


def staging_max_age(settings: Settings) -> float:
    """How long a staging file may sit untouched before it counts as left behind: twice the longest any
    job may take to write one, so a render or build under way never loses its file."""
    return 2 * max(settings.job_timeout, settings.archive_timeout)


async def sweep_expired(deps: WorkerDeps, moment_ms: int | None = None) -> SweepOutcome:
    """The core of the `sweep_expired` cron job: everything due at `moment_ms` (now by default)."""
    moment = now_ms() if moment_ms is None else moment_ms
    batches = Batches(deps.store, deps.redis, deps.settings)
    images = 0
    while due := await _due(deps, EXPIRING_IMAGES_KEY, moment, skip=0):
        for image_id in due:
            await _expire_image(deps, batches, image_id)
        images += len(due)
    forgotten = kept = 0
    while due := await _due(deps, EXPIRING_BATCHES_KEY, moment, skip=kept):
        for batch_id in due:
            deleted = await _expire_batch(deps, batches, batch_id)
            kept += deleted is None
            forgotten += deleted is True
    cutoff = time.time() - staging_max_age(deps.settings)
    staging_files = await asyncio.to_thread(deps.storage.remove_staged_before, cutoff)
    stale_uploads = await deps.storage.abort_stale_uploads(cutoff)
    return SweepOutcome(images, forgotten, staging_files, stale_uploads)


async def _due(deps: WorkerDeps, listing: str, moment_ms: int, *, skip: int) -> list[str]:
    ids = await deps.redis.zrangebyscore(listing, "-inf", moment_ms, start=skip, num=SWEEP_CHUNK)
    return [each.decode() for each in ids]


async def _expire_image(deps: WorkerDeps, batches: Batches, image_id: str) -> None:
    image = await deps.store.get_image(image_id)
    if image is None:
        await deps.redis.zrem(EXPIRING_IMAGES_KEY, image_id)
        return
    folder = f"{image.account_id}/{image.id}"
    await deps.storage.delete_tree(folder)
    await deps.store.delete_image(image)
    # Again: a render or a variant may have committed a file in between (after the record is gone, they
    # remove their own).
    await deps.storage.delete_tree(folder)
    if image.batch_id is not None:
        # It may have been the last unfinished image of a sealed batch.
        await batches.complete_if_done(image.batch_id)


async def _expire_batch(deps: WorkerDeps, batches: Batches, batch_id: str) -> bool | None:
    """Forget a due batch whose images have all gone: as Batches.forget (None: kept for a later sweep)."""
    batch = await batches.get(batch_id)
    if batch is not None:
        if batch.counts.total:
            return None
        await deps.storage.delete_tree(f"{batch.account_id}/batches/{batch.id}")
    return await batches.forget(batch_id)
