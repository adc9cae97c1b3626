"""/metrics counts what every process did; /openapi.json describes exactly what the API validates."""

from __future__ import annotations

from typing import Any

import httpx
from openapi_spec_validator import validate
from starlette.routing import Route

from jobs.ops.geometry import ResizeParams
from jobs.settings import Settings
from server.app import create_app
from tests import imagegen
from tests.conftest import Partner, run_burst
from tests.receiver import Receiver
from tests.test_spine import upload


async def test_metrics_count_uploads_outcomes_and_deliveries(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
    await upload(client, account, imagegen.truncated_jpeg(), callback_url=receiver.url)
    receiver.script(500)

    await run_burst(settings)

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    assert "darkroom_images_uploaded_total 2" in lines
    assert 'darkroom_images_finished_total{status="completed"} 1' in lines
    assert 'darkroom_images_finished_total{status="failed"} 1' in lines
    assert 'darkroom_images_failed_total{code="corrupt_image"} 1' in lines
    assert 'darkroom_webhook_attempts_total{outcome="failed"} 1' in lines
    assert 'darkroom_webhook_attempts_total{outcome="delivered"} 2' in lines
    assert "darkroom_queue_jobs 0" in lines
    assert "darkroom_webhooks_pending 0" in lines


async def test_openapi_publishes_the_operation_schemas(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    schemas = spec["components"]["schemas"]
    assert schemas["Operation_resize"]["properties"]["params"] == ResizeParams.json_schema()
    width = schemas["Operation_resize"]["properties"]["params"]["properties"]["width"]
    assert (width["minimum"], width["maximum"]) == (1, 16384)
    assert "post" in spec["paths"]["/v1/images"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text


async def test_openapi_describes_every_route(client: httpx.AsyncClient, settings: Settings) -> None:
    """A route added without its description would be invisible in /docs and to generated clients (a
    route serving no API, such as a page's assets, says so with include_in_schema=False)."""
    spec = (await client.get("/openapi.json")).json()
    described = {
        (path, method) for path, item in spec["paths"].items() for method in item if method != "parameters"
    }
    app = create_app(settings)
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route) and route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served - described == set()
    assert described - served == set()


async def test_openapi_is_a_valid_openapi_3_1_document(client: httpx.AsyncClient) -> None:
    validate((await client.get("/openapi.json")).json())


def query_parameters(operation: dict[str, Any]) -> dict[str, Any]:
    return {
        parameter["name"]: parameter
        for parameter in operation["parameters"]
        if parameter.get("in") == "query"
    }


async def test_openapi_query_parameters_are_the_ones_each_route_validates(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    listing = query_parameters(spec["paths"]["/v1/images"]["get"])
    assert list(listing) == ["limit", "cursor", "status", "batch_id"]
    assert listing["batch_id"]["schema"]["pattern"].startswith("^bat_")
    assert listing["status"]["schema"]["enum"] == ["queued", "processing", "completed", "failed"]
    assert (listing["limit"]["schema"]["minimum"], listing["limit"]["schema"]["maximum"]) == (1, 100)
    width = query_parameters(spec["paths"]["/v1/images/{image_id}/output"]["get"])["width"]
    assert width["schema"] == {"type": "integer", "minimum": 1, "maximum": 16384}
    # A route without a model takes no query parameter, and says so by listing none; every route
    # documents the 422 its unknown ones get.
    assert query_parameters(spec["paths"]["/v1/images/{image_id}"]["get"]) == {}
    assert "422" in spec["paths"]["/v1/images/{image_id}"]["get"]["responses"]


async def test_openapi_documents_the_headers_every_route_takes_and_answers(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operations = [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    ]
    for path, method, operation in operations:
        taken = {parameter.get("$ref", "").rpartition("/")[2] for parameter in operation["parameters"]}
        assert "RequestId" in taken, (path, method)
        assert ("IdempotencyKey" in taken) == (method == "post"), (path, method)
        for response in operation["responses"].values():
            assert "X-Request-Id" in response["headers"], (path, method)
        if path.startswith("/v1/"):
            limited = operation["responses"]["429"]
            assert "Retry-After" in limited["headers"] and "X-RateLimit-Remaining" in limited["headers"]
    uploads = spec["paths"]["/v1/uploads"]["post"]["responses"]
    assert "idempotency_key_in_use" in uploads["409"]["description"]
    assert "idempotency_key_reused" in uploads["422"]["description"]
    header_names = {parameter["name"] for parameter in spec["components"]["parameters"].values()}
    assert header_names == {"X-Request-Id", "Idempotency-Key"}
