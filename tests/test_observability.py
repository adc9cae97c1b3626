"""/metrics counts what every process did; /openapi.json describes exactly what the API validates."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs import stats
from jobs.ids import is_id
from jobs.logs import TextFormatter
from jobs.ops.geometry import ResizeParams
from jobs.plans import DEFAULT_TIER, TIERS
from jobs.settings import Settings
from server.app import create_app
from server.auth import require_account
from server.embedded_redis import EmbeddedRedis
from server.metrics import RequestCounts
from tests import imagegen
from tests.conftest import Partner, run_burst
from tests.receiver import Receiver
from tests.test_spine import upload


def parsed_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


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
    samples = parsed_metrics(response.text)
    assert samples[sample("darkroom_images_uploaded_total")] == 2
    assert samples[sample("darkroom_images_finished_total", status="completed")] == 1
    assert samples[sample("darkroom_images_finished_total", status="failed")] == 1
    assert samples[sample("darkroom_images_failed_total", code="corrupt_image")] == 1
    assert samples[sample("darkroom_webhook_attempts_total", outcome="failed")] == 1
    assert samples[sample("darkroom_webhook_attempts_total", outcome="delivered")] == 2
    assert samples[sample("darkroom_queue_jobs")] == 0
    assert samples[sample("darkroom_webhooks_pending")] == 0
    uploads = sample("darkroom_http_requests_total", method="POST", route="/v1/images", status="202")
    assert samples[uploads] == 2


async def test_latency_histograms_move_after_one_upload_is_delivered(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    """Workers observe into Redis; the web's /metrics shows what they saw, as Prometheus histograms."""
    before = parsed_metrics((await client.get("/metrics")).text)
    histograms = ("upload_to_webhook", "queue_wait", "render", "webhook_attempt")
    for name in histograms:
        assert before[sample(f"darkroom_{name}_seconds_count")] == 0

    await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
    await run_burst(settings)
    (delivery,) = receiver.deliveries

    after = parsed_metrics((await client.get("/metrics")).text)
    for name in histograms:
        assert after[sample(f"darkroom_{name}_seconds_count")] == 1, name
        assert after[sample(f"darkroom_{name}_seconds_bucket", le="+Inf")] == 1, name
        assert after[sample(f"darkroom_{name}_seconds_sum")] > 0, name
    # Cumulative buckets: a local webhook, from a small image, is delivered within a minute.
    assert after[sample("darkroom_upload_to_webhook_seconds_bucket", le="60.0")] == 1
    assert after[sample("darkroom_render_seconds_bucket", le="120.0")] == 1
    assert delivery.answered == 200


async def test_a_message_sent_again_is_not_observed_again_from_its_upload(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver
) -> None:
    """Upload-to-webhook counts each destination's first 2xx: a retry of a delivered message (the
    receiver lost it) is an attempt, not an upload delivered once more, however late it is asked."""
    await upload(client, account, imagegen.jpeg(), callback_url=receiver.url)
    await run_burst(settings)
    (delivery,) = receiver.deliveries
    retried = await client.post(f"/v1/deliveries/{delivery.id}/retry", headers=account.headers)
    assert retried.status_code == 202, retried.text
    await run_burst(settings)
    assert len(receiver.deliveries) == 2

    samples = parsed_metrics((await client.get("/metrics")).text)
    assert samples[sample("darkroom_webhook_attempt_seconds_count")] == 2
    assert samples[sample("darkroom_upload_to_webhook_seconds_count")] == 1


async def test_requests_counted_while_redis_stalled_are_counted_once() -> None:
    """A Redis that stalls past the web's timeout (a fork on a big dataset, a paused VM) still applies
    the counts sent to it when it wakes: the web, which saw a timeout, sends them again, and they must
    not count twice."""
    with EmbeddedRedis(None) as server:
        stalled = Redis.from_url(server.url, socket_timeout=0.5)
        probe = Redis.from_url(server.url)
        pid = int((await probe.info("server"))["process_id"])
        counts = RequestCounts()
        counts.count("GET", "/v1/images", 200)
        await stalled.ping()  # connected: the counts themselves are sent into the stall
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError):
                await counts.flush(stalled)
        finally:
            os.kill(pid, signal.SIGCONT)
        await counts.flush(stalled)
        assert await stats.read(probe) == {"requests:GET|/v1/images|200": 1}
        await stalled.aclose()
        await probe.aclose()


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
    assert header_names == {"X-Request-Id", "Idempotency-Key", "Prefer"}


