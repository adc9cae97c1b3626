"""Parameter models for operations: frozen dataclasses validated from JSON, with their JSON Schema.

A model declares fields with plain types (`int | None`, `bool`, `Literal[...]`) and optional bounds via
`Annotated[int, Bounds(1, 100)]`; `parse` checks a JSON object against them and `json_schema` describes
them, so the validation and the published schema can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, get_args, get_origin


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ValidationFailed(ValueError):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{error.field}: {error.message}" for error in errors))
        self.errors = errors


@dataclass(frozen=True)
class Bounds:
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Pattern:
    """A string field's shape: `regex` must match the whole value; `description` names it for people."""

    regex: str
    description: str


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    kinds: tuple[type, ...]  # int, float, bool, str
    choices: tuple[str | int, ...] | None
    optional: bool
    bounds: Bounds | None
    pattern: Pattern | None
    default: Any
    required: bool


class Params:
    """Base of every operation's parameter model (subclasses are frozen dataclasses)."""

    _specs: ClassVar[tuple[_FieldSpec, ...]]
    _names: ClassVar[frozenset[str]]

    def problems(self) -> Iterator[FieldError]:
        """Checks across fields; field names are relative to `params`."""
        return iter(())

    @classmethod
    def parse(cls, raw: object, location: str) -> Self:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValidationFailed([FieldError(location, "must be an object")])
        errors: list[FieldError] = []
        values: dict[str, Any] = {}
        specs = cls._field_specs()
        known = cls._names
        errors.extend(
            FieldError(f"{location}.{name}", "unknown parameter") for name in raw if name not in known
        )
        for spec in specs:
            where = f"{location}.{spec.name}"
            if spec.name not in raw:
                if spec.required:
                    errors.append(FieldError(where, "is required"))
                continue
            try:
                values[spec.name] = _coerce(spec, raw[spec.name])
            except ValueError as exc:
                errors.append(FieldError(where, str(exc)))
        if errors:
            raise ValidationFailed(errors)
        instance = cls(**values)
        cross = [
            FieldError(f"{location}.{e.field}" if e.field else location, e.message)
            for e in instance.problems()
        ]
        if cross:
            raise ValidationFailed(cross)
        return instance

    def to_json(self) -> dict[str, Any]:
        return {
            spec.name: getattr(self, spec.name)
            for spec in self._field_specs()
            if getattr(self, spec.name) is not None
        }

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for spec in cls._field_specs():
            json_type = _JSON_TYPES[spec.kinds[0]]
            schema: dict[str, Any] = {"type": [json_type, "null"] if spec.optional else json_type}
            if spec.choices is not None:
                schema["enum"] = [*spec.choices, None] if spec.optional else list(spec.choices)
            if spec.bounds is not None:
                if spec.bounds.minimum is not None:
                    schema["minimum"] = spec.bounds.minimum
                if spec.bounds.maximum is not None:
                    schema["maximum"] = spec.bounds.maximum
            if spec.pattern is not None:
                # JSON Schema patterns are unanchored; ours match the whole value.
                schema["pattern"] = f"^(?:{spec.pattern.regex})$"
            if spec.default is not None and spec.default is not dataclasses.MISSING:
                schema["default"] = spec.default
            properties[spec.name] = schema
        required = [spec.name for spec in cls._field_specs() if spec.required]
        schema_out: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            schema_out["required"] = required
        return schema_out

    @classmethod
    def _field_specs(cls) -> tuple[_FieldSpec, ...]:
        cached = cls.__dict__.get("_specs")
        if cached is None:
            cached = tuple(_spec_for(cls, field) for field in dataclasses.fields(cls))  # type: ignore[arg-type]
            cls._specs = cached
            cls._names = frozenset(spec.name for spec in cached)
        return cached


_JSON_TYPES: dict[type, str] = {int: "integer", float: "number", bool: "boolean", str: "string"}


def _spec_for(model: type, field: dataclasses.Field[Any]) -> _FieldSpec:
    hint = typing.get_type_hints(model, include_extras=True)[field.name]
    bounds = pattern = None
    if get_origin(hint) is typing.Annotated:
        hint, *extras = get_args(hint)
        bounds = next((extra for extra in extras if isinstance(extra, Bounds)), None)
        pattern = next((extra for extra in extras if isinstance(extra, Pattern)), None)
    optional = False
    if get_origin(hint) in (typing.Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        optional = len(members) < len(get_args(hint))
        (hint,) = members
    choices = None
    kinds: tuple[type, ...]
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        # One JSON type per field: `Literal[2, 4, 8]` takes the numbers 2, 4, 8 and not the strings.
        literal_kinds = {type(choice) for choice in choices}
        if len(literal_kinds) != 1 or not literal_kinds <= {str, int}:
            raise TypeError(f"{model.__name__}.{field.name}: Literal choices must be all str or all int")
        kinds = (literal_kinds.pop(),)
    elif hint is float:
        kinds = (float, int)
    elif hint in (int, bool, str):
        kinds = (hint,)
    else:
        raise TypeError(f"{model.__name__}.{field.name}: unsupported parameter type {hint!r}")
    if pattern is not None and kinds != (str,):
        raise TypeError(f"{model.__name__}.{field.name}: a Pattern applies to str fields only")
    has_default = field.default is not dataclasses.MISSING
    return _FieldSpec(
        name=field.name,
        kinds=kinds,
        choices=choices,
        optional=optional,
        bounds=bounds,
        pattern=pattern,
        default=field.default if has_default else None,
        required=not has_default,
    )


def _coerce(spec: _FieldSpec, value: object) -> object:
    if value is None:
        if spec.optional:
            return None
        raise ValueError("must not be null")
    # bool is an int in Python, but `true` is not a width.
    if isinstance(value, bool) and bool not in spec.kinds:
        raise ValueError(f"must be {_describe(spec)}")
    if not isinstance(value, spec.kinds):
        raise ValueError(f"must be {_describe(spec)}")
    # JSON has no NaN or Infinity, but Python's json module reads them, and NaN passes every bound.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"must be {_describe(spec)}")
    if spec.bounds is not None and isinstance(value, int | float):
        low, high = spec.bounds.minimum, spec.bounds.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(_out_of_bounds(low, high))
    if spec.pattern is not None and isinstance(value, str) and not re.fullmatch(spec.pattern.regex, value):
        raise ValueError(f"must be {spec.pattern.description}")
    if spec.kinds[0] is float and isinstance(value, int):
        return float(value)
    return value


def _describe(spec: _FieldSpec) -> str:
    if spec.choices is not None:
        return f"one of: {', '.join(str(choice) for choice in spec.choices)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[spec.kinds[0]]


def _out_of_bounds(low: float | None, high: float | None) -> str:
    # An open end is no number to quote: "between 0 and any" read as if any value passed.
    if low is not None and high is not None:
        return f"must be between {_number(low)} and {_number(high)}"
    if low is not None:
        return f"must be at least {_number(low)}"
    assert high is not None, "a value is out of bounds only where one is set"
    return f"must be at most {_number(high)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
