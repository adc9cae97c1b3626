"""The fields an upload comes with (a multipart form's or a JSON body's), checked the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.operations import parse_operations
from jobs.params import FieldError, ValidationFailed
from jobs.retention import MIN_IMAGE_RETENTION_SECONDS
from jobs.settings import Settings
from server.destinations import check_destination_url
from server.json_body import InvalidJson, parse_json
from server.multipart import MultipartUpload
from server.problems import validation_problem

MAX_METADATA_BYTES = 4096
UPLOAD_FIELDS = ("operations", "callback_url", "metadata", "retention", "batch_id")


def _parse_json_field(fields: dict[str, str], name: str, errors: list[FieldError]) -> Any:
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
    """The form fields that come with uploaded files, validated."""

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


async def validate_upload_fields(
    upload: MultipartUpload, settings: Settings, accepted: Sequence[str] = UPLOAD_FIELDS
) -> UploadFields:
    """Every problem of the fields reported at once; `accepted` names the fields the route takes."""
    fields = upload.fields
    errors = list(upload.errors)
    raw_operations = _parse_json_field(fields, "operations", errors)
    metadata = _parse_json_field(fields, "metadata", errors)
    errors.extend(FieldError(name, "unknown field") for name in sorted(set(fields) - set(accepted)))
    return await checked_upload_fields(
        settings,
        errors,
        raw_operations=raw_operations,
        callback_url=fields.get("callback_url") or None,
        metadata=metadata,
        retention=fields.get("retention"),
        batch_id=fields.get("batch_id") or None,
    )


async def checked_upload_fields(
    settings: Settings,
    errors: list[FieldError],
    *,
    raw_operations: Any,
    callback_url: object,
    metadata: Any,
    retention: str | None,
    batch_id: object,
) -> UploadFields:
    """The fields an upload comes with, decoded (from a form or a JSON body), checked; 422 naming every
    problem, `errors` included."""
    operations: list[dict[str, Any]] | None = None
    try:
        if raw_operations is not None:
            operations = [operation.to_json() for operation in parse_operations(raw_operations)]
    except ValidationFailed as exc:
        errors.extend(exc.errors)
    if callback_url is not None:
        problem = (
            "must be a string"
            if not isinstance(callback_url, str)
            else await check_destination_url(callback_url, settings)
        )
        if problem:
            errors.append(FieldError("callback_url", problem))
    if metadata is None:
        metadata = {}
    elif problem := metadata_problem(metadata):
        errors.append(FieldError("metadata", problem))
    if batch_id is not None and not isinstance(batch_id, str):
        errors.append(FieldError("batch_id", "must be a string"))
    checked_retention = _retention(retention, settings, errors)
    if errors:
        raise validation_problem(errors)
    return UploadFields(
        operations,
        callback_url if isinstance(callback_url, str) else None,
        metadata,
        checked_retention,
        batch_id if isinstance(batch_id, str) else None,
    )


def _retention(raw: str | None, settings: Settings, errors: list[FieldError]) -> int:
    """The `retention` asked for, which may shorten the configured one but never lengthen it."""
    if raw is None or raw.strip() == "":
        return settings.image_retention
    longest = settings.image_retention
    shortest = min(MIN_IMAGE_RETENTION_SECONDS, longest)
    text = raw.strip()
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
