"""Query parameters: each route declares them as a pydantic model, which both validates them and describes
them in `/openapi.json`.

`@takes_query(Model)` names a route's model and `query_of(request, Model)` reads what it parsed; a route that
names none takes no query parameters at all. `guard_queries` wraps every route of the app, so a parameter a
route does not declare answers 422 `unknown_query_parameter` everywhere (a typo such as `?limt=5` would
otherwise be silently ignored), and a single-valued parameter given twice answers 422 `validation_failed`
rather than being read as one of them. A route that must take parameters it cannot know (a redirect that
another service appends to) names a model with `extra="ignore"`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Annotated, Final, TypeVar

from pydantic import BeforeValidator, StringConstraints, ValidationError
from starlette.datastructures import QueryParams
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from jobs.ids import id_pattern
from jobs.params import FieldError
from server.json_body import MAX_REPORTED_VALUES
from server.models import StrictModel, field_errors
from server.problems import Problem, validation_problem

_MODEL_ATTRIBUTE: Final = "darkroom_query_model"
_PARSED_KEY: Final = "darkroom.query"
MAX_INTEGER_DIGITS = 9


class QueryModel(StrictModel):
    """Base of every route's query model."""


class NoQuery(QueryModel):
    """The model of every route that names none."""


def _blank_is_absent(value: object) -> object:
    """`?status=` filters by nothing, as leaving the parameter out does."""
    return None if value == "" else value


def _ascii_integer(value: object) -> object:
    """Only plain ASCII digits: `int()` also reads " 7", "+7", "7_0" and other scripts' digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_INTEGER_DIGITS:
        return int(value)
    raise ValueError("not an integer")


def _true_or_false(value: object) -> object:
    if value in ("true", "false"):
        return value == "true"
    raise ValueError("not true or false")


# After an integer's bounds, so they stay in its schema: `Annotated[int, Field(ge=1, le=9), ASCII_INTEGER]`.
ASCII_INTEGER = BeforeValidator(_ascii_integer)
QueryBoolean = Annotated[bool, BeforeValidator(_true_or_false)]
# Wraps an optional parameter's type: `Annotated[X | None, BLANK_IS_ABSENT] = None`.
BLANK_IS_ABSENT = BeforeValidator(_blank_is_absent)

ImageId = Annotated[str, StringConstraints(pattern=id_pattern("img"))]
BatchId = Annotated[str, StringConstraints(pattern=id_pattern("bat"))]
MessageId = Annotated[str, StringConstraints(pattern=id_pattern("msg"))]
EndpointId = Annotated[str, StringConstraints(pattern=id_pattern("ep"))]

Model = TypeVar("Model", bound=QueryModel)
Endpoint = TypeVar("Endpoint")


def takes_query(model: type[QueryModel]) -> Callable[[Endpoint], Endpoint]:
    """Declare the query parameters of a route's endpoint (a function, or an ASGI app mounted)."""

    def declare(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _MODEL_ATTRIBUTE, model)
        return endpoint

    return declare


def query_model(endpoint: object) -> type[QueryModel]:
    model: type[QueryModel] = getattr(endpoint, _MODEL_ATTRIBUTE, NoQuery)
    return model


def query_of(request: Request, model: type[Model]) -> Model:
    """The query parameters the route's guard parsed (the route must take `model`)."""
    parsed = request.scope[_PARSED_KEY]
    assert isinstance(parsed, model), f"{request.url.path} does not take {model.__name__}"
    return parsed


def parse_query(model: type[Model], query: QueryParams) -> Model:
    """`query` read into `model`, or a 422 naming every problem at once: `unknown_query_parameter` when a
    parameter is not the route's (a typo is the likeliest), else `validation_failed`."""
    known = model.model_fields
    strangers = [] if model.model_config.get("extra") != "forbid" else sorted(set(query) - set(known))
    # Enough to fix a request: a URL of a thousand made-up names gets no problem a thousand long.
    unknown = strangers[:MAX_REPORTED_VALUES]
    repeated = sorted(name for name in set(query) & set(known) if len(query.getlist(name)) > 1)
    errors = [FieldError(name, "unknown query parameter") for name in unknown]
    errors += [FieldError(name, "must be given at most once") for name in repeated]
    given = {name: query[name] for name in known if name in query and name not in repeated}
    try:
        parsed = model.model_validate(given)
    except ValidationError as invalid:
        errors += field_errors(model, invalid, unknown="unknown query parameter")
    else:
        if not errors:
            return parsed
    if unknown:
        takes = ", ".join(known) or "none"
        more = f" and {len(strangers) - len(unknown)} more" if len(strangers) > len(unknown) else ""
        detail = f"this route takes no query parameter named {', '.join(unknown)}{more} (it takes: {takes})"
        raise Problem(422, "unknown_query_parameter", detail, errors=errors)
    raise validation_problem(errors)


class _QueryGuard:
    """Parses the query into the route's model before the route runs; refusals are Problems, answered by
    the app's handler as any route's are."""

    def __init__(self, app: ASGIApp, model: type[QueryModel]) -> None:
        self.app = app
        self.model = model
        # Most requests have no query: they share its one (frozen) reading, unless the route requires one.
        self.without_query: QueryModel | None = None
        with contextlib.suppress(Problem):
            self.without_query = parse_query(model, QueryParams(""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope["query_string"]
            if query or self.without_query is None:
                scope[_PARSED_KEY] = parse_query(self.model, QueryParams(query))
            else:
                scope[_PARSED_KEY] = self.without_query
        await self.app(scope, receive, send)


def guard_queries(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """`routes` with each one's query checked against its model (new routes: the modules' own are shared
    by every app built)."""
    guarded: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, Route):
            middleware = [Middleware(_QueryGuard, model=query_model(route.endpoint))]
            guarded.append(
                Route(
                    route.path,
                    route.endpoint,
                    methods=route.methods,
                    name=route.name,
                    include_in_schema=route.include_in_schema,
                    middleware=middleware,
                )
            )
        elif isinstance(route, Mount):
            middleware = [Middleware(_QueryGuard, model=query_model(route.app))]
            guarded.append(Mount(route.path, app=route.app, name=route.name, middleware=middleware))
        else:
            raise TypeError(f"no query guard for {route!r}")
    return guarded
