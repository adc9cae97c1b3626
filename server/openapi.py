"""`/openapi.json`: the API described from the same models that validate requests (`/docs` renders it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from jobs.ids import id_pattern
from jobs.operations import CATALOGUE
from jobs.records import ArchiveSpec
from jobs.settings import DEFAULT_LONG_POLL_MAX_WAIT
from server.batches import BatchImagesForm, BatchImagesFromUrl, NewBatch
from server.deliveries import Redelivery
from server.endpoints import EndpointChanges, NewEndpoint, Recovery
from server.idempotency import MAX_KEY_LENGTH
from server.image_json import UploadStart
from server.images import ImageForm, ImageFromUrl
from server.json_response import JSONResponse
from server.long_poll import PREFERENCE_APPLIED
from server.models import COMPONENT_REF, non_null
from server.query import QueryModel, query_model
from server.request_log import USABLE_REQUEST_ID
from server.resources import RESOURCES, WEBHOOK_EVENTS, Health, Readiness
from server.uploads import ACCEPTED_CONTENT_TYPES, NewUpload

# What partners send, each body validated by its model: their schemas are the models' own.
REQUEST_BODIES: tuple[type[BaseModel], ...] = (
    ImageForm,
    ImageFromUrl,
    UploadStart,
    NewUpload,
    NewBatch,
    BatchImagesForm,
    BatchImagesFromUrl,
    Redelivery,
    Recovery,
    NewEndpoint,
    EndpointChanges,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _linked(schema: Any) -> Any:
    if isinstance(schema, dict):
        if COMPONENT_REF in schema:
            return _ref(schema[COMPONENT_REF])
        return {key: _linked(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_linked(item) for item in schema]
    return schema


def _model_schemas(models: Sequence[type[BaseModel]], mode: JsonSchemaMode) -> dict[str, Any]:
    """The schemas of `models` (and of the models they are made of) as components of this document."""
    _, schemas = models_json_schema(
        [(model, mode) for model in models], ref_template="#/components/schemas/{model}"
    )
    linked: dict[str, Any] = _linked(schemas["$defs"])
    return linked


def _form(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """A multipart form's media type: its model's schema, and how each part is encoded (its JSON
    fields as JSON; its files as the images we take)."""
    encoding: dict[str, Any] = {}
    for name, field in schemas[model.__name__]["properties"].items():
        if "contentMediaType" in field:
            encoding[name] = {"contentType": field["contentMediaType"]}
        elif "binary" in (field.get("format"), field.get("items", {}).get("format")):
            encoding[name] = {"contentType": ", ".join(sorted(ACCEPTED_CONTENT_TYPES))}
    return {"schema": _ref(model.__name__), "encoding": encoding}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for name, kind in CATALOGUE.items():
        schemas[f"Operation_{name}"] = {
            "type": "object",
            "description": kind.summary,
            "properties": {"type": {"const": name}, "params": kind.params_model.json_schema()},
            "required": ["type"],
            "additionalProperties": False,
        }
    return schemas


def _id(prefix: str) -> dict[str, str]:
    return {"type": "string", "pattern": id_pattern(prefix)}


def _path_id(name: str, prefix: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _id(prefix)}


_IMAGE_ID = _path_id("image_id", "img")
_UNAUTHORIZED = _problem("Missing or invalid API key")
_NOT_FOUND = _problem("No such image in this account")


def build_openapi(public_url: str, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    operations = _operation_schemas()
    requests = _model_schemas(REQUEST_BODIES, "validation")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Darkroom",
            "version": "1",
            "description": "Upload photos, name libvips operations, receive signed webhooks.",
        },
        "servers": [{"url": public_url}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": _with_common_responses(
            routes,
            {
                "/v1/images": {
                    "post": {
                        "summary": "Upload an image, start a direct upload, or name a URL to fetch it from",
                        "description": "multipart with the file; or JSON in one of two forms:"
                        " `{upload_id, …}` starts a direct upload whose bytes have landed (see"
                        " POST /v1/uploads), `{source_url, …}` has a worker fetch the image."
                        " A body naming both, or neither, is a 422",
                        "requestBody": {
                            "required": True,
                            "content": {
                                "multipart/form-data": _form(ImageForm, requests),
                                "application/json": {
                                    "schema": {
                                        "oneOf": [_ref(UploadStart.__name__), _ref(ImageFromUrl.__name__)]
                                    }
                                },
                            },
                        },
                        "responses": {
                            "202": _json("Queued", _ref("Image")),
                            "401": _UNAUTHORIZED,
                            "404": _problem("No such upload in this account"),
                            "409": _problem(
                                "A batch sealed or full; or the upload's bytes have not landed"
                                " (upload_not_received), it expired (upload_expired), was refused"
                                " (upload_refused) or started with other fields (upload_already_started)"
                            ),
                            "413": _problem("The file is over the upload limit"),
                            "415": _problem("Not an accepted image format"),
                            "422": _problem("Invalid fields, unreadable image or too many pixels"),
                        },
                    },
                    "get": {
                        "summary": "List images, newest first",
                        "responses": {
                            "200": _json("A page of images", _ref("ImageList")),
                            "401": _UNAUTHORIZED,
                        },
                    },
                },
                "/v1/images/{image_id}": {
                    "parameters": [_IMAGE_ID],
                    "get": {
                        "summary": "Get an image; with Prefer: wait=N, once it is completed or failed",
                        "parameters": [_PREFER_WAIT],
                        "responses": {
                            "200": _long_polled(_json("The image", _ref("Image"))),
                            "404": _NOT_FOUND,
                        },
                    },
                    "delete": {
                        "summary": "Delete an image and its files",
                        "responses": {"204": {"description": "Deleted"}, "404": _NOT_FOUND},
                    },
                },
                "/v1/images/{image_id}/output": {
                    "parameters": [_IMAGE_ID],
                    "get": {
                        "summary": "Download the result, or a variant of it rendered and cached on the fly",
                        "responses": {
                            "200": {
                                "description": "The image bytes (ETag, Cache-Control)",
                                "content": {"image/*": {}},
                            },
                            "304": {"description": "Not modified (If-None-Match matched the ETag)"},
                            "404": _NOT_FOUND,
                            "409": _problem(
                                "The image is not completed (not_ready), or it failed (image_failed)"
                            ),
                            "410": _problem("The stored result is gone"),
                            "422": _problem("Invalid variant parameters; see errors"),
                            "503": _problem(
                                "Every variant renderer is busy (renderer_busy), or the render took too long"
                                " (render_too_slow); retry after Retry-After"
                            ),
                            "507": _problem("Our storage is full: the variant was not kept"),
                        },
                    },
                },
                "/v1/images/{image_id}/original": {
                    "parameters": [_IMAGE_ID],
                    "get": {
                        "summary": "Download the uploaded image",
                        "responses": {
                            "200": {"description": "The bytes as uploaded", "content": {"image/*": {}}},
                            "404": _NOT_FOUND,
                            "409": _problem(
                                "No original yet: a source_url not fetched (not_ready), a direct upload's"
                                " bytes not landed (upload_not_received); or the image failed first"
                                " (image_failed)"
                            ),
                        },
                    },
                },
                **_upload_paths(),
                **_batch_paths(requests),
                **_webhook_paths(),
                **_service_paths(),
            },
        ),
        "webhooks": _webhooks(),
        "components": {
            "parameters": _HEADER_PARAMETERS,
            "headers": _RESPONSE_HEADERS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                **operations,
                "Operation": {"oneOf": [_ref(name) for name in operations]},
                "ArchiveSpec": {
                    **ArchiveSpec.json_schema(),
                    "description": "original: each result as stored; jpeg, png, webp: results re-encoded"
                    " to it",
                },
                **requests,
                **_model_schemas([*RESOURCES, *dict.fromkeys(WEBHOOK_EVENTS.values())], "serialization"),
            },
        },
    }


_METHODS = ("get", "post", "put", "patch", "delete")


def _query_parameters(model: type[QueryModel]) -> list[dict[str, Any]]:
    """The parameters of `model`, each with the schema it is validated by."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, described in schema["properties"].items():
        accepted = {
            key: value for key, value in non_null(described).items() if key not in ("title", "description")
        }
        parameter = {"name": name, "in": "query", "required": name in required, "schema": accepted}
        if "description" in described:
            parameter["description"] = described["description"]
        parameters.append(parameter)
    return parameters


