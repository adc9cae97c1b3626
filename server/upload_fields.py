"""The fields an image comes with (a multipart form's, or a JSON body's: a direct upload's, a start of
one, an image by URL), checked the same way."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from jobs.operations import MAX_CHAIN_LENGTH, parse_operations
from jobs.params import FieldError, ValidationFailed
from jobs.retention import MIN_IMAGE_RETENTION_SECONDS
from jobs.settings import Settings
from server.destinations import check_destination_url
from server.json_body import InvalidJson, parse_json
from server.models import Hint, component_ref, refusal, refusals
from server.multipart import MultipartUpload
from server.problems import validation_problem

MAX_METADATA_BYTES = 4096
UPLOAD_FIELDS = ("operations", "callback_url", "metadata", "retention", "batch_id")


def _parse_json_field(fields: Mapping[str, str], name: str, errors: list[FieldError]) -> Any:
    raw = fields.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse_json(raw, name)
    except InvalidJson as exc:
        errors.append(FieldError(name, f"is not valid JSON: {exc}"))
    except ValidationFailed as exc:
        errors.extend(exc.errors)
    return None


@dataclass(frozen=True)
class UploadFields:
    """The fields that come with an image, validated."""

    # None when not given, so a batch's default operations apply (an empty list is a choice).
    operations: list[dict[str, Any]] | None
    callback_url: str | None
    metadata: dict[str, Any]
    # Seconds each image is kept after its upload.
    retention: int
    batch_id: str | None = None


def metadata_problem(metadata: Any) -> str | None:
    if not isinstance(metadata, dict):
        return "must be a JSON object"
    if len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
        return f"must be at most {MAX_METADATA_BYTES} bytes as JSON"
    return None


def _parsed_operations(raw: object) -> list[dict[str, Any]]:
    try:
        return [operation.to_json() for operation in parse_operations(raw)]
    except ValidationFailed as exc:
        raise refusals(exc.errors) from None


def _checked_metadata(raw: object) -> object:
    if raw is None:
        return {}
    if problem := metadata_problem(raw):
        raise refusal(problem)
    return raw


# The fields of JSON bodies, as models take them.
Operations = Annotated[
    list[dict[str, Any]],
    BeforeValidator(_parsed_operations),
    Hint("must be a JSON array of operations"),
    WithJsonSchema({"type": "array", "maxItems": MAX_CHAIN_LENGTH, "items": component_ref("Operation")}),
]
Metadata = Annotated[
    dict[str, Any],
    BeforeValidator(_checked_metadata),
    Hint("must be a JSON object"),
    WithJsonSchema(
        {"type": "object", "description": f"Yours, echoed back: at most {MAX_METADATA_BYTES} bytes as JSON"}
    ),
]


async def validate_upload_fields(
    upload: MultipartUpload, settings: Settings, accepted: Sequence[str] = UPLOAD_FIELDS
) -> UploadFields:
    """Every problem of the form fields reported at once (422); `accepted` names the fields the route
    takes."""
    fields: dict[str, Any] = dict(upload.fields)
    errors = list(upload.errors)
    for name in ("operations", "metadata"):
        if name in fields:
            fields[name] = _parse_json_field(upload.fields, name, errors)
    return await checked_fields(fields, settings, accepted, errors)


async def checked_fields(
    fields: Mapping[str, Any], settings: Settings, accepted: Sequence[str], errors: list[FieldError]
) -> UploadFields:
    """validate_fields for a request with one image: its problems answered as a 422."""
    try:
        return await validate_fields(fields, settings, accepted, errors)
    except ValidationFailed as exc:
        raise validation_problem(exc.errors) from None


async def validate_fields(
    fields: Mapping[str, Any], settings: Settings, accepted: Sequence[str], errors: list[FieldError]
) -> UploadFields:
    """The fields of an upload or a JSON body (`operations` and `metadata` decoded); ValidationFailed
    names every problem, those found before (`errors`) first. Fields `accepted` but not checked here
    (a direct upload's `size`, say) are the caller's."""
    operations: list[dict[str, Any]] | None = None
    try:
        if fields.get("operations") is not None:
            operations = [operation.to_json() for operation in parse_operations(fields["operations"])]
    except ValidationFailed as exc:
        errors.extend(exc.errors)
    callback_url = fields.get("callback_url") or None
    if callback_url is not None and (problem := await check_destination_url(callback_url, settings)):
        errors.append(FieldError("callback_url", problem))
    metadata = fields.get("metadata")
    if metadata is None:
        metadata = {}
    elif problem := metadata_problem(metadata):
        errors.append(FieldError("metadata", problem))
    retention = _retention(fields.get("retention"), settings, errors)
    batch_id = fields.get("batch_id") or None
    if batch_id is not None and not isinstance(batch_id, str):
        errors.append(FieldError("batch_id", "must be a string"))
    errors.extend(FieldError(name, "unknown field") for name in sorted(set(fields) - set(accepted)))
    if errors:
        raise ValidationFailed(errors)
    return UploadFields(operations, callback_url, metadata, retention, batch_id)


def _retention(raw: object, settings: Settings, errors: list[FieldError]) -> int:
    """The `retention` asked for (a form field's text, or a JSON number), which may shorten the
    configured one but never lengthen it."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return settings.image_retention
    longest = settings.image_retention
    shortest = min(MIN_IMAGE_RETENTION_SECONDS, longest)
    text = raw.strip() if isinstance(raw, str) else str(raw) if type(raw) is int else ""
    # The length first: int() refuses strings of over 4300 digits.
    if (
        text.isascii()
        and text.isdigit()
        and len(text) <= len(str(longest))
        and shortest <= int(text) <= longest
    ):
        return int(text)
    errors.append(FieldError("retention", f"must be whole seconds from {shortest} to {longest}"))
    return longest