async def test_a_request_id_is_echoed_when_usable_and_made_otherwise(client: httpx.AsyncClient) -> None:
    given = await client.get("/healthz", headers={"X-Request-Id": "checkout-7f3a/retry:2"})
    assert given.headers["x-request-id"] == "checkout-7f3a/retry:2"

    made = await client.get("/healthz")
    other = await client.get("/healthz")
    assert is_id("req", made.headers["x-request-id"])
    assert made.headers["x-request-id"] < other.headers["x-request-id"]  # sortable by time

    for unusable in ("x" * 129, "has space", "", "caf\u00e9"):
        replaced = await client.get("/healthz", headers={"X-Request-Id": unusable.encode("utf-8")})
        assert is_id("req", replaced.headers["x-request-id"]), unusable


async def test_problems_name_the_request_id_in_body_and_header(
    client: httpx.AsyncClient, account: Partner
) -> None:
    unauthorized = await client.get("/v1/images", headers={"X-Request-Id": "mine-1"})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["x-request-id"] == "mine-1"
    assert unauthorized.json()["request_id"] == "mine-1"

    no_route = await client.get("/nowhere")
    assert no_route.status_code == 404
    assert no_route.json()["request_id"] == no_route.headers["x-request-id"]

    too_large = await client.post("/v1/batches", headers=account.headers, content=b"[" * 70_000, params={})
    assert too_large.status_code == 413
    assert too_large.json()["request_id"] == too_large.headers["x-request-id"]


async def test_each_request_line_names_its_own_account(
    client: httpx.AsyncClient, account: Partner, caplog: pytest.LogCaptureFixture
) -> None:
    """The in-process app (asgi-lifespan) hands every request the same lifespan-state dict: a request
    without a key must not be logged under the previous request's account."""
    with caplog.at_level(logging.INFO, logger="darkroom.web"):
        await client.get("/v1/images", headers=account.headers)
        await client.get("/v1/images")
    with_key, without_key = (record for record in caplog.records if record.name == "darkroom.web")
    assert (with_key.status, with_key.account_id) == (200, account.id)
    assert (without_key.status, without_key.account_id) == (401, None)


async def answer_of_a_bug(settings: Settings, route: Route, request: httpx.Request) -> httpx.Response:
    """What the app answers `request` with `route` added (a test's own route, which fails)."""
    app = create_app(settings)
    app.router.routes.append(route)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await http.send(request)


async def test_a_bug_of_ours_answers_500_naming_the_request_id(settings: Settings) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    request = httpx.Request("GET", "http://testserver/broken", headers={"X-Request-Id": "mine-500"})
    response = await answer_of_a_bug(settings, Route("/broken", broken), request)
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "mine-500"
    assert response.json()["request_id"] == "mine-500"


async def test_a_bug_after_the_request_was_counted_answers_500_with_the_rate_limits(
    settings: Settings, account: Partner, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Request) -> Response:
        await require_account(request)
        raise RuntimeError("a bug")

    request = httpx.Request("GET", "http://testserver/broken", headers=account.headers)
    with caplog.at_level(logging.INFO, logger="darkroom.web"):
        response = await answer_of_a_bug(settings, Route("/broken", broken), request)
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    requests_per_minute = TIERS[DEFAULT_TIER].requests_per_minute
    assert response.headers["x-ratelimit-limit"] == str(requests_per_minute)
    assert response.headers["x-ratelimit-remaining"] == str(requests_per_minute - 1)
    assert response.headers["ratelimit"] == f'"requests";r={requests_per_minute - 1};t=1'
    assert "ratelimit-policy" in response.headers
    (line,) = (record for record in caplog.records if record.name == "darkroom.web")
    assert (line.status, line.account_id) == (500, account.id)


