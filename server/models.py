"""Pydantic models of what partners send (query parameters, JSON bodies): one definition both validates a
request and describes it in `/openapi.json`, and its refusals are named the way every 422 names them
(`errors: [{field, message}]`, one message per field).

A field's message is said by its `Hint`, or else from its schema (its choices, its range); a validator
whose message depends on the value raises `refusal(...)`, whose text is then the message, or
`refusals(...)` naming paths inside the field (`operations[0].params.width`).

A field whose schema is a component of `/openapi.json` (an operation chain) says so with
`component_ref(name)` in its schema, which the document turns into a `$ref`.

Bodies are validated with the `Settings` as their context (`checked_body`): some checks depend on them (a
URL we are to call, how long an image may be kept).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from jobs.params import FieldError
from jobs.settings import Settings
from server.destinations import MAX_URL_LENGTH, host_problem, url_problem
from server.problems import validation_problem

_REFUSAL = "refused"
UNHINTED = "is not valid"
_ERRORS = "errors"
COMPONENT_REF = "x-component"


class StrictModel(BaseModel):
    """Frozen, and refusing fields it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Hint:
    """What a field must be, said to the partner when it is not."""

    text: str


Body = TypeVar("Body", bound=BaseModel)


def settings_of(info: ValidationInfo) -> Settings:
    """The settings a body is validated with (its context)."""
    settings = info.context
    assert isinstance(settings, Settings), "validate bodies with the Settings as their context"
    return settings


def _callable_url(url: str, info: ValidationInfo) -> str:
    if problem := url_problem(url, settings_of(info)):
        raise refusal(problem)
    return url


# A URL we are to call, judged from its text; its host is resolved once the body is valid (checked_body's
# `urls`).
DestinationUrl = Annotated[
    StrictStr,
    AfterValidator(_callable_url),
    Hint("must be a string"),
    WithJsonSchema({"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH}),
]


def refusal(message: str) -> PydanticCustomError:
    """Raise from a validator: `message` is what the partner is told about the field."""
    return PydanticCustomError(_REFUSAL, message)


def refusals(errors: Sequence[FieldError]) -> PydanticCustomError:
    """Raise from a validator whose checks name their own fields (each error is told as it is)."""
    return PydanticCustomError(_REFUSAL, "; ".join(error.message for error in errors), {_ERRORS: errors})


def component_ref(name: str) -> dict[str, str]:
    """Stands in a field's schema for `#/components/schemas/{name}` (pydantic resolves `$ref`s itself)."""
    return {COMPONENT_REF: name}


def _field_name(path: str) -> str:
    """The field a path names (`operations[0].params.width`: operations)."""
    return re.split(r"[.\[]", path)[0]


def in_field_order(model: type[BaseModel], errors: Sequence[FieldError]) -> list[FieldError]:
    """`errors` (some found after the model's, such as a URL's host not resolving) in the order of the
    model's fields, unknown fields last."""
    position = {name: index for index, name in enumerate(model.model_fields)}
    return sorted(errors, key=lambda error: position.get(_field_name(error.field), len(position)))


def field_errors(model: type[BaseModel], invalid: ValidationError, *, unknown: str) -> list[FieldError]:
    """One error per field of `invalid`, in the model's order, then the fields `model` does not take
    (told `unknown`)."""
    strangers: list[str] = []
    said: dict[str, str] = {}
    nested: dict[str, list[FieldError]] = {}
    for error in invalid.errors():
        name = str(error["loc"][0])
        if error["type"] == "extra_forbidden":
            strangers.append(name)
        elif name not in said:
            if error["type"] == "missing":
                said[name] = "is required"
            elif error["type"] == _REFUSAL:
                nested[name] = list(error.get("ctx", {}).get(_ERRORS, ()))
                said[name] = error["msg"]
            else:
                said[name] = hint(model, name)
    errors: list[FieldError] = []
    for name in model.model_fields:
        if name in said:
            errors += nested.get(name) or [FieldError(name, said[name])]
    return errors + [FieldError(name, unknown) for name in sorted(strangers)]


def given(body: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """The values `body` gives its fields `names` (for checked_body's `urls`)."""
    return {name: body[name] for name in names if name in body}


async def checked_body(
    model: type[Body],
    body: Mapping[str, Any],
    settings: Settings,
    *,
    urls: Mapping[str, Any] | None = None,
    found: Sequence[FieldError] = (),
) -> Body:
    """`body` read into `model`, and the hosts of the URLs it gives (`urls`: each field's path and value as
    sent) resolved: a 422 naming every problem, those `found` before first (a field they name is not
    named again)."""
    errors: list[FieldError] = []
    try:
        checked = model.model_validate(body, context=settings)
    except ValidationError as invalid:
        errors = field_errors(model, invalid, unknown="unknown field")
    refused = {error.field for error in [*found, *errors]}
    for path, url in (urls or {}).items():
        # The model judged each URL's text: one it refused, or took as not given (blank), is not resolved.
        unresolved = isinstance(url, str) and url.strip() and path not in refused
        if unresolved and (problem := await host_problem(url, settings)):
            errors.append(FieldError(path, problem))
    named = {_field_name(error.field) for error in found}
    errors = [error for error in errors if _field_name(error.field) not in named]
    if found or errors:
        raise validation_problem([*found, *in_field_order(model, errors)])
    return checked


@functools.cache
def _properties(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema properties, built once: pydantic builds the whole schema on every call, and a
    refused request asks once for each field it got wrong."""
    properties: dict[str, Any] = model.model_json_schema()["properties"]
    return properties


def hint(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    stated = next(
        (item for item in _metadata(field.metadata, field.annotation) if isinstance(item, Hint)), None
    )
    if stated is not None:
        return stated.text
    schema = non_null(_properties(model)[name])
    if "enum" in schema:
        return f"must be one of: {', '.join(str(choice) for choice in schema['enum'])}"
    if schema.get("type") == "integer":
        return f"must be an integer from {schema['minimum']} to {schema['maximum']}"
    if schema.get("type") == "boolean":
        return "must be true or false"
    # Still a 422 (tests/test_query_params.py checks that no field of ours comes to this).
    return UNHINTED


def _metadata(outer: Sequence[Any], annotation: Any) -> list[Any]:
    """A field's metadata, then that of the types it is made of (an optional field's `Annotated[str, …]`)."""
    found = list(outer)
    pending = [annotation]
    while pending:
        kind = pending.pop()
        if get_origin(kind) is Annotated:
            inner, *extras = get_args(kind)
            found += extras
            pending.append(inner)
        else:
            pending += get_args(kind)
    return found


def non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field's schema without its `null` (a query parameter is given, or not)."""
    choices = [choice for choice in schema.get("anyOf", ()) if choice != {"type": "null"}]
    if len(choices) != 1:
        return schema
    rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
    return {**choices[0], **rest}


def without_defaults(schema: dict[str, Any]) -> None:
    """For a model of changes (a PATCH): a field left out is left as it is, not set to a default."""
    schema.pop("required", None)
    defaults_unsaid(schema)


def defaults_unsaid(schema: dict[str, Any]) -> None:
    """A model's schema without its fields' defaults (a field left out is not set to one)."""
    for field in schema.get("properties", {}).values():
        field.pop("default", None)
