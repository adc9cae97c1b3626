"""`/v1/uploads`: direct uploads. The partner creates the image first, then sends its bytes to a signed,
expiring URL that needs no API key (so a phone app can upload without holding one); see jobs/uploads.py.

The URL is `{DARKROOM_PUBLIC_URL}/v1/uploads/{upl_…}/content?expires=…&signature=…`: the signature is an
HMAC-SHA256 of the method, path and expiry under a secret kept in Redis, made by the first web process
that needs it and shared by all, so any web process can check a URL another one signed.

With S3 storage the upload also offers a presigned form POST straight to the bucket, whose
`success_action_redirect` is `/v1/uploads/{upl_…}/landed?expires=…&signature=…`, signed the same way:
the client following the bucket's 303 there lands the bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints, WithJsonSchema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.ids import is_id, new_id
from jobs.ops.encode import MEDIA_TYPES
from jobs.records import Account, ImageRecord, UploadState
from jobs.settings import Settings
from jobs.storage import BlobStorage, LocalStorage, is_full
from jobs.store import Store
from jobs.uploads import (
    UploadDesk,
    UploadGone,
    UploadNotPending,
    UploadRefused,
    image_id_for,
    received_original_key,
    upload_id_for,
)
from server.auth import counted_request
from server.images import batch_named, new_images, record_new_images, refused_problem
from server.json_body import read_json_object
from server.json_response import JSONResponse
from server.models import Hint, StrictModel, checked_body, given
from server.problems import Problem, storage_full_problem
from server.query import QueryModel, query_of, takes_query
from server.request_log import request_id_of
from server.upload_fields import BatchableImage
from webhooks.messages import iso, now_ms

# The media types a direct upload may declare: what we decode (the bytes decide the format in the end).
ACCEPTED_CONTENT_TYPES = frozenset(
    {*MEDIA_TYPES.values(), "image/jpg", "image/heif", "image/heic-sequence", "image/heif-sequence"}
)
MAX_FILENAME_CHARS = 255
# Digits of a unix time in seconds, far past any expiry we sign.
_MAX_EXPIRES_DIGITS = 12


def content_path(upload_id: str) -> str:
    return f"/v1/uploads/{upload_id}/content"


def landed_path(upload_id: str) -> str:
    return f"/v1/uploads/{upload_id}/landed"


def _signature(key: bytes, method: str, path: str, expires: int) -> str:
    signed = f"{method}\n{path}\n{expires}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode().rstrip("=")


async def _signing_key(request: Request) -> bytes:
    state = request.app.state
    if state.upload_signing_key is None:
        store: Store = state.store
        state.upload_signing_key = await store.upload_signing_key()
    key: bytes = state.upload_signing_key
    return key


async def _signed_url(request: Request, method: str, path: str, expires: int) -> str:
    settings: Settings = request.app.state.settings
    signature = _signature(await _signing_key(request), method, path, expires)
    return f"{settings.public_url}{path}?expires={expires}&signature={signature}"


async def _upload_form(
    request: Request, upload: UploadState, key: str, expires: int
) -> dict[str, Any] | None:
    """The form that POSTs the file straight to the bucket until `expires` (None: the storage has none),
    redirecting to our signed landed URL. The redirect URL outlives the form by the longest a body may
    take, as a PUT started just in time may finish."""
    storage: BlobStorage = request.app.state.storage
    if isinstance(storage, LocalStorage):  # the bytes can only come to us
        return None
    settings: Settings = request.app.state.settings
    redirect_expires = expires + math.ceil(settings.body_timeout)
    form = await storage.presign_post(
        key,
        max_bytes=upload.size,
        expires_in=max(1, expires - int(time.time())),
        success_redirect_url=await _signed_url(request, "GET", landed_path(upload.id), redirect_expires),
        content_type=upload.content_type,
    )
    return None if form is None else {"url": form.url, "fields": form.fields}


def _accepted_media_type(content_type: object) -> object:
    """The media type, without parameters, in lower case."""
    if isinstance(content_type, str):
        media_type = content_type.split(";")[0].strip().lower()
        if media_type in ACCEPTED_CONTENT_TYPES:
            return media_type
    raise ValueError("not an accepted media type")


_ACCEPTED = ", ".join(sorted(ACCEPTED_CONTENT_TYPES))


class _DeclaredFile(StrictModel):
    """The file a direct upload will send (mixed in after the model of the image's other fields, so that
    it comes first)."""

    filename: Annotated[
        str,
        StringConstraints(strict=True, min_length=1, max_length=MAX_FILENAME_CHARS),
        Hint(f"must be a string of 1 to {MAX_FILENAME_CHARS} characters"),
        Field(description="The file's name, kept with the image"),
    ]
    content_type: Annotated[
        str,
        BeforeValidator(_accepted_media_type),
        Hint(f"must be one of {_ACCEPTED}"),
        WithJsonSchema({"type": "string", "description": f"The file's media type: {_ACCEPTED}"}),
    ]
    size: Annotated[
        StrictInt,
        Field(ge=1, description="The file's size in bytes: exactly what the PUT will carry"),
        Hint("must be the file's size in bytes, at least 1"),
    ]


class NewUpload(BatchableImage, _DeclaredFile):
    """`POST /v1/uploads`: an image whose bytes are sent afterwards, to the signed URL answered."""


async def create_upload(request: Request) -> Response:
    async with counted_request(request) as account:
        return await _created_upload(request, account)


async def _created_upload(request: Request, account: Account) -> Response:
    settings: Settings = request.app.state.settings
    body = await read_json_object(request)
    fields = await checked_body(NewUpload, body, settings, urls=given(body, "callback_url"))
    if fields.size > settings.max_upload_bytes:
        raise Problem(
            413, "file_too_large", f"the file exceeds the upload limit of {settings.max_upload_bytes} bytes"
        )
    batch = await batch_named(request, account.id, fields)
    created_ms = now_ms()
    # When its URLs expire: whole seconds, as they carry it.
    expires = created_ms // 1000 + settings.upload_url_ttl
    image_id = new_id("img")
    upload = UploadState(
        id=upload_id_for(image_id),
        status="pending",
        # With nothing to wait for (its operations given, or its batch's), it starts when its bytes land.
        starts="on_upload" if fields.operations is not None or batch is not None else "on_request",
        size=fields.size,
        content_type=fields.content_type,
        expires_at=iso(expires * 1000),
        filename=fields.filename,
    )
    (image,) = new_images(
        account.id,
        fields,
        batch,
        [(image_id, None)],
        upload=upload,
        request_id=request_id_of(request),
        settings=settings,
    )
    upload_url = await _signed_url(request, "PUT", content_path(upload.id), expires)
    upload_form = await _upload_form(request, upload, image.original_key, expires)
    await record_new_images(request, [image], batch)
    return JSONResponse(
        {
            "object": "upload",
            "id": upload.id,
            "image": image.resource(settings.public_url),
            "upload_url": upload_url,
            "upload_method": "PUT",
            "upload_headers": {"Content-Type": fields.content_type},
            "upload_form": upload_form,
            "expires_at": upload.expires_at,
            "max_bytes": fields.size,
        },
        status_code=201,
        headers={"Location": f"{settings.public_url}/v1/images/{image.id}"},
    )


async def _verified_upload(request: Request, path_for: Callable[[str], str]) -> ImageRecord:
    """The image whose upload the URL's signature names, if the URL is ours and has not expired."""
    upload_id = request.path_params["upload_id"]
    query = query_of(request, SignedUrlQuery)
    expires, signature = query.expires or "", query.signature or ""
    invalid = Problem(403, "upload_url_invalid", "the upload URL is not one we signed; use it as given")
    if not (
        is_id("upl", upload_id)
        and expires.isascii()
        and expires.isdigit()
        and len(expires) <= _MAX_EXPIRES_DIGITS
    ):
        raise invalid
    expected = _signature(await _signing_key(request), request.method, path_for(upload_id), int(expires))
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise invalid
    if int(expires) <= time.time():
        raise _expired()
    store: Store = request.app.state.store
    image = await store.get_image(image_id_for(upload_id))
    if image is None or image.upload is None or image.expired_at(iso(now_ms())):
        raise _gone()
    return image


