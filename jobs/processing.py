"""Process one uploaded image: the core behind the `process_image` arq task.

arq runs a job at least once, so every step here may run again after a crash: the output blob is
overwritten in place, the terminal state and its webhook message are committed together, and a re-run
that finds the image already finished only makes sure the webhook is on its way. A full storage is not
the image's fault: the job waits for room (see `_wait_for_storage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from pathlib import Path

from jobs import events
from jobs.batches import Batches
from jobs.deps import WorkerDeps
from jobs.inspection import ImageRefused, inspect_image
from jobs.operations import parse_operations
from jobs.ops.base import ProcessingError
from jobs.pipeline import KillSwitch, RenderedImage, Source, render
from jobs.records import (
    ImageError,
    ImageRecord,
    InputInfo,
    OutputInfo,
    source_filename,
    utc_now,
)
from jobs.settings import Settings
from jobs.storage import BlobMissing, StorageFull, StorageUnavailable, is_full
from webhooks.log_context import bind
from webhooks.messages import new_message

log = logging.getLogger("darkroom.processing")

# How often a running render checks that its image was not deleted meanwhile (then it stops).
DELETION_CHECK_SECONDS = 1.0


async def process_image(deps: WorkerDeps, image_id: str, job_try: int) -> None:
    image = await deps.store.get_image(image_id)
    if image is None:
        return  # deleted by its owner before we got to it
    with bind(image_id=image.id, account_id=image.account_id, request_id=image.request_id):
        await _process(deps, image, job_try)


async def _process(deps: WorkerDeps, image: ImageRecord, job_try: int) -> None:
    if image.is_terminal:
        await _settle(deps, image)
        return
    if image.input is None and image.source_url is None:
        log.error("%s has a job but no bytes yet; left for its upload to start it", image.id)
        return
    if await deps.crashed_too_often(image.id, job_try):
        await _finish(
            deps,
            image,
            error=ImageError(
                "worker_crashed",
                f"processing stopped the worker {job_try - 1} times; the image was not processed",
            ),
        )
        return
    stored, image = image, image.evolve(status="processing", attempts=job_try, started_at=utc_now())
    if not await deps.store.update_image(image, previous=stored):
        return
    log.info(
        "processing %s (attempt %d)",
        image.id,
        job_try,
        extra={"attempt": job_try, "queue_wait_ms": image.queue_wait_ms},
    )
    # One time limit for the whole job: fetching a source_url, then rendering.
    deadline = asyncio.get_running_loop().time() + deps.settings.job_timeout
    try:
        original = image.input
        if original is None:
            image, original = await _fetch_source(deps, image, deadline)
        render_started = time.perf_counter()
        rendered = await _render_with_deadline(deps, image, original, deadline)
        render_ms = (time.perf_counter() - render_started) * 1000
    except StorageFull:
        await _wait_for_storage(deps, image)
        return
    except StorageUnavailable:
        await _wait_for_storage(deps, image, unavailable=True)
        return
    except BlobMissing:
        await _finish(deps, image, error=ImageError("original_missing", "the uploaded file is gone"))
        return
    except ImageDeleted:
        log.info("stopped processing %s: its owner deleted it", image.id)
        return
    except ProcessingError as exc:
        await _finish(deps, image, error=ImageError(exc.code, exc.message))
        return
    except Exception as exc:
        # No room for the fetched original or the result (StorageFull, or the OSError of a move).
        if is_full(exc):
            await _wait_for_storage(deps, image)
            return
        log.exception("processing %s failed unexpectedly", image.id)
        await _finish(
            deps, image, error=ImageError("internal_error", "an unexpected error stopped processing")
        )
        return
    output_key = f"{image.account_id}/{image.id}/output{rendered.path.suffix}"
    try:
        await deps.storage.put_file(rendered.path, output_key)
    except (OSError, StorageUnavailable) as exc:
        await asyncio.to_thread(rendered.path.unlink, missing_ok=True)
        if isinstance(exc, OSError) and not is_full(exc):
            raise
        await _wait_for_storage(deps, image, unavailable=isinstance(exc, StorageUnavailable))
        return
    output = OutputInfo(rendered.format, rendered.width, rendered.height, rendered.bytes, output_key)
    await _finish(deps, image, output=output, render_ms=render_ms)


async def _wait_for_storage(deps: WorkerDeps, image: ImageRecord, *, unavailable: bool = False) -> None:
    """No room to write the result, or (`unavailable`) the storage did not answer: the image goes back
    to `queued` and its job runs again later (WaitForStorage), until the storage is back; only after
    `storage_full_give_up` of waiting does it fail, as `storage_full` or `storage_unavailable` (ours,
    not the partner's file)."""
    wait = await deps.wait_for_storage(image.id)
    if wait is None:
        hours = deps.settings.storage_full_give_up / 3600
        code, state = ("storage_unavailable", "unreachable") if unavailable else ("storage_full", "full")
        message = f"the storage stayed {state} for {hours:g} h; upload the image again"
        await _finish(deps, image, error=ImageError(code, message))
        return
    log.warning(
        "storage %s for the result of %s; trying again later (wait %d)",
        "unreachable" if unavailable else "full",
        image.id,
        wait.waits,
    )
    if await deps.store.update_image(image.evolve(status="queued"), previous=image):
        raise wait


class ImageDeleted(Exception):
    """The image's owner deleted it while it was rendered: there is nobody to render it for."""


async def _fetch_source(
    deps: WorkerDeps, image: ImageRecord, deadline: float
) -> tuple[ImageRecord, InputInfo]:
    """Fetch the image's `source_url`, check it as an upload is checked, store it as the original and
    record its `input`. A re-run fetches it again (its original is overwritten)."""
    assert image.source_url is not None, "process_image leaves images with neither to their upload"
    staged, sink = deps.storage.open_staging()
    try:
        with sink:
            fetched = await deps.sources.fetch(image.source_url, sink, deadline)
        info = await asyncio.to_thread(
            inspect_image,
            staged,
            fetched.head,
            fetched.size,
            source_filename(image.source_url),
            deps.settings,
        )
        # Rendered next: from this file, not fetched back from the bucket.
        await deps.storage.put_file(staged, image.original_key, hand_off=True)
    except ImageRefused as refused:
        raise ProcessingError(refused.code, refused.message) from None
    finally:
        staged.unlink(missing_ok=True)
    fetched_image = image.evolve(input=info)
    if not await deps.store.update_image(fetched_image, previous=image):
        # Deleted meanwhile (its original must not outlive it), or finished by an overlapping run.
        if not await deps.store.image_exists(image.id):
            await deps.storage.delete_tree(f"{image.account_id}/{image.id}")
        raise ImageDeleted(image.id)
    return fetched_image, info


async def _render_with_deadline(
    deps: WorkerDeps, image: ImageRecord, original: InputInfo, deadline: float
) -> RenderedImage:
    """The render, stopped at the job's time limit or when the image is deleted meanwhile."""
    async with deps.storage.source(image.original_key) as source:
        return await _render_source_with_deadline(deps, image, original, source, deadline)


async def _render_source_with_deadline(
    deps: WorkerDeps, image: ImageRecord, original: InputInfo, source: Source, deadline: float
) -> RenderedImage:
    chain = parse_operations(image.operations)
    stem = deps.storage.new_staging_path()
    kill_switch = KillSwitch()
    settings = deps.settings
    loop = asyncio.get_running_loop()
    slots = deps.render_slots
    try:
        async with asyncio.timeout_at(deadline):
            await slots.acquire()
    except TimeoutError:
        raise _timed_out(settings) from None
    rendering = asyncio.ensure_future(
        asyncio.to_thread(
            functools.partial(
                render,
                source,
                stem,
                chain,
                original.format,
                kill_switch,
                max_pixels=settings.max_pixels,
                max_memory=settings.job_memory_bytes,
            )
        )
    )
    # Held until the thread ends, even when the job no longer waits for it (see _abandon).
    rendering.add_done_callback(lambda _: slots.release())
    try:
        while not rendering.done():
            left = deadline - loop.time()
            if left <= 0:
                raise _timed_out(settings)
            await asyncio.wait({rendering}, timeout=min(left, DELETION_CHECK_SECONDS))
            if not rendering.done() and not await deps.store.image_exists(image.id):
                raise ImageDeleted(image.id)
        return rendering.result()
    except BaseException:
        # Whatever ends the wait (the limit, a deletion, Redis failing, arq cancelling the job) must not
        # leave the render running on: a re-run would render the same image twice at once.
        if not rendering.done():
            _abandon(rendering, kill_switch, stem)
        raise


def _timed_out(settings: Settings) -> ProcessingError:
    return ProcessingError("timeout", f"processing took longer than {settings.job_timeout:g} s")


def _abandon(rendering: asyncio.Future[RenderedImage], kill_switch: KillSwitch, stem: Path) -> None:
    kill_switch.fire()
    # The thread stops at libvips' next kill check; tidy its file then, without waiting for it here.
    rendering.add_done_callback(lambda finished: _discard(finished, stem))


def _discard(finished: asyncio.Future[RenderedImage], stem: Path) -> None:
    if not finished.cancelled() and finished.exception() is None:
        with contextlib.suppress(OSError):
            finished.result().path.unlink()
    else:
        log.info("abandoned render of %s stopped", stem.name)


async def _finish(
    deps: WorkerDeps,
    image: ImageRecord,
    *,
    output: OutputInfo | None = None,
    error: ImageError | None = None,
    render_ms: float | None = None,
) -> None:
    event_type = "image.completed" if error is None else "image.failed"
    to = await events.destinations(deps.store, image.account_id, event_type, image.callback_url)
    final = image.evolve(
        status="completed" if error is None else "failed",
        output=output,
        error=error,
        completed_at=utc_now(),
        **events.image_announcement(to),
    )
    message = None
    if final.event_message_id:
        data = final.resource(deps.settings.public_url)
        message = new_message(
            final.event_message_id,
            final.account_id,
            event_type,
            data,
            to,
            final.resource_ids,
            request_id=final.request_id,
        )
    render_seconds = None if render_ms is None else render_ms / 1000
    stored = await deps.store.finish_image(final, message, previous=image, render_seconds=render_seconds)
    if stored is None:
        # Deleted by its owner while we worked: the output just written must not outlive the record.
        await deps.storage.delete_tree(f"{image.account_id}/{image.id}")
        log.info("%s was deleted while it was processed", image.id)
        return
    log.info(
        "%s %s",
        image.id,
        stored.status,
        extra={
            "outcome": stored.status,
            "error_code": None if stored.error is None else stored.error.code,
            "render_ms": None if render_ms is None else round(render_ms, 3),
            "msg_id": stored.event_message_id,
        },
    )
    await _settle(deps, stored)


async def _settle(deps: WorkerDeps, image: ImageRecord) -> None:
    """After the terminal state is stored: hurry its webhook, and complete the image's batch if it was
    the last one (a re-run checks again, in case the worker died in between)."""
    _announce(deps, image)
    if image.batch_id is not None:
        completed = await Batches(deps.store, deps.redis, deps.settings).complete_if_done(image.batch_id)
        if completed is not None and completed.completion_message_id is not None:
            deps.dispatcher.nudge()


def _announce(deps: WorkerDeps, image: ImageRecord) -> None:
    """The message was made due in the transaction that finished the image; this only hurries it."""
    if image.event_message_id:
        deps.dispatcher.nudge()
