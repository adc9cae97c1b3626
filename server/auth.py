"""API key authentication: `Authorization: Bearer sk_live_…` or `X-API-Key: sk_live_…`."""

from __future__ import annotations

from starlette.requests import Request

from jobs.records import Account
from jobs.store import Store
from server.problems import Problem
from server.ratelimit import count_request, request_limits

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="darkroom"'}


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    # Trimmed like the Bearer credentials: a key pasted with a trailing newline or space is still the key.
    return request.headers.get("x-api-key", "").strip() or None


async def require_account(request: Request) -> Account:
    """The request's account, its request counted against its plan's rate limit (429 when over it).
    Asked again for the same request, the same account, not counted again."""
    known = request_limits(request)
    if known is not None:
        return known.account
    api_key = presented_key(request)
    if api_key is None:
        raise Problem(
            401,
            "missing_api_key",
            "send your API key as `Authorization: Bearer sk_live_…`",
            headers=_CHALLENGE,
        )
    store: Store = request.app.state.store
    account = await store.authenticate(api_key)
    if account is None:
        raise Problem(401, "invalid_api_key", "the API key is not valid", headers=_CHALLENGE)
    await count_request(request, account)
    return account
