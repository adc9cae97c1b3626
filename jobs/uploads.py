"""Direct uploads: an image created first (`POST /v1/uploads`), whose bytes the partner sends afterwards
to a signed URL, straight to us (or, with S3 storage, to the bucket).

Its record exists from the start, `queued` with `input` null and an `upload` state (jobs.records.
UploadState), counted in its batch, so a sealed batch waits for it. Whatever way the bytes arrive, one
step takes them on (`UploadDesk.land`): the same checks as a multipart upload, read from the stored
blob, then either the job is queued in the same transaction that records the input, or the image ends
`failed` with the check's code and its webhook. Every move of an upload is a compare-and-set on the
image record (Store.settle_upload), so of a PUT sent twice, or a PUT racing the expiry sweep, exactly
one wins and nothing is processed twice.

With S3 storage the bytes may also go by a presigned form POST straight to the bucket, under the
image's `original_key`: they land when the client follows the bucket's redirect to us, or at `POST
/v1/images {upload_id}`, or at the sweep, whichever looks first (`land_posted`).

Bytes never sent: the `sweep_uploads` cron fails the image `upload_expired` (image.failed, batch
counts) once its URL has expired and the longest body a request may take has passed, and deletes
anything a request left under the image. An upload that failed is kept listed in
`dr:uploads:expiring` until its batch has been checked for completion, so a process dying in between
leaves that check to the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis

from jobs import events
from jobs.batches import Batches
from jobs.inspection import ImageRefused, inspect_stored
from jobs.records import ImageError, ImageRecord, InputInfo, UploadStatus, original_key, utc_now
from jobs.settings import Settings
from jobs.storage import BlobStorage
from jobs.store import EXPIRING_UPLOADS_KEY, Store
from webhooks.messages import new_message, now_ms

log = logging.getLogger("darkroom.uploads")

SWEEP_UPLOADS = "sweep_uploads"
# Ids read per round trip by the sweep.
SWEEP_CHUNK = 200


def upload_id_for(image_id: str) -> str:
    """A direct upload's id names its image: `upl_X` is `img_X`'s upload, so its signed URL leads to
    the record without another key to keep in step."""
    return "upl_" + image_id.removeprefix("img_")


def image_id_for(upload_id: str) -> str:
    return "img_" + upload_id.removeprefix("upl_")


def received_original_key(image: ImageRecord) -> str:
    """Where bytes that arrived for `image`'s upload are kept: a name of their own, so that neither a
    second request nor a second POST of the form (good until it expires) can replace what was checked."""
    return f"{image.account_id}/{image.id}/original-{uuid.uuid4().hex}"


class UploadRefused(Exception):
    """The bytes failed the upload checks: the image ended failed with `refusal`'s code."""

    def __init__(self, refusal: ImageRefused) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class UploadNotPending(Exception):
    """The upload is no longer waiting for its bytes (they landed, or it expired, or was refused):
    `image` as it is now."""

    def __init__(self, image: ImageRecord) -> None:
        super().__init__(f"upload of {image.id} is {image.upload.status if image.upload else 'none'}")
        self.image = image


class UploadGone(LookupError):
    """The upload's image was deleted (by its owner, or its retention) while the request worked."""


