"""Query parameters: every route refuses the ones it does not declare, and each is given at most once."""

from __future__ import annotations

import re

import httpx
import pytest
from pydantic import BaseModel
from starlette.routing import Route

from jobs.ids import new_id
from jobs.settings import Settings
from server.app import create_app
from server.models import UNHINTED, StrictModel, hint
from tests.conftest import Partner
from tests.test_images_api import upload_many
from tests.test_upload_validation import assert_problem

# The bucket's redirect after a form POST appends parameters of its own (S3: bucket, key, etag).
TAKES_ANY_QUERY = {"/v1/uploads/{upload_id}/landed"}
ID_PREFIXES = {"image_id": "img", "batch_id": "bat", "msg_id": "msg", "endpoint_id": "ep", "upload_id": "upl"}


def with_ids(path: str) -> str:
    """`path` with its id parameters filled with well-formed ids (of nothing), others with their name."""
    return re.sub(
        r"\{(\w+)\}", lambda name: new_id(ID_PREFIXES[name[1]]) if name[1] in ID_PREFIXES else name[1], path
    )


async def test_every_route_refuses_a_query_parameter_it_does_not_declare(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    checked = 0
    for route in create_app(settings).routes:
        assert isinstance(route, Route)
        if route.path in TAKES_ANY_QUERY:
            continue
        path = with_ids(route.path)
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            response = await client.request(method, f"{path}?limt=5&zoom=2", headers=account.headers)
            problem = assert_problem(response, 422, "unknown_query_parameter", fields=["limt", "zoom"])
            assert "limt, zoom" in problem["detail"], problem
            checked += 1
    assert checked > 30


async def test_the_refusal_names_the_parameters_the_route_takes(
    client: httpx.AsyncClient, account: Partner
) -> None:
    response = await client.get("/v1/images?limt=5", headers=account.headers)
    problem = assert_problem(response, 422, "unknown_query_parameter", fields=["limt"])
    assert "limit, cursor, status, batch_id" in problem["detail"]
    response = await client.get("/healthz?verbose=1")
    problem = assert_problem(response, 422, "unknown_query_parameter", fields=["verbose"])
    assert "takes: none" in problem["detail"]


async def test_a_redirect_from_the_bucket_may_add_its_own_parameters(
    client: httpx.AsyncClient, account: Partner
) -> None:
    """Not refused as unknown: the signature is what decides (and this one is not ours)."""
    upload_id = new_id("upl")
    response = await client.get(
        f"/v1/uploads/{upload_id}/landed?expires=1&signature=x&bucket=b&key=k&etag=%22e%22"
    )
    assert_problem(response, 403, "upload_url_invalid")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/images/{image_id}/output?width=10&width=20", "width"),
        ("/v1/deliveries?event_type=image.failed&event_type=image.completed", "event_type"),
        ("/v1/batches?cursor=&cursor=", "cursor"),
    ],
)
async def test_a_single_valued_parameter_given_twice_is_422(
    client: httpx.AsyncClient, account: Partner, path: str, field: str
) -> None:
    response = await client.get(with_ids(path), headers=account.headers)
    problem = assert_problem(response, 422, "validation_failed", fields=[field])
    assert problem["errors"] == [{"field": field, "message": "must be given at most once"}]


async def test_every_problem_of_a_query_is_reported_at_once(
    client: httpx.AsyncClient, account: Partner
) -> None:
    response = await client.get(
        "/v1/deliveries?limit=0&status=lost&endpoint_id=ep_x&created_after=yesterday&status=failed",
        headers=account.headers,
    )
    problem = assert_problem(response, 422, "validation_failed")
    assert problem["errors"] == [
        {"field": "status", "message": "must be given at most once"},
        {"field": "limit", "message": "must be an integer from 1 to 100"},
        {"field": "endpoint_id", "message": "must be an endpoint id (ep_…)"},
        {
            "field": "created_after",
            "message": 'must be an RFC 3339 time with a zone, like "2026-11-21T10:00:00Z"',
        },
    ]


async def test_images_are_listed_by_batch_id_and_a_malformed_one_is_422(
    client: httpx.AsyncClient, account: Partner
) -> None:
    await upload_many(client, account, 1)
    everything = await client.get("/v1/images?batch_id=", headers=account.headers)
    assert everything.status_code == 200, everything.text
    assert len(everything.json()["data"]) == 1
    none_of_them = await client.get(f"/v1/images?batch_id={new_id('bat')}", headers=account.headers)
    assert none_of_them.json()["data"] == []
    malformed = await client.get("/v1/images?batch_id=batch-1", headers=account.headers)
    problem = assert_problem(malformed, 422, "validation_failed", fields=["batch_id"])
    assert problem["errors"] == [{"field": "batch_id", "message": "must be a batch id (bat_…)"}]


async def test_a_refusal_names_at_most_twenty_unknown_parameters(client: httpx.AsyncClient) -> None:
    query = "&".join(f"p{number:03}=1" for number in range(500))
    problem = assert_problem(await client.get(f"/healthz?{query}"), 422, "unknown_query_parameter")
    assert [error["field"] for error in problem["errors"]] == [f"p{number:03}" for number in range(20)]
    assert "p019 and 480 more" in problem["detail"]


def every_model(base: type[BaseModel]) -> list[type[BaseModel]]:
    found = []
    for model in base.__subclasses__():
        found += [model, *every_model(model)]
    return found


def test_every_field_of_every_model_tells_what_it_must_be() -> None:
    """A refusal names what the field must be: by its Hint, or from its schema's choices or range."""
    models = every_model(StrictModel)
    expected = {"ImageListQuery", "VariantQuery", "NewBatch", "NewEndpoint", "Recovery", "Redelivery"}
    assert {model.__name__ for model in models} >= expected
    unhinted = [
        f"{model.__name__}.{name}"
        for model in models
        for name in model.model_fields
        if hint(model, name) == UNHINTED
    ]
    assert unhinted == []
