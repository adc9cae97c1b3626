"""`/v1/batches`: images grouped to complete together, with one webhook and one ZIP of their results."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, InstanceOf, ValidationError, ValidationInfo, WithJsonSchema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.batches import BatchClosed, BatchEmpty
from jobs.ids import is_id, new_id
from jobs.params import FieldError, ValidationFailed
from jobs.records import ArchiveSpec, BatchRecord, BatchStatus, ImageRecord, utc_now
from jobs.settings import Settings
from jobs.storage import BlobStorage
from server.auth import require_account
from server.blobs import blob_response
from server.conditional import none_match
from server.images import accept_uploads, batches_of, new_images, open_batch, store_and_queue
from server.json_body import media_type, read_json_object
from server.json_response import JSONResponse
from server.long_poll import settled_response
from server.models import (
    DestinationUrl,
    Hint,
    StrictModel,
    checked_body,
    component_ref,
    field_errors,
    given,
    refusal,
    refusals,
)
from server.multipart import receive_multipart
from server.pagination import BatchCursor, PageQuery, page_response
from server.problems import Problem
from server.query import BLANK_IS_ABSENT, query_of, takes_query
from server.ratelimit import require_upload_room
from server.request_log import request_id_of
from server.upload_fields import (
    MAX_FILES_PER_REQUEST,
    FilePart,
    FormFields,
    FromUrl,
    KeptImage,
    Metadata,
    Operations,
    checked_form,
)
from webhooks.messages import iso, now_ms


def _archive(raw: object) -> ArchiveSpec | None:
    if raw is True:
        return ArchiveSpec()
    if raw is None or raw is False:
        return None
    try:
        return ArchiveSpec.parse(raw, "archive")
    except ValidationFailed as exc:
        raise refusals(exc.errors) from None


class NewBatch(StrictModel):
    """A batch to create: what its images share."""

    operations: Annotated[Operations, Field(description="For images added without their own")] = Field(
        default_factory=list
    )
    callback_url: Annotated[DestinationUrl | None, Field(description="Receives the batch's events")] = None
    archive: Annotated[
        InstanceOf[ArchiveSpec] | None,
        BeforeValidator(_archive),
        Hint('must be true, false or {"format": …, "quality"?: …}'),
        WithJsonSchema({"oneOf": [{"type": "boolean"}, component_ref("ArchiveSpec"), {"type": "null"}]}),
        Field(description='A ZIP of the results once the batch completes; true: {"format": "original"}'),
    ] = None
    metadata: Metadata = Field(default_factory=dict)


async def _new_batch(
    body: dict[str, Any], settings: Settings, account_id: str, request_id: str | None
) -> BatchRecord:
    """The batch a create body asks for, every problem of the body reported at once."""
    fields = await checked_body(NewBatch, body, settings, urls=given(body, "callback_url"))
    created_ms = now_ms()
    return BatchRecord(
        id=new_id("bat"),
        account_id=account_id,
        created_at=iso(created_ms),
        expires_at=iso(created_ms + settings.image_retention * 1000),
        operations=fields.operations,
        callback_url=fields.callback_url,
        archive=fields.archive,
        metadata=fields.metadata,
        request_id=request_id,
    )


async def create_batch(request: Request) -> Response:
    account = await require_account(request)
    settings: Settings = request.app.state.settings
    body = await read_json_object(request, optional=True)
    batch = await _new_batch(body, settings, account.id, request_id_of(request))
    await batches_of(request).create(batch)
    return JSONResponse(
        batch.resource(settings.public_url),
        status_code=201,
        headers={"Location": f"{settings.public_url}/v1/batches/{batch.id}"},
    )


async def _owned_batch(request: Request) -> BatchRecord:
    account = await require_account(request)
    return await _account_batch(request, account.id)


async def _account_batch(request: Request, account_id: str) -> BatchRecord:
    batch_id = request.path_params["batch_id"]
    batch = (
        await batches_of(request).get_for_account(account_id, batch_id) if is_id("bat", batch_id) else None
    )
    if batch is None:
        raise Problem(404, "not_found", "no such batch")
    return batch


async def get_batch(request: Request) -> Response:
    """The batch; with `Prefer: wait=N`, once it is completed with its archive (if any) ready or failed,
    or N seconds on (long_poll)."""
    public_url = request.app.state.settings.public_url
    return await settled_response(
        request,
        "batch_id",
        _account_batch,
        lambda batch: batch.is_settled,
        lambda batch: batch.resource(public_url),
    )


class BatchListQuery(PageQuery):
    cursor: BatchCursor = None
    status: Annotated[
        BatchStatus | None, BLANK_IS_ABSENT, Field(description="Only batches in this status")
    ] = None


@takes_query(BatchListQuery)
async def list_batches(request: Request) -> Response:
    account = await require_account(request)
    query = query_of(request, BatchListQuery)
    batches = batches_of(request)
    public_url = request.app.state.settings.public_url

    async def fetch(limit: int, before: str | None) -> list[BatchRecord]:
        return await batches.list_for_account(account.id, limit=limit, before=before, status=query.status)

    return await page_response(query, fetch, lambda batch: batch.resource(public_url))


async def add_images(request: Request) -> Response:
    """Several `file` parts at once; `operations`, `callback_url`, `metadata` and `retention` apply to
    each of them. Or JSON naming each image's `source_url` (add_images_by_url)."""
    account = await require_account(request)
    settings: Settings = request.app.state.settings
    # Refused before the body is read: a closed batch should not cost the partner an upload.
    batch = await open_batch(request, account.id, request.path_params["batch_id"], named_by_field=False)
    if media_type(request) == "application/json":
        images = await add_images_by_url(request, account.id, batch)
    else:
        await require_upload_room(request)
        images = await _add_uploads(request, account.id, batch)
    public_url = settings.public_url
    return JSONResponse(
        {"object": "list", "data": [image.resource(public_url) for image in images]}, status_code=202
    )