def _gone() -> Problem:
    return Problem(404, "not_found", "no such upload (its image was deleted)")


def _expired() -> Problem:
    return Problem(403, "upload_url_expired", "the upload URL has expired; create a new upload")


def _not_pending_problem(image: ImageRecord) -> Problem:
    assert image.upload is not None
    if image.upload.status == "expired":
        return _expired()
    return Problem(
        409,
        "upload_already_received",
        f"the bytes of this upload were received already ({image.upload.status})",
    )


_AS_GIVEN = Hint("must be as the upload URL gives it")


class SignedUrlQuery(QueryModel):
    """An upload URL's signature; checked by the route, which answers 403 when it is not ours."""

    # Any text is taken: one that is not the URL's own answers 403, as a wrong signature does.
    expires: Annotated[
        str | None, Field(description="When the URL expires (Unix seconds), as signed"), _AS_GIVEN
    ] = None
    signature: Annotated[str | None, Field(description="The URL's signature, as given"), _AS_GIVEN] = None


class RedirectedSignedUrlQuery(SignedUrlQuery):
    """The bucket's redirect after a form POST adds its own parameters (S3: bucket, key, etag)."""

    model_config = ConfigDict(extra="ignore")


@takes_query(SignedUrlQuery)
async def receive_content(request: Request) -> Response:
    """`PUT` the raw bytes: exactly the declared size, checked as a multipart upload is, then queued."""
    image = await _verified_upload(request, content_path)
    upload = image.upload
    assert upload is not None
    if upload.status != "pending":
        raise _not_pending_problem(image)
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit():
        _check_size(int(declared), upload.size, complete=True)
    settings: Settings = request.app.state.settings
    storage: BlobStorage = request.app.state.storage
    key = received_original_key(image)
    desk: UploadDesk = request.app.state.uploads
    # Kept in scratch for the checks; with S3 also sent on as it arrives (a multipart upload), so the
    # bytes are stored moments after the last one came.
    staged, sink = storage.open_staging()
    streamed = None if isinstance(storage, LocalStorage) else storage.open_writer(key)
    try:
        try:
            with sink:
                received = 0
                async for chunk in request.stream():
                    received += len(chunk)
                    _check_size(received, upload.size, complete=False)
                    sink.write(chunk)
                    if streamed is not None:
                        await streamed.write(chunk)
                _check_size(received, upload.size, complete=True)
            if streamed is not None:
                await streamed.commit()
        except BaseException:
            if streamed is not None:
                await streamed.abort()
            raise
        if streamed is None:
            await storage.put_file(staged, key)
            landed = await desk.land(image, key)
        else:
            landed = await desk.land(image, key, local=staged)
    except OSError as exc:
        if is_full(exc):
            raise storage_full_problem() from None
        raise
    except UploadRefused as refused:
        raise refused_problem(refused.refusal) from None
    except UploadNotPending as moved_on:
        raise _not_pending_problem(moved_on.image) from None
    except UploadGone:
        raise _gone() from None
    finally:
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)
    return JSONResponse(landed.resource(settings.public_url))


