"""`GET /v1/images/{id}/output`: the stored result, or a variant of it rendered on first request.

`?format=&quality=&width=&height=&preview=` asks for a variant. Each one is rendered once from the stored
result and kept next to it in storage (so deleting the image deletes its variants); later requests, from
any web process, are served from that file. Results never change once completed, so every response has
a strong ETag that is known before any file is touched and can be cached for a year.

Rendering is the one place the web process decodes pixels, so it is bounded: at most RENDER_SLOTS
renders at once per process (libvips uses every core for each), of which one account holds at most half
(so another account's request still finds one); a request waits for a slot at most RENDER_WAIT_SECONDS,
then answers 503 with Retry-After. A render running past DARKROOM_VARIANT_RENDER_TIMEOUT is killed (its
libvips evaluation stopped) and answers 503 render_too_slow. An image keeps at most MAX_VARIANTS_PER_IMAGE
variants: storing one more removes the least recently used (local storage: serving one marks it used, its
mtime; S3 objects cannot be touched, so there the oldest written goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Literal, cast

import anyio.to_thread
import pyvips
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from jobs.ops.base import MAX_DIMENSION
from jobs.ops.encode import MEDIA_TYPES, SAVERS, OutputFormat
from jobs.pipeline import KillSwitch
from jobs.records import ImageRecord, OutputInfo
from jobs.settings import Settings
from jobs.storage import BlobMissing, BlobStorage, is_full
from jobs.store import Store
from jobs.variants import PREVIEW_MAX_SIDE, VariantSpec, fit_inside, render_variant
from jobs.vips_errors import reports_storage_full
from server.blobs import blob_response
from server.conditional import none_match
from server.problems import Problem, storage_full_problem
from server.query import ASCII_INTEGER, QueryBoolean, QueryModel

log = logging.getLogger("darkroom.variants")

VariantFormat = Literal["jpeg", "png", "webp", "avif"]
CACHE_CONTROL = "private, max-age=31536000, immutable"
RENDER_SLOTS = os.cpu_count() or 1
RENDER_WAIT_SECONDS = 10.0
RENDER_RETRY_AFTER_SECONDS = 5
# 40 widths of one 100 MP image cached 314 MB: a partner asking for every size gets the recent ones.
MAX_VARIANTS_PER_IMAGE = 16


Dimension = Annotated[int, Field(ge=1, le=MAX_DIMENSION), ASCII_INTEGER]


class VariantQuery(QueryModel):
    """What the query asked for, validated but not yet resolved against a result."""

    format: Annotated[VariantFormat | None, Field(description="Encode the variant in this format")] = None
    quality: Annotated[
        Annotated[int, Field(ge=1, le=100), ASCII_INTEGER] | None,
        Field(description="Encoder quality (formats without one ignore it)"),
    ] = None
    width: Annotated[Dimension | None, Field(description="Fit inside this width (never enlarged)")] = None
    height: Annotated[Dimension | None, Field(description="Fit inside this height (never enlarged)")] = None
    preview: Annotated[
        QueryBoolean,
        Field(description=f"A preview: at most {PREVIEW_MAX_SIDE} px a side, with a PREVIEW watermark"),
    ] = False


def resolve_variant(query: VariantQuery, output: OutputInfo) -> VariantSpec | None:
    """The variant `query` asks of `output`, or None when that is the stored result itself.

    Sizes fit inside the asked box and never exceed the result's; `quality` only matters to formats
    that have one (a lossless PNG ignores it, as image CDNs do)."""
    box_width = min(query.width or output.width, output.width)
    box_height = min(query.height or output.height, output.height)
    if query.preview:
        box_width, box_height = min(box_width, PREVIEW_MAX_SIDE), min(box_height, PREVIEW_MAX_SIDE)
    width, height = fit_inside(output.width, output.height, box_width, box_height)
    # The worker stores only formats it can write, so a result's format is always an OutputFormat.
    chosen = cast(OutputFormat, query.format or output.format)
    quality = query.quality if SAVERS[chosen].default_quality is not None else None
    unchanged = (chosen, width, height) == (output.format, output.width, output.height)
    if unchanged and quality is None and not query.preview:
        return None
    return VariantSpec(chosen, width, height, quality, query.preview)


async def output_response(
    request: Request, image: ImageRecord, output: OutputInfo, spec: VariantSpec | None, download_stem: str
) -> Response:
    """The stored result (`spec` None) or its variant, honouring `If-None-Match`."""
    digest = _identity(image, output, spec)
    headers = {"ETag": f'"{digest}"', "Cache-Control": CACHE_CONTROL}
    if none_match(request, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    if spec is None:
        key = output.key
        media_type, filename = MEDIA_TYPES[output.format], f"{download_stem}{PurePosixPath(key).suffix}"
    else:
        suffix = SAVERS[spec.format].suffix
        key = f"{image.account_id}/{image.id}/variants/{digest}{suffix}"
        await _cached_variant(request, image, output, spec, key)
        media_type, filename = MEDIA_TYPES[spec.format], f"{download_stem}{_label(spec, output)}{suffix}"
    return await blob_response(
        request, key, media_type=media_type, filename=filename, headers=headers, missing=_missing_output()
    )


def _identity(image: ImageRecord, output: OutputInfo, spec: VariantSpec | None) -> str:
    """Names one representation across processes and restarts: the image, the stored result it comes
    from (a re-processed result is another one) and the variant."""
    variant = spec.canonical() if spec else ""
    parts = [image.id, output.key, str(output.bytes), image.completed_at or "", variant]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


async def _cached_variant(
    request: Request, image: ImageRecord, output: OutputInfo, spec: VariantSpec, key: str
) -> None:
    """Make sure the variant is stored under `key`, rendering it first if no request has yet. Two requests
    may render it at once: each writes its own staging file and either one's ends up stored."""
    storage: BlobStorage = request.app.state.storage
    if await storage.touch(key):
        return
    slots: RenderSlots = request.app.state.variant_render_slots
    async with slots.hold(image.account_id):
        # A request for the same variant may have rendered it while this one waited.
        if await storage.touch(key):
            return
        staged = storage.new_staging_path(PurePosixPath(key).suffix)
        settings: Settings = request.app.state.settings
        kill_switch = KillSwitch()
        try:
            try:
                async with storage.local_copy(output.key) as source:
                    deadline = asyncio.get_running_loop().call_later(
                        settings.variant_render_timeout, kill_switch.fire
                    )
                    try:
                        # Not abandoned on cancellation: the thread's file must exist before `finally`
                        # removes it.
                        await anyio.to_thread.run_sync(
                            functools.partial(render_variant, source, staged, spec, kill_switch)
                        )
                    finally:
                        deadline.cancel()
            except BlobMissing:
                raise _missing_output() from None
            await storage.evict_least_recent(
                f"{image.account_id}/{image.id}/variants", MAX_VARIANTS_PER_IMAGE - 1
            )
            await storage.put_file(staged, key)
            await storage.touch(key)
        except pyvips.Error as exc:
            if kill_switch.fired:
                raise Problem(
                    503,
                    "render_too_slow",
                    f"rendering this variant took longer than {settings.variant_render_timeout:g} s and was"
                    " stopped; ask for a smaller size or another format",
                ) from None
            if reports_storage_full(exc):
                raise storage_full_problem() from None
            log.exception("variant %s of %s cannot be rendered", spec.canonical(), image.id)
            raise Problem(
                500, "output_unreadable", "the stored result cannot be decoded to render this variant"
            ) from None
        except OSError as exc:
            if is_full(exc):
                raise storage_full_problem() from None
            raise
        finally:
            await anyio.to_thread.run_sync(functools.partial(staged.unlink, missing_ok=True))
    store: Store = request.app.state.store
    if await store.get_account_image(image.account_id, image.id) is None:
        # Deleted while we rendered: its blobs are gone, and this one must not outlive them.
        await storage.delete_tree(f"{image.account_id}/{image.id}")
        raise Problem(404, "not_found", "no such image")


