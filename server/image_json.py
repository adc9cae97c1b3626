"""`POST /v1/images` with a JSON body `{upload_id, operations?, callback_url?, metadata?}`: start a
direct upload whose bytes have landed, choosing how to process it now (jobs/uploads.py). The body's other
form, `{source_url, …}`, is server/images.py's."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response

from jobs.ids import id_pattern
from jobs.records import Account, ImageRecord
from jobs.settings import Settings
from jobs.store import Store
from jobs.uploads import UploadDesk, UploadGone, UploadNotPending, UploadRefused, image_id_for
from server.json_response import JSONResponse
from server.models import Hint, StrictModel, checked_body, given
from server.problems import Problem
from server.upload_fields import ImageChoices


class _Started(StrictModel):
    """The direct upload to start (mixed in after the model of its other fields, so that it comes first)."""

    upload_id: Annotated[
        str,
        StringConstraints(strict=True, pattern=id_pattern("upl")),
        Hint("must be the id POST /v1/uploads answered (upl_…)"),
        Field(description="The id POST /v1/uploads answered, once the upload's bytes are sent"),
    ]


class UploadStart(ImageChoices, _Started):
    """`POST /v1/images` as JSON naming `upload_id`: what the upload's image is processed with, where
    it differs from what it was created with."""


async def start_upload(request: Request, account: Account, body: dict[str, Any]) -> Response:
    settings: Settings = request.app.state.settings
    start = await checked_body(UploadStart, body, settings, urls=given(body, "callback_url"))
    # Only what the body gives changes; what the upload was created with stands otherwise.
    changes = start.model_dump(include={"operations", "callback_url", "metadata"}, exclude_none=True)
    store: Store = request.app.state.store
    image = await store.get_account_image(account.id, image_id_for(start.upload_id))
    if image is None or image.upload is None:
        raise _no_such_upload()
    desk: UploadDesk = request.app.state.uploads
    while True:
        try:
            started = await desk.start(image, changes)
            break
        except UploadGone:
            raise _no_such_upload() from None
        except UploadNotPending as moved_on:
            image = moved_on.image
            status = None if image.upload is None else image.upload.status
            if status == "received":  # it changed otherwise meanwhile: try again on what it is now
                continue
            if status == "started":
                started = _unchanged_by(image, changes)
                break
            if status == "pending" and (posted := await _land_posted(desk, store, image)) is not None:
                image = posted
                continue
            raise _not_startable(image) from None
    return JSONResponse(
        started.resource(settings.public_url),
        status_code=202,
        headers={"Location": f"{settings.public_url}/v1/images/{started.id}"},
    )


async def _land_posted(desk: UploadDesk, store: Store, image: ImageRecord) -> ImageRecord | None:
    """The upload as it is once bytes a form POST left in the bucket are landed (its client did not
    follow the bucket's redirect); None if the bucket holds none."""
    try:
        return await desk.land_posted(image)
    except UploadNotPending as moved_on:
        return moved_on.image
    except UploadRefused:
        # Failed now with the check's code: answered as any refused upload is.
        refused = await store.get_image(image.id)
        if refused is None:
            raise _no_such_upload() from None
        return refused
    except UploadGone:
        raise _no_such_upload() from None


def _no_such_upload() -> Problem:
    return Problem(404, "not_found", "no such upload")


def _unchanged_by(image: ImageRecord, changes: dict[str, Any]) -> ImageRecord:
    """A started upload asked again (a retry after a lost answer): the same image, if the request asks
    for nothing it does not already have."""
    if image.evolve(**changes) != image:
        raise Problem(
            409,
            "upload_already_started",
            "the image is processing already with what it was given; it cannot be changed now",
        )
    return image


def _not_startable(image: ImageRecord) -> Problem:
    upload = image.upload
    assert upload is not None
    if upload.status == "pending":
        return Problem(
            409,
            "upload_not_received",
            "the upload's bytes have not arrived yet: send them to its upload_url (or upload_form) first",
        )
    if upload.status == "expired":
        return Problem(409, "upload_expired", "the upload URL expired before any bytes were sent")
    error = image.error
    return Problem(
        409,
        "upload_refused",
        f"the uploaded file was refused ({error.code}: {error.message})"
        if error
        else "the uploaded file was refused",
    )