@takes_query(RedirectedSignedUrlQuery)
async def land_posted_form(request: Request) -> Response:
    """Where the bucket redirects the client after a form POST: land the bytes it stored, or answer
    the image as it is if they landed already (a repeat, or the sweep or a start looked first)."""
    image = await _verified_upload(request, landed_path)
    settings: Settings = request.app.state.settings
    desk: UploadDesk = request.app.state.uploads
    landed_here = False
    try:
        while image.upload is not None and image.upload.status == "pending":
            try:
                landed = await desk.land_posted(image)
            except UploadNotPending as moved_on:
                image = moved_on.image
                continue
            if landed is None:
                raise Problem(
                    409,
                    "upload_not_received",
                    "the bucket holds no file for this upload: POST it with the upload_form first",
                )
            image, landed_here = landed, True
    except UploadRefused as refused:
        raise refused_problem(refused.refusal) from None
    except UploadGone:
        raise _gone() from None
    if not landed_here:  # landing removes the posted file itself
        await desk.discard_late_post(image)
    return JSONResponse(image.resource(settings.public_url))


def _check_size(received: int, declared: int, *, complete: bool) -> None:
    if received > declared:
        raise Problem(
            413,
            "upload_too_large",
            f"the upload declared {declared} bytes; more were sent, and none was kept",
        )
    if complete and received < declared:
        raise Problem(
            400, "upload_incomplete", f"the upload declared {declared} bytes; only {received} were sent"
        )


routes = [
    Route("/v1/uploads", create_upload, methods=["POST"]),
    Route("/v1/uploads/{upload_id}/content", receive_content, methods=["PUT"]),
    Route("/v1/uploads/{upload_id}/landed", land_posted_form, methods=["GET"]),
]