@dataclass
class _Share:
    """One account's part of the render slots, kept while any of its requests holds or waits for one."""

    slots: anyio.Semaphore
    users: int = 0


class RenderSlots:
    """The process's RENDER_SLOTS, made at start-up (the app's lifespan) and shared by every request, of
    which one account holds at most half: a partner asking for a hundred sizes at once waits for its own
    turns, and every other account's request still finds a slot."""

    def __init__(self) -> None:
        self.total = RENDER_SLOTS
        self.per_account = max(1, RENDER_SLOTS // 2)
        self._free = anyio.Semaphore(self.total)
        self._shares: dict[str, _Share] = {}

    @contextlib.asynccontextmanager
    async def hold(self, account_id: str) -> AsyncIterator[None]:
        """A slot of the account's share, waited for at most RENDER_WAIT_SECONDS in all."""
        share = self._shares.setdefault(account_id, _Share(anyio.Semaphore(self.per_account)))
        share.users += 1
        try:
            async with contextlib.AsyncExitStack() as held:
                own_share_full = True
                try:
                    with anyio.fail_after(RENDER_WAIT_SECONDS):
                        await share.slots.acquire()
                        held.callback(share.slots.release)
                        own_share_full = False
                        await self._free.acquire()
                        held.callback(self._free.release)
                except TimeoutError:
                    raise _busy(own_share_full) from None
                yield
        finally:
            share.users -= 1
            if share.users == 0:
                del self._shares[account_id]


def _busy(own_share_full: bool) -> Problem:
    detail = (
        "this account's share of the variant renderers is busy with its other requests"
        if own_share_full
        else "every variant renderer is busy"
    )
    return Problem(
        503,
        "renderer_busy",
        f"{detail}; retry shortly (stored variants are served meanwhile)",
        headers={"Retry-After": str(RENDER_RETRY_AFTER_SECONDS)},
    )


def _missing_output() -> Problem:
    # The record says completed but the blob is gone: retrying will not bring it back.
    return Problem(410, "output_missing", "the stored result of this image is missing; upload it again")


def _label(spec: VariantSpec, output: OutputInfo) -> str:
    """What sets the download apart from the result: `-400x300-q60-preview` (the format is the suffix)."""
    parts = []
    if (spec.width, spec.height) != (output.width, output.height):
        parts.append(f"{spec.width}x{spec.height}")
    if spec.quality is not None:
        parts.append(f"q{spec.quality}")
    if spec.preview:
        parts.append("preview")
    return "".join(f"-{part}" for part in parts)
