"""JSON from partners, read strictly, and JSON request bodies: capped in size, an object, or a clear problem.

Every JSON the API accepts — request bodies and JSON form fields — goes through `parse_json`. Python's
reader takes more than a response can give back: `NaN` and `Infinity`, numbers such as `1e309` that
overflow to infinity, integers too long to convert, `\\ud800` escapes that are no Unicode text, and
nesting almost as deep as the interpreter's recursion limit (which writing it back out, a few frames
deeper, then exceeds). Any of them stored would make every later rendering of the resource (responses,
webhooks) fail, so they are refused here, each named by its path, before anything is accepted.

Most JSON plainly holds none of them: pydantic-core's reader (in Rust, which refuses `NaN`, `Infinity`
and half surrogate pairs itself) reads that at a fraction of the cost, leaving the rest to Python's.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema
from pydantic_core import from_json
from starlette.requests import Request

from jobs.params import FieldError, ValidationFailed
from server.models import Hint
from server.problems import Problem, validation_problem
from webhooks.messages import iso

MAX_JSON_BODY_BYTES = 64 * 1024
# Far more than any request needs (an operation chain is 4 deep), far less than the recursion limit.
MAX_JSON_DEPTH = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_FORMAT_HINT = 'must be an RFC 3339 time with a zone, like "2026-11-21T10:00:00Z"'
# Python reads far more (`20261121T1000Z`, offsets with seconds); partners are promised RFC 3339, with
# the seconds optional as ISO 8601 has them (`2026-11-21T10:00Z` was always accepted).
_RFC3339_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
# What may be a number that overflows or has too many digits: any exponent, any long run of digits (a
# number of fewer than 300 digits without one is a finite float, or an integer Python converts).
_NUMBER_TO_CHECK = re.compile(rb"[0-9](?:[eE]|[0-9]{299})")
# Enough to fix a request; a hostile one would otherwise get a problem document as large as itself.
MAX_REPORTED_VALUES = 20


class InvalidJson(ValueError):
    """The text is not JSON (the message says why and where)."""


@dataclass(frozen=True)
class _Refused:
    """Stands in for a value the reader met but will not accept, so the walk can name its path."""

    message: str


def _number(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"must be a finite number ({text} is out of range)")


def _integer(text: str) -> int | _Refused:
    try:
        return int(text)
    except ValueError:  # longer than the interpreter converts: sys.get_int_max_str_digits()
        return _Refused(f"must be a number of at most {sys.get_int_max_str_digits()} digits")


def _constant(name: str) -> _Refused:
    return _Refused(f"must be a finite number ({name} is not JSON)")


def parse_json(raw: str | bytes, field: str = "") -> Any:
    """`raw` as JSON, refusing what could not be given back. `field` names the value in errors ("" for a
    request body, whose members are then named by themselves).

    Raises InvalidJson for text that is not JSON, ValidationFailed naming each refused value."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # Too few brackets to nest too deep, and no number to check: what Rust's reader takes, Python's
    # strict reading would take too, and find nothing to refuse in.
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH and not _NUMBER_TO_CHECK.search(data):
        try:
            return from_json(data, allow_inf_nan=False)
        except ValueError:
            pass  # Python's reader says what is wrong, and where
    try:
        value = json.loads(raw, parse_float=_number, parse_int=_integer, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError:
        raise InvalidJson("it is not UTF-8 text") from None
    except RecursionError:
        raise ValidationFailed([_too_deep(field)]) from None
    if errors := _refused_values(value, field):
        raise ValidationFailed(errors)
    return value


def _refused_values(value: Any, root: str) -> list[FieldError]:
    """Each refused number and each string or key that is not Unicode text, in document order.

    A loop, not recursion: the reader accepts nesting as deep as the interpreter's recursion limit."""
    errors: list[FieldError] = []
    pending: list[tuple[str, Any, int]] = [(root, value, 1)]
    while pending and len(errors) < MAX_REPORTED_VALUES:
        path, item, depth = pending.pop()
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            errors.append(_too_deep(path))
        elif isinstance(item, _Refused):
            errors.append(FieldError(path or "body", item.message))
        elif isinstance(item, str):
            if surrogate := _SURROGATE.search(item):
                errors.append(
                    FieldError(
                        path or "body",
                        f"must be valid Unicode text ({_escaped(surrogate[0])} is half of a UTF-16 pair)",
                    )
                )
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                if surrogate := _SURROGATE.search(key):
                    errors.append(
                        FieldError(
                            path or "body",
                            "keys must be valid Unicode text "
                            f"({_escaped(surrogate[0])} is half of a UTF-16 pair)",
                        )
                    )
                children.append((f"{path}.{_escaped(key)}" if path else _escaped(key), child, depth + 1))
            pending.extend(reversed(children))
        elif isinstance(item, list):
            pending.extend(
                reversed([(f"{path}[{index}]", child, depth + 1) for index, child in enumerate(item)])
            )
    return errors


def _too_deep(path: str) -> FieldError:
    return FieldError(path or "body", f"must be nested at most {MAX_JSON_DEPTH} arrays or objects deep")


def _escaped(text: str) -> str:
    """`text` as it can be shown in a response: a lone surrogate as its `\\udc00` escape."""
    return text.encode("utf-8", "backslashreplace").decode()


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, in lower case ("" when there is none)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` when `optional`."""
    content_type = media_type(request)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_JSON_BODY_BYTES:
            raise Problem(413, "body_too_large", f"a JSON body is at most {MAX_JSON_BODY_BYTES} bytes")
    if not body.strip():
        if optional:
            return {}
        raise Problem(422, "body_required", "send a JSON object (Content-Type: application/json)")
    if content_type not in ("application/json", ""):
        raise Problem(415, "unsupported_media_type", "send the body as application/json")
    try:
        value = parse_json(bytes(body))
    except InvalidJson as exc:
        raise Problem(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except ValidationFailed as exc:
        raise validation_problem(exc.errors) from None
    if not isinstance(value, dict):
        raise Problem(422, "invalid_json", "the body must be a JSON object")
    return value


def _rfc3339_time(value: object) -> object:
    if value is None:
        return None
    time = canonical_time(value)
    if time is None:
        raise ValueError("not an RFC 3339 time")
    return time


# A time as models take it: given back in the resources' own form.
Rfc3339Time = Annotated[
    str,
    BeforeValidator(_rfc3339_time),
    Hint(TIME_FORMAT_HINT),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def canonical_time(value: object) -> str | None:
    """An RFC 3339 time (`format: date-time`: a zone, the seconds optional), in the resources' own form (UTC,
    milliseconds, Z): those compare correctly as text. None when it is not one, or when it falls
    outside the years 1 to 9999 once moved to UTC (`0001-01-01T00:00:00+00:01` is in year 0)."""
    if not isinstance(value, str) or not _RFC3339_TIME.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value.upper())  # RFC 3339 allows a lowercase t and z
        return iso((moment - _EPOCH) // timedelta(milliseconds=1))
    except (ValueError, OverflowError):
        return None
