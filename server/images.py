"""`/v1/images`: upload, read, list, download and delete images."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.archive import safe_entry_name
from jobs.batches import MAX_IMAGES_PER_BATCH, BatchClosed, Batches, BatchFull
from jobs.ids import is_id, new_id
from jobs.inspection import ImageRefused, inspect_image
from jobs.ops.encode import MEDIA_TYPES, SAVERS
from jobs.params import FieldError
from jobs.records import Account, BatchRecord, ImageRecord, ImageStatus, InputInfo, UploadState, original_key
from jobs.settings import Settings
from jobs.storage import BlobStorage, StorageUnavailable, is_full
from jobs.store import Store
from server.auth import require_account
from server.blobs import blob_response
from server.image_json import start_upload
from server.json_body import media_type, read_json_object
from server.json_response import JSONResponse
from server.long_poll import settled_response
from server.models import Hint, checked_body, given, refusal
from server.multipart import UploadedFile, receive_multipart
from server.pagination import ImageCursor, PageQuery, page_response
from server.problems import Problem, storage_full_problem, validation_problem
from server.query import BLANK_IS_ABSENT, BatchId, query_of, takes_query
from server.ratelimit import count_uploads, require_upload_room
from server.request_log import request_id_of
from server.upload_fields import (
    BatchableImage,
    FilePart,
    FormFields,
    FromUrl,
    KeptImage,
    checked_form,
)
from server.variants import VariantQuery, output_response, resolve_variant
from webhooks.messages import iso, now_ms

# The JSON forms of `POST /v1/images`, told apart by the one of these fields the body names.
JSON_FORMS = ("upload_id", "source_url")
# What `/original` downloads end with: the format the bytes are, whatever the name said.
ORIGINAL_SUFFIXES = {**{name: saver.suffix for name, saver in SAVERS.items()}, "heif": ".heic"}


async def _inspect(upload: UploadedFile, settings: Settings) -> InputInfo:
    """Decide the format from the bytes and refuse oversized images before anything is queued."""
    try:
        return await asyncio.to_thread(
            inspect_image, upload.path, upload.head, upload.size, upload.filename, settings
        )
    except ImageRefused as refusal:
        raise refused_problem(refusal) from None


def refused_problem(refusal: ImageRefused) -> Problem:
    return Problem(refusal.status, refusal.code, refusal.message)


_ONE_FILE = "send exactly one file part named `file`"


def _one_file(parts: object) -> object:
    if isinstance(parts, list) and len(parts) == 1:
        return parts[0]
    raise refusal(_ONE_FILE)


class ImageForm(FormFields, BatchableImage):
    """`POST /v1/images` as multipart/form-data: the image, and how to process it."""

    file: Annotated[FilePart, BeforeValidator(_one_file), Hint(_ONE_FILE), Field(description="The image")]


class ImageFromUrl(BatchableImage, FromUrl):
    """`POST /v1/images` as JSON naming `source_url`: an image a worker fetches."""


async def create_image(request: Request) -> Response:
    if media_type(request) == "application/json":
        return await _create_image_from_json(request)
    account = await require_account(request)
    await require_upload_room(request)
    settings: Settings = request.app.state.settings
    storage: BlobStorage = request.app.state.storage
    upload = await receive_multipart(request, storage, settings.max_upload_bytes, account_id=account.id)
    try:
        form = await checked_form(ImageForm, upload, settings)
        batch = await batch_named(request, account.id, form)
        (image,) = await accept_uploads(request, account.id, [form.file], form, batch)
    finally:
        await upload.discard()
    return _accepted(image, settings)


async def _create_image_from_json(request: Request) -> Response:
    """A JSON body names either `upload_id` (start a direct upload, server/image_json.py) or
    `source_url` (fetch the image from there)."""
    account = await require_account(request)
    body = await read_json_object(request)
    named = [name for name in JSON_FORMS if name in body]
    if len(named) != 1:
        message = "give exactly one of upload_id (a direct upload's) and source_url (a URL to fetch)"
        raise validation_problem([FieldError(name, message) for name in JSON_FORMS])
    if named == ["upload_id"]:
        return await start_upload(request, account, body)
    return await create_image_from_url(request, account, body)


async def create_image_from_url(request: Request, account: Account, body: dict[str, Any]) -> Response:
    """`POST /v1/images` with a JSON body naming `source_url`: a worker fetches the file, checks it as
    an upload is checked, and processes it. Accepted at once; what the fetch finds ends in the image.
    The URL is judged from its text here: the worker resolves its host when it fetches it."""
    settings: Settings = request.app.state.settings
    image = await checked_body(ImageFromUrl, body, settings, urls=given(body, "callback_url"))
    batch = await batch_named(request, account.id, image)
    images = new_images(
        account.id,
        image,
        batch,
        [(new_id("img"), None)],
        image.source_url,
        request_id=request_id_of(request),
        settings=settings,
    )
    await store_and_queue(request, images, batch, originals=())
    return _accepted(images[0], settings)


async def batch_named(request: Request, account_id: str, fields: BatchableImage) -> BatchRecord | None:
    if fields.batch_id is None:
        return None
    return await open_batch(request, account_id, fields.batch_id, named_by_field=True)


def _accepted(image: ImageRecord, settings: Settings) -> Response:
    return JSONResponse(
        image.resource(settings.public_url),
        status_code=202,
        headers={"Location": f"{settings.public_url}/v1/images/{image.id}"},
    )


def batches_of(request: Request) -> Batches:
    return Batches(request.app.state.store, request.app.state.redis, request.app.state.settings)


async def open_batch(
    request: Request, account_id: str, batch_id: str, *, named_by_field: bool
) -> BatchRecord:
    """The account's batch, still taking images. A `batch_id` form field naming no batch is a bad field
    (422); a batch in the path that does not exist is a missing resource (404)."""
    batch = (
        await batches_of(request).get_for_account(account_id, batch_id) if is_id("bat", batch_id) else None
    )
    if batch is None:
        if named_by_field:
            raise validation_problem([FieldError("batch_id", "no such batch in this account")])
        raise Problem(404, "not_found", "no such batch")
    if batch.sealed_at is not None:
        raise batch_closed_problem(batch)
    return batch


def batch_closed_problem(batch: BatchRecord) -> Problem:
    return Problem(409, "batch_sealed", f"the batch is {batch.status}: it takes no more images")


async def accept_uploads(
    request: Request,
    account_id: str,
    files: Sequence[UploadedFile],
    fields: KeptImage,
    batch: BatchRecord | None,
) -> list[ImageRecord]:
    """Inspect every file, store it, save its record (into `batch`, if any) and queue it: all of them, or
    none if any is refused. The caller discards the staged files."""
    settings: Settings = request.app.state.settings
    inputs = await _inspect_all(files, settings)
    images = new_images(
        account_id,
        fields,
        batch,
        [(upload.image_id, info) for upload, info in zip(files, inputs, strict=True)],
        request_id=request_id_of(request),
        settings=settings,
    )
    await store_and_queue(request, images, batch, list(zip(files, images, strict=True)))
    return images


def new_images(
    account_id: str,
    fields: KeptImage,
    batch: BatchRecord | None,
    entries: Sequence[tuple[str, InputInfo | None]],
    source_url: str | None = None,
    upload: UploadState | None = None,
    *,
    request_id: str | None,
    settings: Settings,
) -> list[ImageRecord]:
    """Records of new images, each an id and what its bytes are (None until a source is fetched or a
    direct upload's bytes land), made by the request `request_id`."""
    operations = fields.operations if fields.operations is not None else (batch.operations if batch else [])
    uploaded_ms = now_ms()
    return [
        ImageRecord(
            id=image_id,
            account_id=account_id,
            status="queued",
            operations=operations,
            input=input_info,
            original_key=original_key(account_id, image_id),
            created_at=iso(uploaded_ms),
            callback_url=fields.callback_url,
            batch_id=None if batch is None else batch.id,
            metadata=fields.metadata or {},
            expires_at=iso(uploaded_ms + fields.kept_seconds(settings) * 1000),
            source_url=source_url,
            upload=upload,
            request_id=request_id,
        )
        for image_id, input_info in entries
    ]


async def store_and_queue(
    request: Request,
    images: Sequence[ImageRecord],
    batch: BatchRecord | None,
    originals: Sequence[tuple[UploadedFile, ImageRecord]],
) -> None:
    """Store the staged originals under their keys (an image by URL has none yet), save the records
    (into `batch`, if any) and queue them: all, or none."""
    storage: BlobStorage = request.app.state.storage
    store: Store = request.app.state.store
    try:
        for upload, image in originals:
            await upload.commit(storage, image.original_key)
        await record_new_images(request, images, batch)
    except Problem:
        await _forget(storage, store, images, saved=False)
        raise
    except OSError as exc:
        # A commit found no room for a folder; nothing was recorded yet.
        await _forget(storage, store, images, saved=False)
        if is_full(exc):
            raise storage_full_problem() from None
        raise
    except Exception:
        # Not accepted (Redis unreachable, or a bug of ours: a 503 or a 500), so nothing may stay: a
        # transaction whose reply was lost may still have saved the records (their jobs then find no
        # image and end), and no blob may outlive its record.
        await _forget(storage, store, images, saved=True)
        raise


async def record_new_images(
    request: Request, images: Sequence[ImageRecord], batch: BatchRecord | None
) -> None:
    """Save new image records and their jobs, into `batch` if any, each image counted against the
    account's upload rate limit; a batch sealed or full meanwhile is a 409 problem, and nothing was saved."""
    settings: Settings = request.app.state.settings
    if batch is None:
        store: Store = request.app.state.store
        await count_uploads(
            request, len(images), then_apply=store.new_images_commands(images, settings.queue_name)
        )
        return
    await count_uploads(request, len(images))
    try:
        await batches_of(request).add_images(batch.id, images)
    except BatchClosed as exc:
        raise batch_closed_problem(exc.batch) from None
    except BatchFull:
        raise Problem(409, "batch_full", f"a batch holds at most {MAX_IMAGES_PER_BATCH:,} images") from None


async def _forget(storage: BlobStorage, store: Store, images: Sequence[ImageRecord], *, saved: bool) -> None:
    for image in images:
        with contextlib.suppress(StorageUnavailable):  # the retention sweep removes it with the record
            await storage.delete_tree(f"{image.account_id}/{image.id}")
        if saved:
            with contextlib.suppress(RedisError):
                await store.delete_image(image)


async def _inspect_all(files: Sequence[UploadedFile], settings: Settings) -> list[InputInfo]:
    """Each file's input info; one refused file refuses the request, naming every refused file."""
    if len(files) == 1:
        return [await _inspect(files[0], settings)]
    inputs: list[InputInfo] = []
    refused: list[FieldError] = []
    for index, upload in enumerate(files):
        try:
            inputs.append(await _inspect(upload, settings))
        except Problem as problem:
            refused.append(
                FieldError(f"file[{index}]", f"{upload.filename!r}: {problem.code}: {problem.detail}")
            )
    if refused:
        raise Problem(
            422,
            "files_refused",
            f"{len(refused)} of {len(files)} files were refused, so none was added; see errors",
            errors=refused,
        )
    return inputs


async def _owned_image(request: Request) -> ImageRecord:
    account = await require_account(request)
    return await _account_image(request, account.id)


async def _account_image(request: Request, account_id: str) -> ImageRecord:
    store: Store = request.app.state.store
    image_id = request.path_params["image_id"]
    image = await store.get_account_image(account_id, image_id) if is_id("img", image_id) else None
    if image is None:
        raise Problem(404, "not_found", "no such image")
    return image


async def get_image(request: Request) -> Response:
    """The image; with `Prefer: wait=N`, once it is completed or failed, or N seconds on (long_poll)."""
    public_url = request.app.state.settings.public_url
    return await settled_response(
        request,
        "image_id",
        _account_image,
        lambda image: image.is_terminal,
        lambda image: image.resource(public_url),
    )


class ImageListQuery(PageQuery):
    cursor: ImageCursor = None
    status: Annotated[
        ImageStatus | None, BLANK_IS_ABSENT, Field(description="Only images in this status")
    ] = None
    batch_id: Annotated[
        BatchId | None,
        BLANK_IS_ABSENT,
        Hint("must be a batch id (bat_…)"),
        Field(description="Only the images of this batch"),
    ] = None


@takes_query(ImageListQuery)
async def list_images(request: Request) -> Response:
    account = await require_account(request)
    query = query_of(request, ImageListQuery)
    store: Store = request.app.state.store
    public_url = request.app.state.settings.public_url

    async def fetch(limit: int, before: str | None) -> list[ImageRecord]:
        return await store.list_images(
            account.id,
            limit=limit,
            before=before,
            status=query.status,
            batch_id=query.batch_id,
        )

    return await page_response(query, fetch, lambda image: image.resource(public_url))


@takes_query(VariantQuery)
async def get_output(request: Request) -> Response:
    image = await _owned_image(request)
    wanted = query_of(request, VariantQuery)
    if image.status == "failed":
        error = image.error
        raise Problem(
            409,
            "image_failed",
            f"the image failed ({error.code}: {error.message}), so it has no output"
            if error
            else "the image failed, so it has no output",
        )
    if image.status != "completed" or image.output is None:
        detail = f"the image is {image.status}; its output exists once it is completed"
        settings: Settings = request.app.state.settings
        if settings.long_poll_max_wait:
            wait = settings.long_poll_max_wait
            detail += f": GET /v1/images/{image.id} with Prefer: wait={wait} answers when it is"
        raise Problem(
            409, "not_ready", detail, headers={"Retry-After": "1"} if not image.is_terminal else None
        )
    spec = resolve_variant(wanted, image.output)
    # The partner's name, made as safe as a ZIP entry's: it names a file on someone's disk.
    stem = safe_entry_name(image.filename, image.id, "")
    return await output_response(request, image, image.output, spec, download_stem=stem)


async def get_original(request: Request) -> Response:
    image = await _owned_image(request)
    original = image.input
    if original is None:
        raise _no_original_problem(image)
    return await blob_response(
        request,
        image.original_key,
        media_type=MEDIA_TYPES[original.format],
        filename=safe_entry_name(original.filename, image.id, ORIGINAL_SUFFIXES[original.format]),
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
        missing=Problem(410, "original_missing", "the uploaded file of this image is missing"),
    )


def _no_original_problem(image: ImageRecord) -> Problem:
    """A direct upload has no original until its bytes land, an image by URL none until its source is
    fetched, and neither has one if that failed (refused, expired, or the fetch failed)."""
    if image.is_terminal and image.error is not None:
        error = image.error
        detail = f"the image failed ({error.code}: {error.message}) before its original was stored"
        return Problem(409, "image_failed", detail)
    if image.upload is not None:
        return Problem(
            409, "upload_not_received", "the image's bytes have not been uploaded to its upload_url yet"
        )
    return Problem(
        409,
        "not_ready",
        f"the image is {image.status}; its original exists once its source_url is fetched",
        headers={"Retry-After": "1"},
    )


async def delete_image(request: Request) -> Response:
    image = await _owned_image(request)
    store: Store = request.app.state.store
    storage: BlobStorage = request.app.state.storage
    folder = f"{image.account_id}/{image.id}"
    # The files first: a storage that cannot be reached answers 503 with the image still there to
    # delete again, never a record gone and files no sweep would find.
    await storage.delete_tree(folder)
    await store.delete_image(image)
    # Again, quietly: a render or a variant may have stored a file in between (after the record is gone,
    # they remove their own).
    with contextlib.suppress(StorageUnavailable):
        await storage.delete_tree(folder)
    if image.batch_id is not None:
        # It may have been the last unfinished image of a sealed batch.
        await batches_of(request).complete_if_done(image.batch_id)
    return Response(status_code=204)


routes = [
    Route("/v1/images", create_image, methods=["POST"]),
    Route("/v1/images", list_images, methods=["GET"]),
    Route("/v1/images/{image_id}", get_image, methods=["GET"]),
    Route("/v1/images/{image_id}", delete_image, methods=["DELETE"]),
    Route("/v1/images/{image_id}/output", get_output, methods=["GET"]),
    Route("/v1/images/{image_id}/original", get_original, methods=["GET"]),
]
