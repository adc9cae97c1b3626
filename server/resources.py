"""Pydantic models of what the API answers (images, batches, webhook endpoints, deliveries, problems):
`/openapi.json` publishes their schemas, and tests/test_resource_schemas.py checks real answers against
them, so a field a serializer adds, drops or renames fails until its model says the same.

Every model forbids fields it does not declare, and a field the serializer always writes (null or not)
is required; only the problem's `request_id` and `errors` may be left out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from jobs.formats import ImageFormat
from jobs.ops.encode import OutputFormat
from jobs.records import ArchiveFormat, ArchiveStatus, BatchStatus, ImageStatus, UploadStart, UploadStatus
from server.endpoints import MAX_DESCRIPTION_LENGTH, MAX_IN_FLIGHT_LIMIT, MAX_RATE_LIMIT
from server.models import defaults_unsaid
from server.pagination import MAX_PAGE_SIZE
from server.upload_fields import Metadata, Operations
from server.uploads import MAX_FILENAME_CHARS
from webhooks.endpoints import EndpointStatus, EventType
from webhooks.messages import RESPONSE_EXCERPT_BYTES, DeliveryStatus, Event

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Count = Annotated[int, Field(ge=0)]
Pixels = Annotated[int, Field(ge=1)]


class Resource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(Resource):
    format: ImageFormat
    width: Pixels
    height: Pixels
    pages: Annotated[int, Field(ge=1)]
    bytes: Count
    filename: str | None
    url: Annotated[str, Field(description="where the original is downloaded")]


class ImageSource(Resource):
    url: Annotated[str, Field(description="the source_url the image was submitted with")]


class UploadState(Resource):
    id: Annotated[str, Field(pattern="^upl_")]
    status: UploadStatus
    starts: Annotated[
        UploadStart,
        Field(description="processing starts when the bytes land, or at POST /v1/images {upload_id}"),
    ]
    filename: Annotated[str, Field(min_length=1, max_length=MAX_FILENAME_CHARS)] | None
    content_type: str
    size: Annotated[int, Field(ge=1, description="exactly what the PUT must carry")]
    expires_at: Timestamp


class ImageOutput(Resource):
    format: OutputFormat
    width: Pixels
    height: Pixels
    bytes: Count
    url: Annotated[str, Field(description="where the result (or a variant of it) is downloaded")]


class ResourceError(Resource):
    code: str
    message: str


class ImageWebhook(Resource):
    id: Annotated[str, Field(description="the message's id: GET /v1/deliveries/{id}")]
    type: Literal["image.completed", "image.failed"]
    endpoint_id: Annotated[str | None, Field(description="null for the image's own callback_url")]


class Image(Resource):
    object: Literal["image"]
    id: Annotated[str, Field(pattern="^img_")]
    status: ImageStatus
    operations: Operations
    input: Annotated[
        ImageInput | None,
        Field(description="null until a direct upload's bytes land or an image's source_url is fetched"),
    ]
    source: Annotated[
        ImageSource | None, Field(description="where an image submitted by URL is fetched from")
    ]
    upload: Annotated[UploadState | None, Field(description="for an image created by POST /v1/uploads")]
    output: ImageOutput | None
    error: ResourceError | None
    webhooks: Annotated[
        list[ImageWebhook], Field(description="the message announcing its final status, per destination")
    ]
    batch_id: str | None
    callback_url: str | None
    metadata: Metadata
    attempts: Count
    created_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None
    expires_at: Annotated[
        Timestamp | None, Field(description="when the image and its files are deleted (404 from then on)")
    ]


class ImageList(Resource):
    object: Literal["list"]
    data: Annotated[list[Image], Field(max_length=MAX_PAGE_SIZE)]
    has_more: bool
    next_cursor: str | None


class AddedImages(Resource):
    """The images a request added to a batch."""

    object: Literal["list"]
    data: list[Image]


class UploadForm(Resource):
    url: str
    fields: dict[str, str]


class Upload(Resource):
    object: Literal["upload"]
    id: Annotated[str, Field(pattern="^upl_")]
    image: Image
    upload_url: str
    upload_method: Literal["PUT"]
    upload_headers: dict[str, str]
    upload_form: Annotated[
        UploadForm | None,
        Field(
            description="with S3 storage: a form to POST the file straight to the bucket (its fields, then"
            " the `file` part last); the bucket then redirects to /v1/uploads/{upload_id}/landed, which"
            " lands it. null with local storage"
        ),
    ]
    expires_at: Timestamp
    max_bytes: Count


class BatchCounts(Resource):
    total: Count
    queued: Count
    processing: Count
    completed: Count
    failed: Count


class BatchArchive(Resource):
    format: ArchiveFormat
    quality: Annotated[int, Field(ge=1, le=100)] | None
    status: ArchiveStatus
    url: Annotated[str | None, Field(description="set while the archive is ready")]
    bytes: Count | None
    expires_at: Timestamp | None
    error: ResourceError | None


class Batch(Resource):
    object: Literal["batch"]
    id: Annotated[str, Field(pattern="^bat_")]
    status: BatchStatus
    counts: BatchCounts
    operations: Operations
    archive: BatchArchive | None
    callback_url: str | None
    metadata: Metadata
    images_url: str
    created_at: Timestamp
    sealed_at: Timestamp | None
    completed_at: Timestamp | None
    expires_at: Annotated[
        Timestamp | None,
        Field(description="when the batch and its archive are deleted, once its images have expired"),
    ]


class BatchList(Resource):
    object: Literal["list"]
    data: Annotated[list[Batch], Field(max_length=MAX_PAGE_SIZE)]
    has_more: bool
    next_cursor: str | None


class Attempt(Resource):
    number: Annotated[int, Field(ge=1)]
    at: Timestamp
    status_code: int | None
    latency_ms: Annotated[float, Field(ge=0)]
    response_excerpt: Annotated[
        str, Field(description=f"at most {RESPONSE_EXCERPT_BYTES} bytes of the response body")
    ]
    error: str | None
    next_attempt_at: Timestamp | None
    url: Annotated[str | None, Field(description="where the request went; null when none was sent")]
    resent: Annotated[
        str | None,
        Field(description="why the request went twice in this attempt (the receiver may have seen both)"),
    ]


class DeliveryDestination(Resource):
    endpoint_id: Annotated[str | None, Field(description="null for the resource's own callback_url")]
    url: str
    status: DeliveryStatus
    next_attempt_at: Timestamp | None
    attempts: list[Attempt]


class Delivery(Resource):
    object: Literal["delivery"]
    id: Annotated[str, Field(pattern="^msg_", description="the webhook-id every destination receives")]
    event_type: EventType
    status: DeliveryStatus
    created_at: Timestamp
    destinations: list[DeliveryDestination]
    payload: Annotated[dict[str, Any], Field(description="the body exactly as sent")]


class DeliveryList(Resource):
    object: Literal["list"]
    data: Annotated[list[Delivery], Field(max_length=MAX_PAGE_SIZE)]
    has_more: bool
    next_cursor: str | None


class WebhookSecret(Resource):
    object: Literal["webhook_secret"]
    secret: Annotated[str, Field(pattern="^whsec_")]


class WebhookEndpoint(Resource):
    object: Literal["webhook_endpoint"]
    id: Annotated[str, Field(pattern="^ep_")]
    url: str
    events: list[EventType | Literal["*"]]
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION_LENGTH)]
    status: EndpointStatus
    disabled_reason: str | None
    disabled_at: Timestamp | None
    failing_since: Timestamp | None
    max_in_flight: Annotated[int, Field(ge=1, le=MAX_IN_FLIGHT_LIMIT)]
    rate_limit: Annotated[int, Field(ge=1, le=MAX_RATE_LIMIT)] | None
    created_at: Timestamp


class WebhookEndpointWithSecret(WebhookEndpoint):
    secret: Annotated[str, Field(pattern="^whsec_")]


class WebhookEndpointList(Resource):
    object: Literal["list"]
    data: list[WebhookEndpoint]
    has_more: Literal[False]


class RecoveryResult(Resource):
    object: Literal["recovery"]
    endpoint_id: Annotated[str, Field(pattern="^ep_")]
    since: str
    redelivered: Annotated[Count, Field(description="failed deliveries sent again")]


class ProblemFieldError(Resource):
    field: Annotated[str, Field(description="the field, as a path into the body (operations[0].type)")]
    message: str


class Problem(Resource):
    """RFC 9457 problem details."""

    # Its optional fields are left out when they do not apply, never null.
    model_config = ConfigDict(json_schema_extra=defaults_unsaid)

    type: str
    title: str
    status: Annotated[int, Field(ge=400, le=599)]
    detail: str
    code: str
    request_id: Annotated[str | SkipJsonSchema[None], Field(description="the request's X-Request-Id")] = None
    errors: list[ProblemFieldError] | SkipJsonSchema[None] = None


class BatchFailure(Resource):
    image_id: Annotated[str, Field(pattern="^img_")]
    filename: str | None
    error: ResourceError


class CompletedBatch(Batch):
    """The batch as GET /v1/batches/{id} answers it, and each of its images that failed."""

    failures: list[BatchFailure]


class WebhookTest(Resource):
    object: Literal["webhook_test"]
    endpoint_id: Annotated[str, Field(pattern="^ep_")]
    message: str


class ImageEvent(Event[Image]):
    """The image has finished: its result is ready, or it failed (its `error` says why)."""

    type: Literal["image.completed", "image.failed"]


class BatchCompletedEvent(Event[CompletedBatch]):
    """Every image of the sealed batch has finished."""

    type: Literal["batch.completed"]


class ArchiveEvent(Event[Batch]):
    """The batch's ZIP is ready to download, or could not be built (its `archive.error` says why)."""

    type: Literal["batch.archive.ready", "batch.archive.failed"]