@dataclass(frozen=True)
class UploadDesk:
    """Takes direct uploads' bytes on, starts them, and expires those never sent: in the web process
    (a PUT, `POST /v1/images {upload_id}`) and the worker (the sweep) alike."""

    settings: Settings
    queue: ArqRedis
    store: Store
    storage: BlobStorage

    async def land(self, image: ImageRecord, key: str, local: Path | None = None) -> ImageRecord:
        """The bytes of `image`'s upload are stored under `key` (and, when the caller still has them,
        in the file `local`, which is handed off once checked: a worker of this machine reads it rather
        than fetching the blob): check them as a multipart upload is checked, then record the input and
        queue the job (if the upload said how to process it), all in one transaction. Raises
        UploadRefused (the image is failed, the blob deleted), UploadNotPending (another request or the
        sweep moved it on first) or UploadGone (the blob is deleted with both)."""
        upload = image.upload
        if upload is None or upload.status != "pending":
            raise UploadNotPending(image)
        try:
            if local is None:
                async with self.storage.local_copy(key) as copy:
                    input_info = await self._inspect(copy, upload.filename)
            else:
                input_info = await self._inspect(local, upload.filename)
        except FileNotFoundError:
            # Deleted with its image (files go first) while the bytes were stored.
            raise UploadNotPending(await self._current(image)) from None
        except ImageRefused as refusal:
            await self.storage.delete(key)
            if await self.fail(image, ImageError(refusal.code, refusal.message), "refused") is None:
                raise UploadNotPending(await self._current(image)) from None
            raise UploadRefused(refusal) from None
        if local is not None:
            await self.storage.hand_off(local, key, input_info.bytes)
        starting = upload.starts == "on_upload"
        landed = image.evolve(
            input=input_info,
            original_key=key,
            upload=replace(upload, status="started" if starting else "received"),
            queued_at=utc_now() if starting else None,
        )
        if not await self.store.settle_upload(landed, image, None, self.settings.queue_name):
            await self.storage.delete(key)
            raise UploadNotPending(await self._current(image))
        return landed

    async def land_posted(self, image: ImageRecord) -> ImageRecord | None:
        """Land what a form POST put in the bucket under `image`'s original key, as `land` does, kept
        under a key of its own; None if nothing is there. S3 is asked to refuse a file over the declared
        size, but not every S3-compatible server enforces a form's policy: a larger one is refused here."""
        upload = image.upload
        if upload is None or upload.status != "pending":
            raise UploadNotPending(image)
        posted_key = image.original_key
        info = await self.storage.stat(posted_key)
        if info is None:
            return None
        if info.size > upload.size:
            refusal = ImageRefused(
                413,
                "upload_too_large",
                f"the upload declared {upload.size} bytes; {info.size} were sent, and none was kept",
            )
            await self.storage.delete(posted_key)
            if await self.fail(image, ImageError(refusal.code, refusal.message), "refused") is None:
                raise UploadNotPending(await self._current(image))
            raise UploadRefused(refusal)
        key = received_original_key(image)
        staged = self.storage.new_staging_path()
        try:
            async with self.storage.local_copy(posted_key) as posted:
                await asyncio.to_thread(os.link, posted, staged)
                await self.storage.put_file(staged, key)
                landed = await self.land(image, key, local=posted)
        except UploadRefused:
            await self.storage.delete(posted_key)
            raise
        except FileNotFoundError:
            # Deleted with its image, or landed and removed by a request that looked first.
            raise UploadNotPending(await self._current(image)) from None
        finally:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
        await self.storage.delete(posted_key)
        return landed

    async def discard_late_post(self, image: ImageRecord) -> None:
        """Remove what a form POST put in the bucket after `image`'s upload moved on: the form is good
        until it expires and may be posted again, but only bytes that were pending land; what came later
        would never be read, and would stay until the image goes."""
        await self.storage.delete(original_key(image.account_id, image.id))

    async def _inspect(self, path: Path, filename: str | None) -> InputInfo:
        return await asyncio.to_thread(inspect_stored, path, filename, self.settings)

    async def start(self, image: ImageRecord, changes: dict[str, Any]) -> ImageRecord:
        """Hand a received upload to processing with `changes` (operations, callback_url, metadata)
        applied. Raises UploadNotPending (as it is now) unless it is `received`, UploadGone once deleted."""
        upload = image.upload
        if upload is None or upload.status != "received":
            raise UploadNotPending(image)
        started = image.evolve(**changes, upload=replace(upload, status="started"), queued_at=utc_now())
        if not await self.store.settle_upload(started, image, None, self.settings.queue_name):
            raise UploadNotPending(await self._current(image))
        return started

    async def fail(self, image: ImageRecord, error: ImageError, status: UploadStatus) -> ImageRecord | None:
        """End a pending upload failed with `error`, announced as image.failed, and complete its batch if it
        was the last one; None if another request moved the upload on first."""
        to = await events.destinations(self.store, image.account_id, "image.failed", image.callback_url)
        assert image.upload is not None
        failed = image.evolve(
            status="failed",
            error=error,
            completed_at=utc_now(),
            upload=replace(image.upload, status=status),
            **events.image_announcement(to),
        )
        message = None
        if failed.event_message_id is not None:
            data = failed.resource(self.settings.public_url)
            message = new_message(
                failed.event_message_id,
                failed.account_id,
                "image.failed",
                data,
                to,
                failed.resource_ids,
                request_id=failed.request_id,
            )
        if not await self.store.settle_upload(failed, image, message, self.settings.queue_name):
            return None
        await self._settle_failed(failed)
        return failed

    async def _settle_failed(self, image: ImageRecord) -> None:
        """After a failed upload is stored: complete its batch if it was the last, then stop listing it
        (in that order, so the sweep redoes the check for a process that died in between)."""
        if image.batch_id is not None:
            await Batches(self.store, self.queue, self.settings).complete_if_done(image.batch_id)
        await self.store.redis.zrem(EXPIRING_UPLOADS_KEY, image.id)

    async def _current(self, image: ImageRecord) -> ImageRecord:
        current = await self.store.get_image(image.id)
        if current is None:
            raise UploadGone(image.id)
        return current

    async def sweep(self, moment_ms: int | None = None) -> int:
        """The core of the `sweep_uploads` cron job: fail every upload whose bytes have not landed by
        its URL's expiry, plus the longest a request body may take (a PUT started just in time is
        allowed to finish). How many it failed."""
        moment = now_ms() if moment_ms is None else moment_ms
        cutoff = moment - int(self.settings.body_timeout * 1000)
        expired = 0
        while due := await self.store.redis.zrangebyscore(
            EXPIRING_UPLOADS_KEY, "-inf", cutoff, start=0, num=SWEEP_CHUNK
        ):
            for raw_id in due:
                expired += await self._expire(raw_id.decode())
        return expired

    async def _expire(self, image_id: str) -> bool:
        while (image := await self.store.get_image(image_id)) is not None:
            if image.upload is None or image.upload.status != "pending":
                # Failed by a request, or by a sweep that stopped before its batch check: finish that.
                await self._settle_failed(image)
                return False
            try:
                # Sent in time by a form POST whose client never followed the bucket's redirect.
                if await self.land_posted(image) is not None:
                    return False
            except UploadRefused:
                return False
            except (UploadNotPending, UploadGone):
                continue
            error = ImageError(
                "upload_expired",
                f"no bytes were sent to the upload URL before it expired ({image.upload.expires_at})",
            )
            if await self.fail(image, error, "expired") is not None:
                # What a request cut off mid-way left behind; the image has no original to keep.
                await self.storage.delete_tree(f"{image.account_id}/{image.id}")
                log.info("upload of %s expired unsent", image.id)
                return True
        await self.store.redis.zrem(EXPIRING_UPLOADS_KEY, image_id)
        return False
