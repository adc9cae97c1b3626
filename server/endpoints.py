"""`/v1/webhook-endpoints`: where an account's events go, each with its own secret, filter and limits."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs.ids import is_id, new_id
from jobs.records import Account
from jobs.settings import Settings
from jobs.store import Store
from server.auth import require_account
from server.deliveries import accepted_message
from server.json_body import Rfc3339Time, read_json_object
from server.json_response import JSONResponse
from server.models import (
    DestinationUrl,
    Hint,
    StrictModel,
    checked_body,
    given,
    refusal,
    without_defaults,
)
from server.problems import Problem
from server.request_log import request_id_of
from webhooks.endpoints import ALL_EVENTS, DEFAULT_MAX_IN_FLIGHT, EVENT_TYPES, Endpoint, EndpointStatus
from webhooks.messages import Destination, MessageFilter, new_message

MAX_ENDPOINTS_PER_ACCOUNT = 50
MAX_DESCRIPTION_LENGTH = 256
MAX_IN_FLIGHT_LIMIT = 100
MAX_RATE_LIMIT = 10_000


def _known_events(events: list[str]) -> list[str]:
    unknown = sorted(set(events) - {ALL_EVENTS, *EVENT_TYPES})
    if unknown:
        raise refusal(f"unknown event types: {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    return sorted(set(events))


EndpointUrl = Annotated[
    DestinationUrl, Field(description="Where deliveries are POSTed: http or https, public")
]


class NewEndpoint(StrictModel):
    """A webhook endpoint to register."""

    url: Annotated[
        DestinationUrl, Field(description="Where deliveries are POSTed: http or https, public only")
    ]
    events: Annotated[
        list[StrictStr],
        Field(
            min_length=1,
            description='The event types it receives, or ["*"] for all',
            json_schema_extra={"items": {"enum": [ALL_EVENTS, *EVENT_TYPES]}, "default": [ALL_EVENTS]},
        ),
        AfterValidator(_known_events),
        Hint('must be a non-empty list of event types, or ["*"] for all'),
    ] = Field(default_factory=lambda: [ALL_EVENTS])
    description: Annotated[
        StrictStr,
        Field(max_length=MAX_DESCRIPTION_LENGTH),
        Hint(f"a string of at most {MAX_DESCRIPTION_LENGTH}"),
    ] = ""
    max_in_flight: Annotated[
        StrictInt,
        Field(ge=1, le=MAX_IN_FLIGHT_LIMIT, description="Deliveries to it under way at once, at most"),
    ] = DEFAULT_MAX_IN_FLIGHT
    rate_limit: Annotated[
        Annotated[StrictInt, Field(ge=1, le=MAX_RATE_LIMIT)] | None,
        Field(description="Deliveries per second, at most (null: no limit)"),
        Hint(f"must be an integer from 1 to {MAX_RATE_LIMIT}, or null"),
    ] = None


class EndpointChanges(NewEndpoint):
    """Changes to a webhook endpoint: what the body names changes, the rest stays as it is."""

    model_config = ConfigDict(json_schema_extra=without_defaults)

    url: Annotated[
        DestinationUrl, Field(description="Where deliveries are POSTed: http or https, public only")
    ] = ""
    status: Annotated[EndpointStatus, Hint("must be enabled or disabled")] = "enabled"


class Recovery(StrictModel):
    """Which of an endpoint's failed deliveries to send again."""

    since: Annotated[Rfc3339Time, Field(description="Those of the messages made at or after this time")]


async def _owned_endpoint(request: Request, account: Account) -> Endpoint:
    store: Store = request.app.state.store
    endpoint_id = request.path_params["endpoint_id"]
    endpoint = await store.endpoints.get(endpoint_id) if is_id("ep", endpoint_id) else None
    if endpoint is None or endpoint.account_id != account.id:
        raise Problem(404, "not_found", "no such webhook endpoint")
    return endpoint


def _with_secret(endpoint: Endpoint) -> dict[str, Any]:
    return {**endpoint.resource(), "secret": endpoint.current_secret}


async def create_endpoint(request: Request) -> Response:
    account = await require_account(request)
    store: Store = request.app.state.store
    body = await read_json_object(request)
    fields = await checked_body(NewEndpoint, body, request.app.state.settings, urls=given(body, "url"))
    endpoint = await store.endpoints.create(
        new_id("ep"),
        account.id,
        fields.url,
        fields.events,
        fields.description,
        max_in_flight=fields.max_in_flight,
        rate_limit=fields.rate_limit,
        limit=MAX_ENDPOINTS_PER_ACCOUNT,
    )
    if endpoint is None:
        raise Problem(
            409, "too_many_endpoints", f"an account has at most {MAX_ENDPOINTS_PER_ACCOUNT} endpoints"
        )
    return JSONResponse(_with_secret(endpoint), status_code=201)