def _service_paths() -> dict[str, Any]:
    """The routes for load balancers, scrapers and readers of this document: no API key."""

    def unauthenticated(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"summary": summary, "security": [], "responses": responses}}

    return {
        "/healthz": unauthenticated("The process answers", {"200": _json("Alive", _ref(Health.__name__))}),
        "/readyz": unauthenticated(
            "Redis and the storage answer, and the storage has room",
            {
                "200": _json("Ready", _ref(Readiness.__name__)),
                "503": _json("Not ready: each check says why", _ref(Readiness.__name__)),
            },
        ),
        "/metrics": unauthenticated(
            "Prometheus metrics",
            {"200": {"description": "The text exposition format", "content": {"text/plain": {}}}},
        ),
        "/openapi.json": unauthenticated("This document", {"200": _json("OpenAPI 3.1", {"type": "object"})}),
        "/docs": unauthenticated(
            "This document, to read and try",
            {"200": {"description": "An HTML page", "content": {"text/html": {}}}},
        ),
    }


def _webhooks() -> dict[str, Any]:
    """What we POST to callback URLs and subscribed endpoints, per event type: its body's model (the one
    that builds it, parametrised by its resource), and the Standard Webhooks headers that sign it."""

    def header(name: str, description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "header",
            "required": True,
            "description": description,
            "schema": {"type": "string"},
        }

    signed_by = [
        header("webhook-id", "The message's id (msg_…): the same on every retry of this event; dedupe on it"),
        header("webhook-timestamp", "Unix seconds of this attempt"),
        header(
            "webhook-signature",
            "`v1,` and the base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` under each"
            " secret in force, space separated (two while a rotated secret still signs)",
        ),
    ]
    return {
        event_type: {
            "post": {
                "summary": f"{event_type}",
                "parameters": signed_by,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "allOf": [
                                    _ref(model.__name__),
                                    {"properties": {"type": {"const": event_type}}},
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "2XX": {"description": "Delivered"},
                    "default": {"description": "Not delivered: sent again on the retry schedule"},
                },
            }
        }
        for event_type, model in WEBHOOK_EVENTS.items()
    }


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