class EndpointDisabledEvent(Event[WebhookEndpoint]):
    """Another endpoint of the account was disabled (failing too long, or by its owner)."""

    type: Literal["endpoint.disabled"]


class TestEvent(Event[WebhookTest]):
    """Sent by POST /v1/webhook-endpoints/{id}/test, to that endpoint alone."""

    type: Literal["webhook.test"]


# What each event's webhook carries.
WEBHOOK_EVENTS: dict[EventType, type[BaseModel]] = {
    "image.completed": ImageEvent,
    "image.failed": ImageEvent,
    "batch.completed": BatchCompletedEvent,
    "batch.archive.ready": ArchiveEvent,
    "batch.archive.failed": ArchiveEvent,
    "endpoint.disabled": EndpointDisabledEvent,
    "webhook.test": TestEvent,
}


class Health(Resource):
    """`/healthz`: the process answers."""

    status: Literal["ok"]


class ReadinessChecks(Resource):
    redis: Annotated[str, Field(description='"ok", or "unreachable: …"')]
    storage: Annotated[str, Field(description='"ok", or what is wrong with it')]
    storage_space: Annotated[
        str, Field(description='"ok"; "low: …" under DARKROOM_MIN_FREE_BYTES; "unknown: …"')
    ]


class Readiness(Resource):
    """`/readyz`: ready (200) when every check is ok, else 503."""

    status: Literal["ok", "unavailable"]
    checks: ReadinessChecks


RESOURCES: tuple[type[BaseModel], ...] = (
    Image,
    ImageList,
    AddedImages,
    Upload,
    Batch,
    BatchList,
    Delivery,
    DeliveryList,
    WebhookSecret,
    WebhookEndpoint,
    WebhookEndpointWithSecret,
    WebhookEndpointList,
    RecoveryResult,
    Problem,
    Health,
    Readiness,
)
