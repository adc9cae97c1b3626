"""API key authentication: `Authorization: Bearer sk_live_…` or `X-API-Key: sk_live_…`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from jobs.records import Account
from jobs.store import API_KEY_PREFIX, Store
from server.failed_authentications import FailedAuthentications, client_address
from server.problems import Problem
from server.ratelimit import count_request, defer_request_count, deferred_account, request_limits
from webhooks.signing import SECRET_PREFIX as WEBHOOK_SECRET_PREFIX

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
    account = deferred_account(request) or await _authenticated(request)
    await count_request(request, account)
    return account


@asynccontextmanager
async def counted_request(request: Request) -> AsyncIterator[Account]:
    """The request's account, for a route that creates images: its request is counted with them, in
    the round trip that saves them (`count_uploads`); if the route ends before that (a refused body),
    on its own as it ends, so that a request over the allowance is a 429 whatever else was wrong. A key
    this process authenticated before is not looked up first: that step checks it still names the
    account (a round trip fewer); a route that ends before it checks the key as any request does."""
    known = request_limits(request)
    if known is not None:
        yield known.account
        return
    store: Store = request.app.state.store
    api_key = presented_key(request)
    remembered = None if api_key is None else store.remembered_account(api_key)
    account = remembered.account if remembered is not None else await _authenticated(request)
    defer_request_count(request, account, remembered)
    try:
        yield account
    finally:
        if request_limits(request) is None:
            if remembered is not None:
                # A 401 if the key names no account now (AccountChanged, say).
                account = await _authenticated(request)
            await count_request(request, account)


async def _authenticated(request: Request) -> Account:
    api_key = presented_key(request)
    if api_key is None:
        raise Problem(
            401,
            "missing_api_key",
            "send your API key as `Authorization: Bearer sk_live_…`",
            headers=_CHALLENGE,
        )
    store: Store = request.app.state.store
    failures: FailedAuthentications = request.app.state.failed_authentications
    address = client_address(request)
    refused = failures.remembered_refusal(address)
    # A limited address's keys are not looked up, but for one this process has accepted: a partner's
    # working service is not shut out by a broken one sharing its address.
    if refused is not None and store.remembered_account(api_key) is None:
        raise refused
    account = await store.authenticate(api_key)
    if account is None:
        raise await failures.count_failure(address) or Problem(
            401, "invalid_api_key", why_key_refused(api_key), headers=_CHALLENGE
        )
    return account


def why_key_refused(api_key: str) -> str:
    """What a partner can do about a refused key, told from its form alone (nothing about accounts)."""
    if api_key.startswith(WEBHOOK_SECRET_PREFIX):
        return (
            "the API key is not valid: this is a webhook secret (whsec_…), which verifies webhooks; "
            f"send the account's API key ({API_KEY_PREFIX}…)"
        )
    if not api_key.startswith(API_KEY_PREFIX):
        return f"the API key is not valid: API keys start with {API_KEY_PREFIX}"
    return "the API key is not valid: no account has it; send the key as it was given when it was made"