_PRINTABLE_ASCII = "^[\\x20-\\x7e]*$"
_HEADER_PARAMETERS: dict[str, Any] = {
    "RequestId": {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "Your id for this request (1 to 128 visible ASCII characters), echoed in the"
        " response, its problem body and our logs; one is made (req_…) when none, or another, is given",
        "schema": {"type": "string", "pattern": f"^{USABLE_REQUEST_ID}$"},
    },
    "PreferWait": {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "`wait=N` (RFC 7240): answer once the resource is settled, or after N seconds (at"
        f" most the service's limit, {DEFAULT_LONG_POLL_MAX_WAIT} on a default install) with its state"
        " then; 200 either way, with Preference-Applied",
        "schema": {"type": "string", "examples": ["wait=20"]},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes a POST safe to retry for 24 h: a repeat answers the stored response with"
        " Idempotent-Replayed: true; the same key with another body is 422 idempotency_key_reused,"
        " and while the first is still in flight 409 idempotency_key_in_use",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH,
            "pattern": _PRINTABLE_ASCII,
        },
    },
}
_INTEGER = {"type": "integer", "minimum": 0}
_RESPONSE_HEADERS: dict[str, Any] = {
    "X-Request-Id": _header("The request's id: the one sent, or one made for it"),
    "X-RateLimit-Limit": _header("Requests the account's plan allows per window", _INTEGER),
    "X-RateLimit-Remaining": _header("Requests left in the current window", _INTEGER),
    "X-RateLimit-Reset": _header("Seconds until the window has room again", _INTEGER),
    "RateLimit": _header("The same, as the IETF RateLimit field"),
    "RateLimit-Policy": _header("The account's quota, as the IETF RateLimit-Policy field"),
    "Retry-After": _header("Seconds to wait before sending again", _INTEGER),
    "Idempotent-Replayed": _header("true when this is the stored response of an earlier request"),
    PREFERENCE_APPLIED: _header(
        "`wait=N` when a Prefer: wait was honoured: N the most seconds waited (the service's limit if less)"
    ),
}
_PREFER_WAIT = {"$ref": "#/components/parameters/PreferWait"}


def _long_polled(response: dict[str, Any]) -> dict[str, Any]:
    """A 200 that a Prefer: wait may have held back."""
    return {**response, "headers": _header_refs(PREFERENCE_APPLIED)}


_RATE_LIMITED = {
    **_problem(
        "Over the plan's rate (rate_limited), or too many failed authentications from the client's address "
        "(too_many_failed_authentications); retry after Retry-After"
    ),
    "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
}