async def test_a_replayed_response_carries_the_retrys_request_id(
    client: httpx.AsyncClient, account: Partner
) -> None:
    def sent(request_id: str) -> dict[str, str]:
        return {**account.headers, "Idempotency-Key": "batch-1", "X-Request-Id": request_id}

    first = await client.post("/v1/batches", headers=sent("first-try"), json={})
    retry = await client.post("/v1/batches", headers=sent("second-try"), json={})
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json()
    assert (first.headers["x-request-id"], retry.headers["x-request-id"]) == ("first-try", "second-try")


async def test_openapi_describes_endpoint_bodies_by_the_models_that_validate_them(
    client: httpx.AsyncClient,
) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    created, changed = schemas["NewEndpoint"], schemas["EndpointChanges"]
    assert created["required"] == ["url"] and "required" not in changed
    assert created["additionalProperties"] is False
    assert "status" in changed["properties"] and "status" not in created["properties"]
    limit = created["properties"]["rate_limit"]["anyOf"][0]
    assert (limit["minimum"], limit["maximum"]) == (1, 10_000)
    assert created["properties"]["events"]["items"]["enum"][0] == "*"
    # A PATCH leaves out what it does not change: no defaults to mistake for what it sets.
    assert all("default" not in field for field in changed["properties"].values())


async def test_openapi_describes_the_image_bodies_by_their_models(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    content = spec["paths"]["/v1/images"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]
    assert form["schema"] == {"$ref": "#/components/schemas/ImageForm"}
    assert form["encoding"]["operations"] == {"contentType": "application/json"}
    assert "image/jpeg" in form["encoding"]["file"]["contentType"]
    fields = schemas["ImageForm"]["properties"]
    # A form sends JSON as text: a string of JSON of the value's schema.
    assert fields["operations"]["contentMediaType"] == "application/json"
    assert fields["operations"]["contentSchema"]["items"] == {"$ref": "#/components/schemas/Operation"}
    assert fields["file"] == {**fields["file"], "type": "string", "format": "binary"}
    assert schemas["ImageForm"]["required"] == ["file"]
    assert content["application/json"]["schema"]["oneOf"] == [
        {"$ref": "#/components/schemas/UploadStart"},
        {"$ref": "#/components/schemas/ImageFromUrl"},
    ]
    direct = spec["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert direct == {"$ref": "#/components/schemas/NewUpload"}
    assert schemas["NewUpload"]["required"] == ["filename", "content_type", "size"]
    by_url = schemas["BatchImagesFromUrl"]["properties"]["images"]
    assert (by_url["minItems"], by_url["maxItems"]) == (1, 50)
    assert by_url["items"] == {"$ref": "#/components/schemas/BatchImageFromUrl"}
    assert "batch_id" not in schemas["BatchImageFromUrl"]["properties"]


async def test_openapi_describes_the_batch_body_by_its_model(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    body = spec["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/NewBatch"}
    batch = spec["components"]["schemas"]["NewBatch"]
    assert batch["additionalProperties"] is False
    assert batch["properties"]["operations"]["items"] == {"$ref": "#/components/schemas/Operation"}
    assert {"$ref": "#/components/schemas/ArchiveSpec"} in batch["properties"]["archive"]["oneOf"]


def test_a_text_log_line_cannot_be_split_by_what_a_client_sent() -> None:
    """A path with %0A (uvicorn decodes it) in `darkroom dev`'s text lines: one line still, escaped."""
    record = logging.makeLogRecord(
        {
            "name": "darkroom.web",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "%s %s %d",
            "args": ("GET", "/v1/images/x\n12:00:00 INFO darkroom.web forged", 404),
            "route": None,
            "user_agent": "tool\r\nforged=1",
        }
    )

    line = TextFormatter().format(record)

    assert "\n" not in line and "\r" not in line
    assert "/v1/images/x\\x0a12:00:00 INFO darkroom.web forged 404" in line
    assert "user_agent=tool\\x0d\\x0aforged=1" in line
