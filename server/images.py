"""`/v1/images`: upload, read, list, download and delete images."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from jobs.formats import ImageFormat, UnreadableImage, read_header, sniff_format
from jobs.ids import new_id
from jobs.operations import parse_operations
from jobs.ops.encode import MEDIA_TYPES
from jobs.params import FieldError, ValidationFailed
from jobs.queue import PROCESS_IMAGE, enqueue
from jobs.records import ImageRecord, InputInfo, utc_now
from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import Store
from server.auth import require_account
from server.destinations import check_destination_url
from server.multipart import UploadedFile, receive_multipart
from server.pagination import page_response, parse_page
from server.problems import Problem, validation_problem
from server.variants import output_response, parse_variant_query, resolve_variant

MAX_METADATA_BYTES = 4096
IMAGE_STATUSES = ("queued", "processing", "completed", "failed")


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON and which no response could echo back.
    raise ValueError(f"{name} is not valid JSON")


def _parse_json_field(fields: dict[str, str], name: str, errors: list[FieldError]) -> Any:
    raw = fields.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        errors.append(FieldError(name, f"is not valid JSON: {exc.msg}"))
    except ValueError as exc:
        errors.append(FieldError(name, f"is not valid JSON: {exc}"))
    except RecursionError:
        errors.append(FieldError(name, "is nested too deeply"))
    return None


async def _validate_fields(
    fields: dict[str, str], settings: Settings
) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    errors: list[FieldError] = []
    operations: list[dict[str, Any]] = []
    raw_operations = _parse_json_field(fields, "operations", errors)
    try:
        operations = [operation.to_json() for operation in parse_operations(raw_operations)]
    except ValidationFailed as exc:
        errors.extend(exc.errors)
    callback_url = fields.get("callback_url") or None
    if callback_url is not None:
        problem = await check_destination_url(callback_url, settings)
        if problem:
            errors.append(FieldError("callback_url", problem))
    metadata = _parse_json_field(fields, "metadata", errors)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        errors.append(FieldError("metadata", "must be a JSON object"))
    elif len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
        errors.append(FieldError("metadata", f"must be at most {MAX_METADATA_BYTES} bytes as JSON"))
    if fields.get("batch_id"):
        errors.append(FieldError("batch_id", "batches are not available yet"))
    unknown = set(fields) - {"operations", "callback_url", "metadata", "batch_id"}
    errors.extend(
        FieldError(name, "must be a file part with a filename" if name == "file" else "unknown field")
        for name in sorted(unknown)
    )
    if errors:
        raise validation_problem(errors)
    return operations, callback_url, metadata


async def _inspect(upload: UploadedFile, settings: Settings) -> InputInfo:
    """Decide the format from the bytes and refuse oversized images before anything is queued."""
    if upload.size == 0:
        raise Problem(422, "empty_file", "the uploaded file is empty")
    image_format = sniff_format(upload.head)
    if image_format is None:
        accepted = ", ".join(fmt.value for fmt in ImageFormat)
        raise Problem(415, "unsupported_format", f"the file is not an image Darkroom accepts ({accepted})")
    try:
        header = await asyncio.to_thread(read_header, str(upload.path), image_format)
    except UnreadableImage as exc:
        raise Problem(
            422, "unreadable_image", f"the {image_format.value} file cannot be read: {exc}"
        ) from None
    if header.pixels > settings.max_pixels:
        raise Problem(
            422,
            "image_too_large",
            f"{header.width}x{header.height}"
            + (f"x{header.pages} pages" if header.pages > 1 else "")
            + f" is {header.pixels:,} pixels; the limit is {settings.max_pixels:,}",
        )
    return InputInfo(
        format=header.format.value,
        width=header.width,
        height=header.height,
        pages=header.pages,
        bytes=upload.size,
        filename=upload.filename or None,
    )


async def create_image(request: Request) -> Response:
    account = await require_account(request)
    settings: Settings = request.app.state.settings
    storage: LocalStorage = request.app.state.storage
    store: Store = request.app.state.store
    upload = await receive_multipart(request, storage, settings.max_upload_bytes)
    try:
        operations, callback_url, metadata = await _validate_fields(upload.fields, settings)
        files = [f for f in upload.files if f.field_name == "file"]
        if len(files) != 1 or len(upload.files) != 1:
            raise validation_problem([FieldError("file", "send exactly one file part named `file`")])
        input_info = await _inspect(files[0], settings)
        image_id = new_id("img")
        original_key = f"{account.id}/{image_id}/original"
        await asyncio.to_thread(storage.commit, files[0].path, original_key)
    finally:
        upload.discard()
    image = ImageRecord(
        id=image_id,
        account_id=account.id,
        status="queued",
        operations=operations,
        input=input_info,
        original_key=original_key,
        created_at=utc_now(),
        callback_url=callback_url,
        metadata=metadata,
    )
    try:
        await store.save_new_image(image)
        await enqueue(
            request.app.state.redis,
            settings.queue_name,
            PROCESS_IMAGE,
            image.id,
            job_id=f"process:{image.id}",
        )
    except RedisError:
        # Not accepted, so nothing may stay: no blob without a record, no `queued` record without a job.
        await asyncio.to_thread(storage.delete_tree, f"{account.id}/{image_id}")
        with contextlib.suppress(RedisError):
            await store.delete_image(image)
        raise
    return JSONResponse(
        image.resource(settings.public_url),
        status_code=202,
        headers={"Location": f"{settings.public_url}/v1/images/{image.id}"},
    )


async def _owned_image(request: Request) -> ImageRecord:
    account = await require_account(request)
    store: Store = request.app.state.store
    image = await store.get_account_image(account.id, request.path_params["image_id"])
    if image is None:
        raise Problem(404, "not_found", "no such image")
    return image


async def get_image(request: Request) -> Response:
    image = await _owned_image(request)
    return JSONResponse(image.resource(request.app.state.settings.public_url))


async def list_images(request: Request) -> Response:
    account = await require_account(request)
    page, filters = parse_page(request.query_params, "img", {"status": IMAGE_STATUSES})
    store: Store = request.app.state.store
    public_url = request.app.state.settings.public_url

    async def fetch(limit: int, before: str | None) -> list[ImageRecord]:
        return await store.list_images(
            account.id,
            limit=limit,
            before=before,
            status=filters["status"],
            batch_id=request.query_params.get("batch_id") or None,
        )

    return await page_response(page, fetch, lambda image: image.resource(public_url))


def _basename(filename: str | None) -> str:
    """The client's file name without any directories it sent along (`C:\\photos\\a.jpg` → `a.jpg`)."""
    return (filename or "").replace("\\", "/").rsplit("/", 1)[-1]