def _header_refs(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _with_common_responses(routes: Sequence[BaseRoute], paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation documents the query parameters its route's model takes, the headers every route
    (and every POST) takes and answers, and the answers every route of its kind can give, beside its
    own: a bad key, a missing resource in the path, and refused parameters or bodies."""
    models = {
        (route.path, method.lower()): query_model(route.endpoint)
        for route in routes
        if isinstance(route, Route)
        for method in route.methods or ()
    }
    for path, item in paths.items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            api = path.startswith("/v1/")
            headers = [{"$ref": "#/components/parameters/RequestId"}]
            if api and method == "post":
                headers.append({"$ref": "#/components/parameters/IdempotencyKey"})
            operation["parameters"] = [
                *headers,
                *operation.get("parameters", ()),
                *_query_parameters(models[path, method]),
            ]
            common = {
                "503": _problem(
                    "Redis is unreachable (store_unavailable), or the file storage is "
                    "(storage_unavailable); retry after Retry-After"
                ),
                "400": _problem("The request is not valid HTTP (malformed_request)"),
            }
            if operation.get("security") != []:
                common["401"] = _UNAUTHORIZED
            if api:
                common["429"] = _RATE_LIMITED
            if "{" in path:
                common["404"] = _problem("No such resource in this account")
            # Any route refuses a query parameter it does not take.
            common["422"] = _INVALID
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                common["400"] = _problem("The body is not JSON (invalid_json)")
                common["413"] = _problem("The body is over 64 KB")
                common["415"] = _problem("The body is not application/json")
            if "multipart/form-data" in content:
                common["400"] = _problem("The multipart body is malformed (malformed_multipart)")
                common["413"] = _problem("A file or field is over its limit")
                common["415"] = _problem("The body is not multipart/form-data")
                common["507"] = _problem("Our storage is full: nothing was kept; retry after Retry-After")
            responses = {**common, **operation["responses"]}
            if api and method == "post":
                responses = _with_idempotency_refusals(responses)
            every = ("X-Request-Id", *(_RATE_LIMIT_HEADERS if api else ()))
            replayed = ("Idempotent-Replayed",) if api and method == "post" else ()
            operation["responses"] = {
                status: {
                    **response,
                    "headers": {**response.get("headers", {}), **_header_refs(*every, *replayed)},
                }
                for status, response in responses.items()
            }
    return paths


_RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "RateLimit",
    "RateLimit-Policy",
)


def _with_idempotency_refusals(responses: dict[str, Any]) -> dict[str, Any]:
    """A POST's 400, 409 and 422 also tell of its Idempotency-Key."""
    refusals = {
        "400": f"the Idempotency-Key is not 1 to {MAX_KEY_LENGTH} printable ASCII characters, or is sent"
        " twice (invalid_idempotency_key)",
        "409": "the Idempotency-Key's first request is still in flight (idempotency_key_in_use)",
        "422": "the Idempotency-Key was used with another request (idempotency_key_reused)",
    }
    updated = dict(responses)
    for status, refusal in refusals.items():
        own = responses.get(status)
        if own is None:
            updated[status] = _problem(refusal[0].upper() + refusal[1:])
        else:
            updated[status] = {**own, "description": f"{own['description']}; or {refusal}"}
    return updated


def _upload_paths() -> dict[str, Any]:
    return {
        "/v1/uploads": {
            "post": {
                "summary": "Create an image whose bytes you PUT to the signed upload_url it answers"
                " (or, with S3 storage, POST to the bucket with upload_form)",
                "requestBody": _body(NewUpload.__name__),
                "responses": {
                    "201": _json("The waiting image and where to send its bytes", _ref("Upload")),
                    "409": _problem("The batch is sealed or full"),
                    "413": _problem("The declared size is over the upload limit (file_too_large)"),
                },
            }
        },
        "/v1/uploads/{upload_id}/content": {
            "parameters": [_path_id("upload_id", "upl")],
            "put": {
                "summary": "Send the image's bytes (no API key: the URL is signed and expires)",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                    },
                },
                "responses": {
                    "200": _json("Received and checked", _ref("Image")),
                    "400": _problem("Fewer bytes than declared (upload_incomplete)"),
                    "403": _problem(
                        "Not a URL we signed (upload_url_invalid), or expired (upload_url_expired)"
                    ),
                    "404": _problem("The upload's image was deleted"),
                    "409": _problem("Its bytes were received already (upload_already_received)"),
                    "413": _problem("More bytes than declared (upload_too_large): none was kept"),
                    "415": _problem("Not an accepted image format: the image failed"),
                    "422": _problem("Unreadable, too many pixels or pages: the image failed with that code"),
                    "507": _problem("Our storage is full: nothing was kept; retry after Retry-After"),
                },
            },
        },
        "/v1/uploads/{upload_id}/landed": {
            "parameters": [_path_id("upload_id", "upl")],
            "get": {
                "summary": "Where the bucket redirects after the upload_form POST: the bytes land",
                "description": "No API key: the URL is signed and expires. Answers the image as it is"
                " when the bytes landed already (followed twice, or started first).",
                "security": [],
                "responses": {
                    "200": _json("Received and checked (or as it is, if it was already)", _ref("Image")),
                    "403": _problem(
                        "Not a URL we signed (upload_url_invalid), or expired (upload_url_expired)"
                    ),
                    "404": _problem("The upload's image was deleted"),
                    "409": _problem("The bucket holds no file for it yet (upload_not_received)"),
                    "413": _problem("More bytes than declared (upload_too_large): the image failed"),
                    "415": _problem("Not an accepted image format: the image failed"),
                    "422": _problem("Unreadable, too many pixels or pages: the image failed with that code"),
                    "503": _problem("The storage did not answer (storage_unavailable); follow it again"),
                },
            },
        },
    }


