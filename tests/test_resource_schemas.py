"""What the API answers is what /openapi.json says it answers: real responses of a whole flow validate
against the schema each operation documents for their status, and a field no model declares fails."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from jobs.settings import Settings
from server.resources import RESOURCES, WEBHOOK_EVENTS
from tests import imagegen
from tests.conftest import Partner, api_client, on_s3, run_burst, with_settings
from tests.receiver import Receiver
from tests.s3server import S3Server
from tests.test_batches import add_files, create_batch, seal
from tests.test_endpoints_api import ENDPOINTS
from tests.test_spine import upload
from webhooks.endpoints import EVENT_TYPES

RESIZE_TO_32 = json.dumps([{"type": "resize", "params": {"width": 32}}])
# Nothing listens there: deliveries to it fail with a connection error.
NOWHERE = "http://127.0.0.1:9/hooks"


class Spec:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        return Draft202012Validator(
            {**schema, "components": self.document["components"]},
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    def component(self, name: str) -> Draft202012Validator:
        return self.validator({"$ref": f"#/components/schemas/{name}"})

    def event(self, event_type: str) -> Draft202012Validator:
        """The body of `event_type`'s webhooks, as documented."""
        body = self.document["webhooks"][event_type]["post"]["requestBody"]
        return self.validator(body["content"]["application/json"]["schema"])

    def check(self, response: httpx.Response, path: str, method: str) -> Any:
        """The response's body, once valid by the schema `path` documents for its status and type."""
        documented = self.document["paths"][path][method]["responses"]
        assert str(response.status_code) in documented, (path, method, response.status_code)
        content = documented[str(response.status_code)]["content"]
        media_type = response.headers["content-type"].split(";")[0]
        body = response.json()
        self.validator(content[media_type]["schema"]).validate(body)
        return body


@pytest.fixture
async def spec(client: httpx.AsyncClient) -> Spec:
    return Spec((await client.get("/openapi.json")).json())


async def test_every_answer_of_a_whole_flow_is_what_the_spec_documents(
    client: httpx.AsyncClient, account: Partner, settings: Settings, receiver: Receiver, spec: Spec
) -> None:
    auth = account.headers
    created = await client.post(ENDPOINTS, headers=auth, json={"url": NOWHERE, "events": ["image.failed"]})
    endpoint = spec.check(created, ENDPOINTS, "post")
    endpoint_path = f"{ENDPOINTS}/{endpoint['id']}"
    for path, template in [
        (ENDPOINTS, ENDPOINTS),
        (endpoint_path, f"{ENDPOINTS}/{{endpoint_id}}"),
        (f"{endpoint_path}/secret", f"{ENDPOINTS}/{{endpoint_id}}/secret"),
        ("/v1/webhook-secret", "/v1/webhook-secret"),
    ]:
        spec.check(await client.get(path, headers=auth), template, "get")
    changed = await client.patch(
        endpoint_path, headers=auth, json={"description": "failures", "rate_limit": 5}
    )
    spec.check(changed, f"{ENDPOINTS}/{{endpoint_id}}", "patch")

    completed = spec.check(
        await upload(
            client, account, imagegen.jpeg(64, 48), operations=RESIZE_TO_32, callback_url=receiver.url
        ),
        "/v1/images",
        "post",
    )
    failed = spec.check(
        await upload(client, account, imagegen.truncated_jpeg(), callback_url=receiver.url),
        "/v1/images",
        "post",
    )
    batch = spec.check(
        await client.post(
            "/v1/batches", headers=auth, json={"archive": {"format": "png"}, "callback_url": receiver.url}
        ),
        "/v1/batches",
        "post",
    )
    added = await add_files(
        client, account, batch["id"], [("a.jpg", imagegen.jpeg()), ("b.jpg", imagegen.jpeg())]
    )
    spec.check(added, "/v1/batches/{batch_id}/images", "post")
    spec.check(await seal(client, account, batch["id"]), "/v1/batches/{batch_id}/seal", "post")
    direct = await client.post(
        "/v1/uploads", headers=auth, json={"filename": "later.jpg", "content_type": "image/jpeg", "size": 10}
    )
    spec.check(direct, "/v1/uploads", "post")

    await run_burst(with_settings(settings, retry_schedule=(0.05,)))

    images = {
        image["status"]: image
        for image in [
            spec.check(
                await client.get(f"/v1/images/{each['id']}", headers=auth), "/v1/images/{image_id}", "get"
            )
            for each in (completed, failed)
        ]
    }
    assert images["completed"]["output"] is not None and images["completed"]["webhooks"]
    assert images["failed"]["error"] is not None
    listed = spec.check(await client.get("/v1/images?limit=100", headers=auth), "/v1/images", "get")
    assert {image["upload"] is not None for image in listed["data"]} == {True, False}
    finished = spec.check(
        await client.get(f"/v1/batches/{batch['id']}", headers=auth), "/v1/batches/{batch_id}", "get"
    )
    assert finished["archive"]["status"] == "ready"
    spec.check(await client.get("/v1/batches", headers=auth), "/v1/batches", "get")

    deliveries = spec.check(await client.get("/v1/deliveries", headers=auth), "/v1/deliveries", "get")
    by_status = {delivery["status"]: delivery for delivery in deliveries["data"]}
    assert {"delivered", "failed"} <= set(by_status)
    for delivery in deliveries["data"]:
        spec.event(delivery["event_type"]).validate(delivery["payload"])
    for received in receiver.deliveries:
        spec.event(received.event["type"]).validate(received.event)
    sent = {delivery["event_type"] for delivery in deliveries["data"]}
    assert {"image.completed", "image.failed", "batch.completed", "batch.archive.ready"} <= sent
    for delivery in deliveries["data"]:
        shown = await client.get(f"/v1/deliveries/{delivery['id']}", headers=auth)
        assert spec.check(shown, "/v1/deliveries/{msg_id}", "get")["destinations"][0]["attempts"]
    retried = await client.post(f"/v1/deliveries/{by_status['delivered']['id']}/retry", headers=auth)
    spec.check(retried, "/v1/deliveries/{msg_id}/retry", "post")
    recovered = await client.post(
        f"{endpoint_path}/recover", headers=auth, json={"since": "2020-01-01T00:00:00Z"}
    )
    assert spec.check(recovered, f"{ENDPOINTS}/{{endpoint_id}}/recover", "post")["redelivered"] == 1
    tested = await client.post(f"{endpoint_path}/test", headers=auth)
    spec.event("webhook.test").validate(
        spec.check(tested, f"{ENDPOINTS}/{{endpoint_id}}/test", "post")["payload"]
    )
    rotated = await client.post(f"{endpoint_path}/rotate-secret", headers=auth)
    spec.check(rotated, f"{ENDPOINTS}/{{endpoint_id}}/rotate-secret", "post")


