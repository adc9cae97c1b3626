"""Pydantic models of what partners send (query parameters, JSON bodies): one definition both validates a
request and describes it in `/openapi.json`, and its refusals are named the way every 422 names them
(`errors: [{field, message}]`, one message per field).

A field's message is said by its `Hint`, or else from its schema (its choices, its range); a validator
whose message depends on the value raises `refusal(...)`, whose text is then the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from jobs.params import FieldError

_REFUSAL = "refused"


class StrictModel(BaseModel):
    """Frozen, and refusing fields it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Hint:
    """What a field must be, said to the partner when it is not."""

    text: str


def refusal(message: str) -> PydanticCustomError:
    """Raise from a validator: `message` is what the partner is told about the field."""
    return PydanticCustomError(_REFUSAL, message)


def field_errors(model: type[BaseModel], invalid: ValidationError, *, unknown: str) -> list[FieldError]:
    """One error per field of `invalid`: fields `model` does not take first (told `unknown`), then the
    others in the model's order."""
    strangers: list[str] = []
    said: dict[str, str] = {}
    for error in invalid.errors():
        name = str(error["loc"][0])
        if error["type"] == "extra_forbidden":
            strangers.append(name)
        elif name not in said:
            if error["type"] == "missing":
                said[name] = "is required"
            elif error["type"] == _REFUSAL:
                said[name] = error["msg"]
            else:
                said[name] = hint(model, name)
    return [FieldError(name, unknown) for name in sorted(strangers)] + [
        FieldError(name, said[name]) for name in model.model_fields if name in said
    ]


def hint(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    stated = next((item for item in field.metadata if isinstance(item, Hint)), None)
    if stated is not None:
        return stated.text
    schema = non_null(model.model_json_schema()["properties"][name])
    if "enum" in schema:
        return f"must be one of: {', '.join(str(choice) for choice in schema['enum'])}"
    if schema.get("type") == "integer":
        return f"must be an integer from {schema['minimum']} to {schema['maximum']}"
    if schema.get("type") == "boolean":
        return "must be true or false"
    raise TypeError(f"{model.__name__}.{name} needs a Hint")


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
    for field in schema.get("properties", {}).values():
        field.pop("default", None)