_BATCH_PATH_ID = _path_id("batch_id", "bat")
_NO_BATCH = _problem("No such batch in this account")


def _batch_paths(requests: dict[str, Any]) -> dict[str, Any]:
    batch = _ref("Batch")
    return {
        "/v1/batches": {
            "post": {
                "summary": "Create a batch: default operations, a callback URL, an archive, metadata",
                "requestBody": _body("NewBatch"),
                "responses": {"201": _json("The open batch", batch), "422": _INVALID},
            },
            "get": {
                "summary": "List batches, newest first",
                "responses": {"200": _json("A page of batches", _ref("BatchList")), "422": _INVALID},
            },
        },
        "/v1/batches/{batch_id}": {
            "parameters": [_BATCH_PATH_ID],
            "get": {
                "summary": "A batch: status, counts of its images by status, archive state; with Prefer:"
                " wait=N, once it is completed and its archive (if any) ready or failed",
                "parameters": [_PREFER_WAIT],
                "responses": {"200": _long_polled(_json("The batch", batch)), "404": _NO_BATCH},
            },
        },
        "/v1/batches/{batch_id}/images": {
            "parameters": [_BATCH_PATH_ID],
            "post": {
                "summary": "Add images: several `file` parts, or JSON source URLs; all are accepted or none",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": _form(BatchImagesForm, requests),
                        "application/json": {"schema": _ref(BatchImagesFromUrl.__name__)},
                    },
                },
                "responses": {
                    "202": _json(
                        "The queued images",
                        _ref("AddedImages"),
                    ),
                    "404": _NO_BATCH,
                    "409": _problem("The batch is sealed, or would hold too many images"),
                    "413": _problem("A file is over the upload limit"),
                    "422": _problem("Invalid fields, or refused files (each named in errors)"),
                },
            },
        },
        "/v1/batches/{batch_id}/seal": {
            "parameters": [_BATCH_PATH_ID],
            "post": {
                "summary": "No more images; the batch completes once every image has finished",
                "responses": {
                    "200": _json("The sealed (or completed) batch", batch),
                    "404": _NO_BATCH,
                    "409": _problem("Sealed already, or the batch has no images"),
                },
            },
        },
        "/v1/batches/{batch_id}/archive": {
            "parameters": [_BATCH_PATH_ID],
            "get": {
                "summary": "Download the ZIP of the results (resumable: Range, If-Range)",
                "parameters": [
                    {
                        "name": "Range",
                        "in": "header",
                        "schema": {"type": "string"},
                        "example": "bytes=0-1048575",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The archive (ETag); also for a Range of another unit or bad syntax",
                        "content": {"application/zip": {}},
                    },
                    "206": {"description": "The requested range", "content": {"application/zip": {}}},
                    "304": {"description": "Not modified (If-None-Match matched the ETag)"},
                    "404": _NO_BATCH,
                    "409": _problem("No archive asked for, not ready yet, or it failed"),
                    "410": _problem("The archive expired"),
                    "416": _problem("The range starts past the end"),
                },
            },
        },
    }


_MSG_ID = _path_id("msg_id", "msg")
_ENDPOINT_ID = _path_id("endpoint_id", "ep")
_NO_ENDPOINT = _problem("No such webhook endpoint in this account")
_INVALID = _problem(
    "Invalid fields (validation_failed), or a query parameter the route does not take"
    " (unknown_query_parameter); see errors"
)