async def test_problems_are_what_the_spec_documents(
    client: httpx.AsyncClient, account: Partner, spec: Spec
) -> None:
    missing = await client.get("/v1/images/img_0000000000000000000000000", headers=account.headers)
    assert spec.check(missing, "/v1/images/{image_id}", "get")["request_id"]
    refused = await client.post("/v1/batches", headers=account.headers, json={"archive": 7, "colour": "red"})
    assert [error["field"] for error in spec.check(refused, "/v1/batches", "post")["errors"]] == [
        "archive",
        "colour",
    ]
    unauthorized = await client.get("/v1/batches")
    spec.check(unauthorized, "/v1/batches", "get")


async def test_a_field_no_model_declares_fails_the_check(
    client: httpx.AsyncClient, account: Partner, spec: Spec
) -> None:
    batch = await create_batch(client, account)
    spec.component("Batch").validate(batch)
    with pytest.raises(ValidationError, match="Additional properties"):
        spec.component("Batch").validate({**batch, "owner": account.id})


async def test_every_resource_refuses_fields_it_does_not_declare(spec: Spec) -> None:
    schemas = spec.document["components"]["schemas"]
    for model in [*RESOURCES, *WEBHOOK_EVENTS.values()]:
        assert schemas[model.__name__]["additionalProperties"] is False, model.__name__


def test_every_event_type_has_its_documented_webhook() -> None:
    assert set(WEBHOOK_EVENTS) == set(EVENT_TYPES)


async def test_a_webhook_of_another_type_fails_the_check(spec: Spec) -> None:
    test_event = {
        "type": "webhook.test",
        "timestamp": "2026-11-21T10:00:00.000Z",
        "data": {"object": "webhook_test", "endpoint_id": "ep_x", "message": "a test event from Darkroom"},
    }
    spec.event("webhook.test").validate(test_event)
    with pytest.raises(ValidationError):
        spec.event("image.completed").validate(test_event)


async def test_an_upload_offering_a_bucket_form_is_what_the_spec_documents(
    settings: Settings, s3_server: S3Server, account: Partner
) -> None:
    async with api_client(on_s3(settings, s3_server)) as client:
        spec = Spec((await client.get("/openapi.json")).json())
        body = {"filename": "phone.jpg", "content_type": "image/jpeg", "size": 10}
        created = await client.post("/v1/uploads", headers=account.headers, json=body)
    assert spec.check(created, "/v1/uploads", "post")["upload_form"]["fields"]


async def test_health_answers_are_what_the_spec_documents(client: httpx.AsyncClient, spec: Spec) -> None:
    assert spec.check(await client.get("/healthz"), "/healthz", "get") == {"status": "ok"}
    assert spec.check(await client.get("/readyz"), "/readyz", "get")["checks"]["redis"] == "ok"