async def list_endpoints(request: Request) -> Response:
    account = await require_account(request)
    store: Store = request.app.state.store
    found = await store.endpoints.list_for_account(account.id)
    return JSONResponse(
        {"object": "list", "data": [endpoint.resource() for endpoint in found], "has_more": False}
    )


async def get_endpoint(request: Request) -> Response:
    account = await require_account(request)
    return JSONResponse((await _owned_endpoint(request, account)).resource())


async def get_endpoint_secret(request: Request) -> Response:
    account = await require_account(request)
    endpoint = await _owned_endpoint(request, account)
    return JSONResponse({"object": "webhook_secret", "secret": endpoint.current_secret})


async def update_endpoint(request: Request) -> Response:
    account = await require_account(request)
    endpoint = await _owned_endpoint(request, account)
    body = await read_json_object(request)
    changes = await checked_body(EndpointChanges, body, request.app.state.settings, urls=given(body, "url"))
    values = changes.model_dump(include=changes.model_fields_set)
    store: Store = request.app.state.store
    updated = await store.endpoints.update(endpoint, values)
    if updated is None:
        raise Problem(404, "not_found", "no such webhook endpoint")
    return JSONResponse(updated.resource())


async def delete_endpoint(request: Request) -> Response:
    account = await require_account(request)
    endpoint = await _owned_endpoint(request, account)
    store: Store = request.app.state.store
    await store.endpoints.delete(endpoint)
    return Response(status_code=204)


async def rotate_endpoint_secret(request: Request) -> Response:
    account = await require_account(request)
    endpoint = await _owned_endpoint(request, account)
    store: Store = request.app.state.store
    settings: Settings = request.app.state.settings
    rotated = await store.endpoints.rotate_secret(endpoint.id, settings.secret_rotation_grace)
    if rotated is None:
        raise Problem(404, "not_found", "no such webhook endpoint")
    return JSONResponse(_with_secret(rotated))


async def send_test_event(request: Request) -> Response:
    """A `webhook.test` event to this endpoint alone, whatever its event filter."""
    account = await require_account(request)
    endpoint = await _owned_endpoint(request, account)
    if endpoint.status == "disabled":
        raise Problem(409, "endpoint_disabled", "the endpoint is disabled; enable it first")
    store: Store = request.app.state.store
    data = {"object": "webhook_test", "endpoint_id": endpoint.id, "message": "a test event from Darkroom"}
    message = new_message(
        new_id("msg"),
        account.id,
        "webhook.test",
        data,
        [Destination(endpoint.id, endpoint.url)],
        request_id=request_id_of(request),
    )
    await store.save_message(message)
    return await accepted_message(store, message.id)


async def recover_endpoint(request: Request) -> Response:
    """Redeliver every failed delivery to this endpoint of the messages created since `since`."""
    account = await require_account(request)
    endpoint = await _owned_endpoint(request, account)
    settings: Settings = request.app.state.settings
    since = (await checked_body(Recovery, await read_json_object(request), settings)).since
    if endpoint.status == "disabled":
        raise Problem(409, "endpoint_disabled", "the endpoint is disabled; enable it first")
    store: Store = request.app.state.store
    redelivered = await store.redeliver_failed(
        account.id, MessageFilter(endpoint_id=endpoint.id, created_after=since)
    )
    recovery = {"object": "recovery", "endpoint_id": endpoint.id, "since": since, "redelivered": redelivered}
    return JSONResponse(recovery, status_code=202)


routes = [
    Route("/v1/webhook-endpoints", create_endpoint, methods=["POST"]),
    Route("/v1/webhook-endpoints", list_endpoints, methods=["GET"]),
    Route("/v1/webhook-endpoints/{endpoint_id}", get_endpoint, methods=["GET"]),
    Route("/v1/webhook-endpoints/{endpoint_id}", update_endpoint, methods=["PATCH"]),
    Route("/v1/webhook-endpoints/{endpoint_id}", delete_endpoint, methods=["DELETE"]),
    Route("/v1/webhook-endpoints/{endpoint_id}/secret", get_endpoint_secret, methods=["GET"]),
    Route("/v1/webhook-endpoints/{endpoint_id}/rotate-secret", rotate_endpoint_secret, methods=["POST"]),
    Route("/v1/webhook-endpoints/{endpoint_id}/test", send_test_event, methods=["POST"]),
    Route("/v1/webhook-endpoints/{endpoint_id}/recover", recover_endpoint, methods=["POST"]),
]