def _body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _webhook_paths() -> dict[str, Any]:
    endpoint = _ref("WebhookEndpoint")
    with_secret = _ref("WebhookEndpointWithSecret")
    return {
        "/v1/deliveries": {
            "get": {
                "summary": "List webhook messages, newest first",
                "responses": {"200": _json("A page of messages", _ref("DeliveryList")), "422": _INVALID},
            }
        },
        "/v1/deliveries/{msg_id}": {
            "parameters": [_MSG_ID],
            "get": {
                "summary": "A webhook message: its payload and every attempt at each destination",
                "responses": {
                    "200": _json("The message", _ref("Delivery")),
                    "404": _problem("No such message"),
                },
            },
        },
        "/v1/deliveries/{msg_id}/retry": {
            "parameters": [_MSG_ID],
            "post": {
                "summary": "Send the message again now (same webhook-id), to all its destinations or one",
                "requestBody": {**_body("Redelivery"), "required": False},
                "responses": {
                    "202": _json("Redelivery queued", _ref("Delivery")),
                    "404": _problem("No such message"),
                    "409": _problem(
                        "Every destination chosen has an attempt under way (attempt_in_progress), or is "
                        "a disabled or deleted endpoint (endpoint_disabled, endpoint_deleted)"
                    ),
                },
            },
        },
        "/v1/webhook-secret": {
            "get": {
                "summary": "The secret that signs deliveries to callback URLs",
                "responses": {"200": _json("The secret", _ref("WebhookSecret"))},
            }
        },
        "/v1/webhook-secret/rotate": {
            "post": {
                "summary": "A new callback secret; the old one keeps signing beside it for 24 h",
                "responses": {"200": _json("The new secret", _ref("WebhookSecret"))},
            }
        },
        "/v1/webhook-endpoints": {
            "post": {
                "summary": "Register an endpoint for the account's events",
                "requestBody": _body("NewEndpoint"),
                "responses": {
                    "201": _json("The endpoint, with its secret", with_secret),
                    "409": _problem("The account has its 50 endpoints (too_many_endpoints)"),
                    "422": _INVALID,
                },
            },
            "get": {
                "summary": "The account's endpoints",
                "responses": {"200": _json("Every endpoint", _ref("WebhookEndpointList"))},
            },
        },
        "/v1/webhook-endpoints/{endpoint_id}": {
            "parameters": [_ENDPOINT_ID],
            "get": {
                "summary": "An endpoint",
                "responses": {"200": _json("The endpoint", endpoint), "404": _NO_ENDPOINT},
            },
            "patch": {
                "summary": "Change url, events, description, limits, or enable/disable",
                "requestBody": _body("EndpointChanges"),
                "responses": {"200": _json("The endpoint", endpoint), "404": _NO_ENDPOINT, "422": _INVALID},
            },
            "delete": {"summary": "Remove an endpoint", "responses": {"204": {"description": "Deleted"}}},
        },
        "/v1/webhook-endpoints/{endpoint_id}/secret": {
            "parameters": [_ENDPOINT_ID],
            "get": {
                "summary": "The endpoint's signing secret",
                "responses": {"200": _json("The secret", _ref("WebhookSecret"))},
            },
        },
        "/v1/webhook-endpoints/{endpoint_id}/rotate-secret": {
            "parameters": [_ENDPOINT_ID],
            "post": {
                "summary": "A new endpoint secret; the old one keeps signing beside it for 24 h",
                "responses": {"200": _json("The endpoint, with its new secret", with_secret)},
            },
        },
        "/v1/webhook-endpoints/{endpoint_id}/test": {
            "parameters": [_ENDPOINT_ID],
            "post": {
                "summary": "Send a webhook.test event to this endpoint",
                "responses": {
                    "202": _json("The test message", _ref("Delivery")),
                    "409": _problem("Disabled"),
                },
            },
        },
        "/v1/webhook-endpoints/{endpoint_id}/recover": {
            "parameters": [_ENDPOINT_ID],
            "post": {
                "summary": "Redeliver every failed delivery to this endpoint since a time",
                "requestBody": _body("Recovery"),
                "responses": {
                    "202": _json("How many were redelivered", _ref("RecoveryResult")),
                    "409": _problem("Disabled"),
                },
            },
        },
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(build_openapi(request.app.state.settings.public_url, request.app.routes))


routes = [Route("/openapi.json", openapi_json)]
