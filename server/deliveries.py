"""`/v1/deliveries` and `/v1/webhook-secret`: what was sent to the partner, and how to check it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jobs.params import FieldError
from jobs.store import Store
from server.auth import require_account
from server.problems import Problem, validation_problem

MAX_PAGE_SIZE = 100


async def get_delivery(request: Request) -> Response:
    account = await require_account(request)
    store: Store = request.app.state.store
    message = await store.messages.get(request.path_params["msg_id"])
    if message is None or message.account_id != account.id:
        raise Problem(404, "not_found", "no such delivery")
    return JSONResponse(message.resource())


async def list_deliveries(request: Request) -> Response:
    account = await require_account(request)
    query = request.query_params
    status = query.get("status") or None
    limit_raw = query.get("limit", "20")
    errors = []
    if status is not None and status not in ("pending", "delivered", "failed"):
        errors.append(FieldError("status", "must be one of: pending, delivered, failed"))
    if not (limit_raw.isascii() and limit_raw.isdigit()) or not 1 <= int(limit_raw) <= MAX_PAGE_SIZE:
        errors.append(FieldError("limit", f"must be an integer from 1 to {MAX_PAGE_SIZE}"))
    if errors:
        raise validation_problem(errors)
    limit = int(limit_raw)
    store: Store = request.app.state.store
    messages = await store.messages.list_for_account(
        account.id, limit=limit + 1, before=query.get("cursor") or None, status=status
    )
    page, has_more = messages[:limit], len(messages) > limit
    return JSONResponse(
        {
            "object": "list",
            "data": [message.resource() for message in page],
            "has_more": has_more,
            "next_cursor": page[-1].id if has_more else None,
        }
    )


async def get_webhook_secret(request: Request) -> Response:
    account = await require_account(request)
    return JSONResponse({"object": "webhook_secret", "secret": account.webhook_secret})


routes = [
    Route("/v1/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/deliveries/{msg_id}", get_delivery, methods=["GET"]),
    Route("/v1/webhook-secret", get_webhook_secret, methods=["GET"]),
]
