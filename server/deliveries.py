"""`/v1/deliveries` and `/v1/webhook-secret`: what was sent to the partner, and how to check it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jobs.store import Store
from server.auth import require_account
from server.pagination import page_response, parse_page
from server.problems import Problem
from webhooks.messages import Message


async def get_delivery(request: Request) -> Response:
    account = await require_account(request)
    store: Store = request.app.state.store
    message = await store.messages.get(request.path_params["msg_id"])
    if message is None or message.account_id != account.id:
        raise Problem(404, "not_found", "no such delivery")
    return JSONResponse(message.resource())


async def list_deliveries(request: Request) -> Response:
    account = await require_account(request)
    page, filters = parse_page(request.query_params, "msg", {"status": ("pending", "delivered", "failed")})
    store: Store = request.app.state.store

    async def fetch(limit: int, before: str | None) -> list[Message]:
        return await store.messages.list_for_account(
            account.id, limit=limit, before=before, status=filters["status"]
        )

    return await page_response(page, fetch, Message.resource)


async def get_webhook_secret(request: Request) -> Response:
    account = await require_account(request)
    return JSONResponse({"object": "webhook_secret", "secret": account.webhook_secret})


routes = [
    Route("/v1/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/deliveries/{msg_id}", get_delivery, methods=["GET"]),
    Route("/v1/webhook-secret", get_webhook_secret, methods=["GET"]),
]
