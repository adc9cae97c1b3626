"""Rate limits: each account's requests and uploads per minute, shared by every web process through Redis.

GCRA (the generic cell rate algorithm): an allowance of `q` per minute lets one unit through every
60/q seconds, and up to `q` at once after a quiet minute. Redis keeps, per account and allowance, one
number, the theoretical arrival time (TAT) of the next unit; one Lua script reads it against Redis's own
clock (`TIME`: web processes' clocks may disagree), decides and moves it, so a check is one round trip
and two web processes cannot both take the last unit. Keys `dr:ratelimit:{account}:{requests|uploads}`
expire once the allowance is whole again.

Every authenticated request takes one unit of `requests` (in `require_account`, before any body is
read); every image it creates takes one of `uploads`. What was found goes on the response (see
`RateLimitHeaders`): `X-RateLimit-*`, and the IETF fields of draft-ietf-httpapi-ratelimit-headers-10
`RateLimit-Policy` and `RateLimit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.plans import Plan
from jobs.records import Account
from jobs.store import APPLY_STAGED_LUA
from server.problems import Problem
from server.request_log import note_account

WINDOW_SECONDS = 60
AllowanceName = Literal["requests", "uploads"]

# gcra(key, quota, window, cost, take): the allowance's TAT (epoch ms) kept at `key`; a quota per window
# (ms), a cost in units, and true to take them or false only to ask whether they would be let through. Answers
# {let through (1/0), units left, ms until the cost would be let through (0 if it is), ms until the
# allowance is whole again}.
_GCRA_FUNCTION = """
local function gcra(key, quota, window, cost, take)
  local interval = window / quota
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
  local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
  local after = tat + cost * interval
  local wait = after - now - window
  if wait > 0 then
    return {0, math.floor((window - (tat - now)) / interval), math.ceil(wait), math.ceil(tat - now)}
  end
  if take then
    redis.call('SET', key, string.format('%.3f', after), 'PX', math.ceil(after - now))
  end
  return {1, math.floor((window - (after - now)) / interval), 0, math.ceil(after - now)}
end
"""
# KEYS[1] the allowance; ARGV: quota, window (ms), cost, and 1 to take or 0 to ask.
_GCRA = (
    _GCRA_FUNCTION
    + "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1')\n"
)
# Takes the cost as _GCRA does and, only if it was let through, applies the commands staged from ARGV[4]
# on (Store.staged_commands) in the same atomic step.
_GCRA_THEN_APPLY = (
    _GCRA_FUNCTION
    + APPLY_STAGED_LUA
    + """
local decided = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), true)
if decided[1] == 1 then apply_staged(4) end
return decided
"""
)


def allowance_key(account_id: str, name: AllowanceName) -> str:
    return f"dr:ratelimit:{account_id}:{name}"


def _whole_seconds(ms: int) -> int:
    return math.ceil(ms / 1000)


@dataclass(frozen=True)
class Allowance:
    """What one check found of an account's allowance."""

    name: AllowanceName
    quota: int
    remaining: int
    # Seconds until the allowance is whole again; on a refusal, until what was asked is let through.
    reset: int
    refused: bool

    def field_item(self) -> str:
        return f'"{self.name}";r={self.remaining};t={self.reset}'


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._gcra = redis.register_script(_GCRA)
        self._gcra_then_apply = redis.register_script(_GCRA_THEN_APPLY)

    async def check(
        self, account_id: str, name: AllowanceName, quota: int, cost: int = 1, *, take: bool = True
    ) -> Allowance:
        """Take `cost` units of the allowance if all of them are there (only ask, if not `take`)."""
        answer = await self._gcra(
            keys=[allowance_key(account_id, name)],
            args=[quota, WINDOW_SECONDS * 1000, cost, int(take)],
        )
        return _allowance(name, quota, answer)

    async def take_then_apply(
        self, account_id: str, name: AllowanceName, quota: int, cost: int, commands: Sequence[Any]
    ) -> Allowance:
        """Take `cost` units as `check` does and, only if they were there, apply `commands` (staged by
        Store.staged_commands) with them: one round trip, and never one without the other."""
        answer = await self._gcra_then_apply(
            keys=[allowance_key(account_id, name)], args=[quota, WINDOW_SECONDS * 1000, cost, *commands]
        )
        return _allowance(name, quota, answer)


def _allowance(name: AllowanceName, quota: int, answer: Sequence[int]) -> Allowance:
    let_through, remaining, wait_ms, whole_ms = answer
    refused = not let_through
    reset = max(1, _whole_seconds(wait_ms)) if refused else _whole_seconds(whole_ms)
    return Allowance(name, quota, remaining, reset, refused)


