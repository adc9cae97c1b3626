"""`/openapi.json` and `/docs`: the API described from the same models that validate requests."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from jobs.operations import CATALOGUE, MAX_CHAIN_LENGTH


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


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


_NULLABLE_STRING = {"type": ["string", "null"]}
_IMAGE_ID = {"name": "image_id", "in": "path", "required": True, "schema": {"type": "string"}}
_UNAUTHORIZED = _problem("Missing or invalid API key")
_NOT_FOUND = _problem("No such image in this account")


def build_openapi(public_url: str) -> dict[str, Any]:
    operations = _operation_schemas()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Darkroom",
            "version": "1",
            "description": "Upload photos, name libvips operations, receive signed webhooks.",
        },
        "servers": [{"url": public_url}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/images": {
                "post": {
                    "summary": "Upload an image to process",
                    "requestBody": {
                        "required": True,
                        "content": {"multipart/form-data": {"schema": _ref("ImageUpload")}},
                    },
                    "responses": {
                        "202": _json("Queued", _ref("Image")),
                        "401": _UNAUTHORIZED,
                        "413": _problem("The file is over the upload limit"),
                        "415": _problem("Not an accepted image format"),
                        "422": _problem("Invalid fields, unreadable image or too many pixels"),
                    },
                },
                "get": {
                    "summary": "List images, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json("A page of images", _ref("ImageList")), "401": _UNAUTHORIZED},
                },
            },
            "/v1/images/{image_id}": {
                "parameters": [_IMAGE_ID],
                "get": {
                    "summary": "Get an image",
                    "responses": {"200": _json("The image", _ref("Image")), "404": _NOT_FOUND},
                },
                "delete": {
                    "summary": "Delete an image and its files",
                    "responses": {"204": {"description": "Deleted"}, "404": _NOT_FOUND},
                },
            },
            "/v1/images/{image_id}/output": {
                "parameters": [_IMAGE_ID],
                "get": {
                    "summary": "Download the processed image",
                    "responses": {
                        "200": {"description": "The image bytes", "content": {"image/*": {}}},
                        "404": _NOT_FOUND,
                        "409": _problem("The image is not completed"),
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
                    },
                },
            },
            "/v1/deliveries": {
                "get": {
                    "summary": "List webhook messages, newest first",
                    "responses": {"200": {"description": "A page of deliveries"}, "401": _UNAUTHORIZED},
                }
            },
            "/v1/deliveries/{msg_id}": {
                "parameters": [
                    {"name": "msg_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "get": {
                    "summary": "A webhook message with every delivery attempt",
                    "responses": {"200": {"description": "The delivery"}, "404": _problem("No such message")},
                },
            },
            "/v1/webhook-secret": {
                "get": {
                    "summary": "The account's webhook signing secret",
                    "responses": {"200": {"description": "OK"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                **operations,
                "Operation": {"oneOf": [_ref(name) for name in operations]},
                "ImageUpload": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "operations": {
                            "type": "array",
                            "maxItems": MAX_CHAIN_LENGTH,
                            "items": _ref("Operation"),
                            "description": "JSON-encoded array",
                        },
                        "callback_url": {"type": "string", "format": "uri"},
                        "metadata": {"type": "object", "description": "JSON-encoded object, at most 4 KB"},
                    },
                },
                "Image": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"enum": ["queued", "processing", "completed", "failed"]},
                        "operations": {"type": "array", "items": _ref("Operation")},
                        "input": {"type": "object"},
                        "output": {"type": ["object", "null"]},
                        "error": {
                            "type": ["object", "null"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        },
                        "batch_id": _NULLABLE_STRING,
                        "callback_url": _NULLABLE_STRING,
                        "metadata": {"type": "object"},
                        "attempts": {"type": "integer"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "started_at": _NULLABLE_STRING,
                        "completed_at": _NULLABLE_STRING,
                    },
                },
                "ImageList": {
                    "type": "object",
                    "properties": {
                        "data": {"type": "array", "items": _ref("Image")},
                        "has_more": {"type": "boolean"},
                        "next_cursor": _NULLABLE_STRING,
                    },
                },
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "code": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(build_openapi(request.app.state.settings.public_url))


_DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Darkroom API</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.redoc.ly/redoc/latest/bundles/redoc.standalone.js"></script></body></html>
"""


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_PAGE)


routes = [Route("/openapi.json", openapi_json), Route("/docs", docs)]