class BatchImagesForm(FormFields, KeptImage):
    """Images added to a batch as multipart/form-data: the files, and how to process each of them."""

    file: Annotated[
        list[FilePart],
        Field(min_length=1, max_length=MAX_FILES_PER_REQUEST, description="The images"),
        Hint("send one or more file parts, each named `file`"),
    ]


class BatchImageFromUrl(KeptImage, FromUrl):
    """An image added to a batch by URL."""


_IMAGES = f"must be a list of 1 to {MAX_FILES_PER_REQUEST} objects with a source_url"


def _each_image(entries: object, info: ValidationInfo) -> object:
    """Each entry read into its model, every problem named by its path (`images[1].source_url`)."""
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_FILES_PER_REQUEST:
        raise refusal(_IMAGES)
    images: list[BatchImageFromUrl] = []
    errors: list[FieldError] = []
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        if not isinstance(entry, dict):
            errors.append(FieldError(where, "must be an object with a source_url"))
            continue
        try:
            images.append(BatchImageFromUrl.model_validate(entry, context=info.context))
        except ValidationError as invalid:
            errors += [
                FieldError(f"{where}.{error.field}", error.message)
                for error in field_errors(BatchImageFromUrl, invalid, unknown="unknown field")
            ]
    if errors:
        raise refusals(errors)
    return images


class BatchImagesFromUrl(StrictModel):
    """Images added to a batch by URL: each fetched by a worker, as on `POST /v1/images`."""

    images: Annotated[
        list[BatchImageFromUrl],
        BeforeValidator(_each_image),
        Hint(_IMAGES),
        Field(min_length=1, max_length=MAX_FILES_PER_REQUEST),
    ]


async def _add_uploads(request: Request, account_id: str, batch: BatchRecord) -> list[ImageRecord]:
    settings: Settings = request.app.state.settings
    storage: BlobStorage = request.app.state.storage
    upload = await receive_multipart(
        request, storage, settings.max_upload_bytes, MAX_FILES_PER_REQUEST, account_id=account_id
    )
    try:
        form = await checked_form(BatchImagesForm, upload, settings)
        return await accept_uploads(request, account_id, form.file, form, batch)
    finally:
        await upload.discard()


async def add_images_by_url(request: Request, account_id: str, batch: BatchRecord) -> list[ImageRecord]:
    """`{"images": [{source_url, operations?, callback_url?, metadata?, retention?}, …]}`: all are
    accepted, or none."""
    settings: Settings = request.app.state.settings
    body = await read_json_object(request)
    entries = body.get("images")
    callbacks = {
        f"images[{index}].callback_url": entry["callback_url"]
        for index, entry in enumerate(entries if isinstance(entries, list) else [])
        if isinstance(entry, dict) and "callback_url" in entry
    }
    added = await checked_body(BatchImagesFromUrl, body, settings, urls=callbacks)
    images = [
        image
        for entry in added.images
        for image in new_images(
            account_id,
            entry,
            batch,
            [(new_id("img"), None)],
            entry.source_url,
            request_id=request_id_of(request),
            settings=settings,
        )
    ]
    await store_and_queue(request, images, batch, originals=())
    return images


async def seal_batch(request: Request) -> Response:
    batch = await _owned_batch(request)
    try:
        sealed = await batches_of(request).seal(batch.id)
    except BatchClosed as exc:
        raise Problem(409, "batch_sealed", f"the batch is {exc.batch.status} already") from None
    except BatchEmpty:
        raise Problem(
            409,
            "batch_empty",
            "the batch has no images: add some before sealing it (an empty batch stays open)",
        ) from None
    return JSONResponse(sealed.resource(request.app.state.settings.public_url))


async def get_archive(request: Request) -> Response:
    """The ZIP, resumable: `Range` (one range answers 206; several, multipart/byteranges), `If-Range`
    with the ETag, 416 for a range that starts past the end."""
    batch = await _owned_batch(request)
    if batch.archive is None:
        raise Problem(409, "no_archive", "the batch was created without an archive")
    state = batch.archive_state.seen_at(utc_now()) if batch.archive_state else None
    if state is None or state.status in ("pending", "building"):
        waiting_for = "its images to finish" if state is None else "its archive to be assembled"
        raise Problem(
            409, "not_ready", f"the batch is waiting for {waiting_for}", headers={"Retry-After": "5"}
        )
    if state.status == "failed":
        error = state.error
        raise Problem(
            409, "archive_failed", f"the archive could not be built: {error.message if error else ''}"
        )
    if state.status == "expired" or state.key is None:
        raise Problem(410, "archive_expired", f"the archive expired at {state.expires_at}")
    storage: BlobStorage = request.app.state.storage
    expired = Problem(410, "archive_expired", f"the archive expired at {state.expires_at}")
    found = await storage.stat(state.key)
    if found is None:
        raise expired
    headers = {"ETag": f'"{state.etag}"', "Cache-Control": "private"}
    if none_match(request, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return await blob_response(
        request,
        state.key,
        media_type="application/zip",
        filename=f"{batch.id}.zip",
        disposition="attachment",
        headers=headers,
        missing=expired,
    )


routes = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/images", add_images, methods=["POST"]),
    Route("/v1/batches/{batch_id}/seal", seal_batch, methods=["POST"]),
    Route("/v1/batches/{batch_id}/archive", get_archive, methods=["GET"]),
]