@dataclass
class RequestLimits:
    """The rate limits of one request's account: what its checks found, for the response's headers."""

    account: Account
    requests: Allowance
    uploads: Allowance | None = None

    @property
    def shown(self) -> Allowance:
        """The allowance the X-RateLimit-* headers describe: uploads, once the request counted some."""
        return self.uploads or self.requests

    def headers(self) -> list[tuple[bytes, bytes]]:
        plan = self.account.plan
        policy = (
            f'"requests";q={plan.requests_per_minute};w={WINDOW_SECONDS}, '
            f'"uploads";q={plan.uploads_per_minute};w={WINDOW_SECONDS}'
        )
        state = ", ".join(each.field_item() for each in (self.requests, self.uploads) if each is not None)
        return [
            (b"x-ratelimit-limit", str(self.shown.quota).encode()),
            (b"x-ratelimit-remaining", str(self.shown.remaining).encode()),
            (b"x-ratelimit-reset", str(self.shown.reset).encode()),
            (b"ratelimit-policy", policy.encode()),
            (b"ratelimit", state.encode()),
        ]


# Kept in the request's scope itself: `scope["state"]` is a copy of the lifespan state for each request
# under uvicorn, but one dict shared by every request under asgi-lifespan (the tests' app).
_SCOPE_KEY = "darkroom.rate_limits"


def request_limits(request: Request) -> RequestLimits | None:
    """The limits `require_account` checked for this request (None before, or without an account)."""
    limits: RequestLimits | None = request.scope.get(_SCOPE_KEY)
    return limits


def _rate_limited(allowance: Allowance, what: str) -> Problem:
    return Problem(
        429,
        "rate_limited",
        f"the account's plan allows {allowance.quota} {what} per minute; retry after {allowance.reset} s",
        headers={"Retry-After": str(allowance.reset)},
    )


async def count_request(request: Request, account: Account) -> None:
    """The request is the account's (its log line says so): take one request from the account's
    allowance, 429 `rate_limited` when none is left."""
    note_account(request, account.id)
    limiter: RateLimiter = request.app.state.rate_limiter
    allowance = await limiter.check(account.id, "requests", account.plan.requests_per_minute)
    request.scope[_SCOPE_KEY] = RequestLimits(account, allowance)
    if allowance.refused:
        raise _rate_limited(allowance, "requests")


def _account_limits(request: Request) -> RequestLimits:
    limits = request_limits(request)
    assert limits is not None, "require_account counts the request before its uploads"
    return limits


async def _check_uploads(request: Request, count: int, *, take: bool, then_apply: Sequence[Any] = ()) -> None:
    limits = _account_limits(request)
    plan: Plan = limits.account.plan
    if count > plan.uploads_per_minute:
        raise Problem(
            422,
            "too_many_images",
            f"this request adds {count} images; the account's plan allows {plan.uploads_per_minute} per "
            "minute, so send them in smaller requests",
        )
    limiter: RateLimiter = request.app.state.rate_limiter
    if then_apply:
        allowance = await limiter.take_then_apply(
            limits.account.id, "uploads", plan.uploads_per_minute, count, then_apply
        )
    else:
        allowance = await limiter.check(
            limits.account.id, "uploads", plan.uploads_per_minute, count, take=take
        )
    if take or allowance.refused:
        limits.uploads = allowance
    if allowance.refused:
        raise _rate_limited(allowance, "uploads")


async def require_upload_room(request: Request) -> None:
    """Before an upload's body is read: 429 `rate_limited` if not even one more image would be let
    through now (taking nothing: how many images the body holds is known once it is read)."""
    await _check_uploads(request, 1, take=False)


async def count_uploads(request: Request, count: int, then_apply: Sequence[Any] = ()) -> None:
    """Take `count` images from the account's upload allowance, all or none: 429 `rate_limited` when
    they are not all there now, 422 `too_many_images` when they never would be. `then_apply`, commands
    staged by Store.staged_commands (saving the images), run in the same step if the images are let
    through, and only then: one round trip instead of two."""
    await _check_uploads(request, count, take=True, then_apply=then_apply)


class RateLimitHeaders:
    """Puts the rate-limit headers of the request's account on its response, whichever part of the app
    made it (a route's JSON or stream, a problem, a replay of an Idempotency-Key)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                limits: RequestLimits | None = scope.get(_SCOPE_KEY)
                if limits is not None:
                    message = {**message, "headers": [*message.get("headers", []), *limits.headers()]}
            await send(message)

        await self.app(scope, receive, send_with_limits)
