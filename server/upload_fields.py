"""The fields an image comes with, as models: each body that makes or starts an image (a multipart form,
a direct upload, the start of one, an image by URL, a batch's images) is validated by a model built from
these, which is also its schema in `/openapi.json`.

A JSON body gives the values as JSON. A multipart form gives them as text: `operations` and `metadata` as
JSON text, read as strictly as a JSON body is (server/json_body.py), and a field left blank is not given.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, TypeVar

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    InstanceOf,
    StrictStr,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from jobs.operations import MAX_CHAIN_LENGTH, parse_operations
from jobs.params import ValidationFailed
from jobs.retention import MIN_IMAGE_RETENTION_SECONDS
from jobs.settings import Settings
from server.json_body import InvalidJson, parse_json
from server.models import (
    DestinationUrl,
    Hint,
    StrictModel,
    checked_body,
    component_ref,
    given,
    non_null,
    refusal,
    refusals,
    settings_of,
)
from server.multipart import FILE_FIELD, MultipartUpload, UploadedFile
from server.query import BLANK_IS_ABSENT

MAX_METADATA_BYTES = 4096
MAX_FILES_PER_REQUEST = 50


def _parsed_operations(raw: object) -> list[dict[str, Any]]:
    if isinstance(raw, list) and len(raw) <= MAX_CHAIN_LENGTH:
        # A partner sends the same chain with every image: one checked before is not checked again.
        checked: list[dict[str, Any]] = json.loads(_checked_chain(json.dumps(raw)))
        return checked
    return _checked_operations(raw)


@functools.lru_cache(maxsize=1024)
def _checked_chain(chain: str) -> str:
    """The chain sent (as JSON, which tells 1, 1.0 and true apart), checked, as JSON: a refused one is
    not kept."""
    return json.dumps(_checked_operations(json.loads(chain)))


def _checked_operations(raw: object) -> list[dict[str, Any]]:
    try:
        return [operation.to_json() for operation in parse_operations(raw)]
    except ValidationFailed as exc:
        raise refusals(exc.errors) from None


def _checked_metadata(raw: object) -> object:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise refusal("must be a JSON object")
    if len(json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
        raise refusal(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return raw


def _retention(raw: object, info: ValidationInfo) -> int:
    """The `retention` asked for (a JSON number, or its text), which may shorten the configured one but
    never lengthen it."""
    longest = settings_of(info).image_retention
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
    raise refusal(f"must be whole seconds from {shortest} to {longest}")


# The fields of the bodies, as models take them.
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
Retention = Annotated[
    int,
    BeforeValidator(_retention),
    Hint("must be whole seconds"),
    WithJsonSchema(
        {
            "type": "integer",
            "minimum": MIN_IMAGE_RETENTION_SECONDS,
            "description": "Seconds the image is kept after its upload: at most DARKROOM_IMAGE_RETENTION,"
            " the default",
        }
    ),
]
_OPERATIONS = Field(description="Applied in order; when none are given, the batch's (if any)")


class ImageChoices(StrictModel):
    """What every body making or starting an image may choose: how it is processed, who is told of it,
    what it carries back."""

    operations: Annotated[Operations | None, _OPERATIONS] = None
    callback_url: Annotated[
        DestinationUrl | None, BLANK_IS_ABSENT, Field(description="Receives this image's events")
    ] = None
    metadata: Metadata | None = None


class KeptImage(ImageChoices):
    """A new image: how long it is kept, besides its choices."""

    retention: Annotated[Retention | None, BLANK_IS_ABSENT] = None

    def kept_seconds(self, settings: Settings) -> int:
        return settings.image_retention if self.retention is None else self.retention


class BatchableImage(KeptImage):
    """A new image sent on its own, which may join a batch."""

    batch_id: Annotated[
        StrictStr | None,
        BLANK_IS_ABSENT,
        Hint("must be a string"),
        Field(description="An open batch to join (its operations apply when none are given)"),
    ] = None


class _JsonText:
    """A form field's value given as JSON text: decoded as a JSON body is, its schema a string of JSON of
    the value's schema."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_before_validator_function(_decoded, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "contentMediaType": "application/json", "contentSchema": handler(schema)}


def _decoded(text: object, info: ValidationInfo) -> object:
    if not isinstance(text, str):
        return text
    name = info.field_name or ""
    try:
        return parse_json(text, name)
    except InvalidJson as exc:
        raise refusal(f"is not valid JSON: {exc}") from None
    except ValidationFailed as exc:
        raise refusals(exc.errors) from None


JSON_TEXT = _JsonText()
FilePart = Annotated[InstanceOf[UploadedFile], WithJsonSchema({"type": "string", "format": "binary"})]


def _form_schema(schema: dict[str, Any]) -> None:
    """A form field is sent, or not: none is null."""
    schema["properties"] = {name: non_null(field) for name, field in schema["properties"].items()}


class FormFields(StrictModel):
    """A multipart form's fields (mixed in before the model whose fields they are): the JSON ones as
    JSON text; a field left blank is not given."""

    model_config = ConfigDict(json_schema_extra=_form_schema)

    operations: Annotated[Annotated[Operations, JSON_TEXT] | None, _OPERATIONS] = None
    metadata: Annotated[Metadata, JSON_TEXT] | None = None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_not_given(cls, fields: Any) -> Any:
        if not isinstance(fields, dict):
            return fields
        return {
            name: value
            for name, value in fields.items()
            if not (name in cls.model_fields and isinstance(value, str) and not value.strip())
        }


Form = TypeVar("Form", bound=FormFields)


async def checked_form(model: type[Form], upload: MultipartUpload, settings: Settings) -> Form:
    """The form read into `model`: its text fields, and its file parts listed by name (`file` always, so
    that a form without one is told what to send). A 422 names every problem, the envelope's first."""
    files: dict[str, list[UploadedFile]] = {FILE_FIELD: []}
    for part in upload.files:
        files.setdefault(part.field_name, []).append(part)
    return await checked_body(
        model,
        {**upload.fields, **files},
        settings,
        urls=given(upload.fields, "callback_url"),
        found=upload.errors,
    )


class FromUrl(StrictModel):
    """An image a worker fetches (mixed in after the model of its other fields, so that it comes first)."""

    source_url: Annotated[
        DestinationUrl, Field(description="http or https, public addresses only; fetched by a worker")
    ]