def _download_name(image: ImageRecord, suffix: str) -> str:
    stem = _basename(image.input.filename).rsplit(".", 1)[0] or image.id
    return f"{stem}{suffix}"


async def get_output(request: Request) -> Response:
    image = await _owned_image(request)
    wanted = parse_variant_query(request.query_params)
    if image.status != "completed" or image.output is None:
        raise Problem(
            409,
            "not_ready",
            f"the image is {image.status}; its output exists once it is completed",
            headers={"Retry-After": "1"} if not image.is_terminal else None,
        )
    spec = resolve_variant(wanted, image.output)
    return await output_response(request, image, image.output, spec, download_stem=_download_name(image, ""))


async def get_original(request: Request) -> Response:
    image = await _owned_image(request)
    storage: LocalStorage = request.app.state.storage
    return FileResponse(
        storage.path(image.original_key),
        media_type=MEDIA_TYPES[image.input.format],
        filename=_basename(image.input.filename) or image.id,
        content_disposition_type="inline",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


async def delete_image(request: Request) -> Response:
    image = await _owned_image(request)
    store: Store = request.app.state.store
    storage: LocalStorage = request.app.state.storage
    await store.delete_image(image)
    await asyncio.to_thread(storage.delete_tree, f"{image.account_id}/{image.id}")
    return Response(status_code=204)


routes = [
    Route("/v1/images", create_image, methods=["POST"]),
    Route("/v1/images", list_images, methods=["GET"]),
    Route("/v1/images/{image_id}", get_image, methods=["GET"]),
    Route("/v1/images/{image_id}", delete_image, methods=["DELETE"]),
    Route("/v1/images/{image_id}/output", get_output, methods=["GET"]),
    Route("/v1/images/{image_id}/original", get_original, methods=["GET"]),
]
