"""`/v1/deliveries` and `/v1/webhook-secret`: what was sent to the partner, and how to check it."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.ids import is_id
from jobs.params import FieldError
from jobs.settings import Settings
from jobs.store import Store
from server.auth import require_account
from server.json_body import TIME_FORMAT_HINT, Rfc3339Time, read_json_object
from server.json_response import JSONResponse
from server.models import Hint, StrictModel, checked_body
from server.pagination import MessageCursor, PageQuery, page_response
from server.problems import Problem, validation_problem
from server.query import BLANK_IS_ABSENT, BatchId, EndpointId, ImageId, query_of, takes_query
from webhooks.endpoints import EventType
from webhooks.messages import DeliveryStatus, LoggedMessage, MessageFilter, is_endpoint


async def _owned_message(request: Request, account_id: str) -> LoggedMessage:
    store: Store = request.app.state.store
    msg_id = request.path_params["msg_id"]
    logged = await store.messages.get_logged(msg_id) if is_id("msg", msg_id) else None
    if logged is None or logged.message.account_id != account_id:
        raise Problem(404, "not_found", "no such delivery")
    return logged


async def get_delivery(request: Request) -> Response:
    account = await require_account(request)
    return JSONResponse((await _owned_message(request, account.id)).resource())


QueryTime = Annotated[Rfc3339Time | None, BLANK_IS_ABSENT, Hint(TIME_FORMAT_HINT)]


class Redelivery(StrictModel):
    """Which destinations a retry sends to."""

    endpoint_id: Annotated[
        EndpointId | None,
        Hint("must be an endpoint id (ep_…), or null for every destination"),
        Field(description="Only this endpoint (null or left out: every destination)"),
    ] = None


class DeliveryListQuery(PageQuery):
    cursor: MessageCursor = None
    status: Annotated[
        DeliveryStatus | None,
        BLANK_IS_ABSENT,
        Field(description="Only messages with a delivery in this status"),
    ] = None
    endpoint_id: Annotated[
        EndpointId | None,
        BLANK_IS_ABSENT,
        Hint("must be an endpoint id (ep_…)"),
        Field(description="Only messages sent to this endpoint"),
    ] = None
    image_id: Annotated[
        ImageId | None,
        BLANK_IS_ABSENT,
        Hint("must be an image id (img_…)"),
        Field(description="Only messages about this image"),
    ] = None
    batch_id: Annotated[
        BatchId | None,
        BLANK_IS_ABSENT,
        Hint("must be a batch id (bat_…)"),
        Field(description="Only messages about this batch"),
    ] = None
    event_type: Annotated[EventType | None, BLANK_IS_ABSENT, Field(description="Only this kind of event")] = (
        None
    )
    created_after: Annotated[QueryTime, Field(description="Only messages made at or after this time")] = None
    created_before: Annotated[QueryTime, Field(description="Only messages made before this time")] = None


@takes_query(DeliveryListQuery)
async def list_deliveries(request: Request) -> Response:
    account = await require_account(request)
    query = query_of(request, DeliveryListQuery)
    store: Store = request.app.state.store
    where = MessageFilter(
        status=query.status,
        endpoint_id=query.endpoint_id,
        event_type=query.event_type,
        created_after=query.created_after,
        created_before=query.created_before,
        batch_id=query.batch_id,
        message_ids=None
        if query.image_id is None
        else await _image_message_ids(store, account.id, query.image_id),
    )

    async def fetch(limit: int, before: str | None) -> list[LoggedMessage]:
        return await store.messages.list_for_account(account.id, limit=limit, before=before, where=where)

    return await page_response(query, fetch, LoggedMessage.resource)


async def _image_message_ids(store: Store, account_id: str, image_id: str) -> tuple[str, ...]:
    """The messages about the account's image, as its record names them (none for an image that is
    gone, or another account's)."""
    image = await store.get_account_image(account_id, image_id)
    return () if image is None or image.event_message_id is None else (image.event_message_id,)


async def retry_delivery(request: Request) -> Response:
    """Send the message again, now, to each destination (or to `endpoint_id` alone): a finished delivery
    becomes pending, one waiting for its next retry is brought forward. Its attempt history stays;
    receivers see the same `webhook-id`. A destination with an attempt under way is left to it (409 when
    that is every one chosen), and disabled or deleted endpoints are left out (409 when nothing else is
    left)."""
    account = await require_account(request)
    logged = await _owned_message(request, account.id)
    settings: Settings = request.app.state.settings
    only = (
        await checked_body(Redelivery, await read_json_object(request, optional=True), settings)
    ).endpoint_id
    if only is not None and only not in {delivery.destination for delivery in logged.deliveries}:
        raise validation_problem([FieldError("endpoint_id", "this message was not sent to that endpoint")])
    store: Store = request.app.state.store
    chosen = [delivery for delivery in logged.deliveries if only in (None, delivery.destination)]
    refusals = {}
    for delivery in chosen:
        if is_endpoint(delivery.destination):
            endpoint = await store.endpoints.get(delivery.destination)
            if endpoint is None:
                refusals[delivery.destination] = ("endpoint_deleted", "the endpoint was deleted")
            elif endpoint.status == "disabled":
                refusals[delivery.destination] = (
                    "endpoint_disabled",
                    "the endpoint is disabled; enable it first",
                )
    sendable = [delivery for delivery in chosen if delivery.destination not in refusals]
    if not sendable:
        code, detail = sorted(refusals.values())[-1]  # endpoint_disabled first: it can be undone
        raise Problem(409, code, detail)
    outcomes = await store.messages.redeliver(account.id, sendable)
    if all(outcome == "in_flight" for outcome in outcomes):
        raise Problem(
            409,
            "attempt_in_progress",
            "an attempt is under way; its outcome will show in the delivery log, retry after it",
        )
    return await accepted_message(store, logged.id)


async def accepted_message(store: Store, msg_id: str) -> Response:
    """202 with a message just made due, as the delivery log now shows it."""
    logged = await store.messages.get_logged(msg_id)
    assert logged is not None
    return JSONResponse(logged.resource(), status_code=202)


async def get_webhook_secret(request: Request) -> Response:
    account = await require_account(request)
    return JSONResponse({"object": "webhook_secret", "secret": account.webhook_secret})


async def rotate_webhook_secret(request: Request) -> Response:
    """A new secret for callback URLs; the old one keeps signing beside it for the grace period."""
    account = await require_account(request)
    store: Store = request.app.state.store
    settings: Settings = request.app.state.settings
    rotated = await store.rotate_webhook_secret(account.id, settings.secret_rotation_grace)
    if rotated is None:
        raise Problem(404, "not_found", "the account no longer exists")
    return JSONResponse({"object": "webhook_secret", "secret": rotated.webhook_secret})


routes = [
    Route("/v1/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/deliveries/{msg_id}", get_delivery, methods=["GET"]),
    Route("/v1/deliveries/{msg_id}/retry", retry_delivery, methods=["POST"]),
    Route("/v1/webhook-secret", get_webhook_secret, methods=["GET"]),
    Route("/v1/webhook-secret/rotate", rotate_webhook_secret, methods=["POST"]),
]
