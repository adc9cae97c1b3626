"""Rate limits: each account's requests and uploads per minute, shared by every web process through Redis.

GCRA (the generic cell rate algorithm): an allowance of `q` per minute lets one unit through every
60/q seconds, and up to `q` at once after a quiet minute. Redis keeps, per account and allowance, one
number, the theoretical arrival time (TAT) of the next unit; one Lua script reads it against Redis's own
clock (`TIME`: web processes' clocks may disagree), decides and moves it, so a check is one round trip
and two web processes cannot both take the last unit. Keys `dr:ratelimit:{account}:{requests|uploads}`
expire once the allowance is whole again.

Every authenticated request takes one unit of `requests` (in `require_account`, before any body is
read); every image it creates takes one of `uploads`. A route that creates images may count its request
with them instead (`auth.counted_request`): one script takes both and saves the images, one round trip
for what would be two, and a request over its allowance still answers 429 whatever else was wrong.

What was found goes on the response (see `RateLimitHeaders`): `X-RateLimit-*`, and the IETF fields of
draft-ietf-httpapi-ratelimit-headers-10 `RateLimit-Policy` and `RateLimit`.
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
# KEYS: the allowances to take, in turn; ARGV[1] the window (ms), then a quota and a cost per key, then
# the commands staged (Store.staged_commands). Stops at the first allowance that refuses, and applies the
# commands in the same atomic step only if every one let its cost through. Answers each decision made.
_TAKE_THEN_APPLY = (
    _GCRA_FUNCTION
    + APPLY_STAGED_LUA
    + """
local window = tonumber(ARGV[1])
local decisions = {}
for index, key in ipairs(KEYS) do
  local decided = gcra(key, tonumber(ARGV[2 * index]), window, tonumber(ARGV[2 * index + 1]), true)
  decisions[index] = decided
  if decided[1] == 0 then return decisions end
end
apply_staged(2 * #KEYS + 2)
return decisions
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
        self._take_then_apply = redis.register_script(_TAKE_THEN_APPLY)

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
        self, account_id: str, costs: Sequence[tuple[AllowanceName, int, int]], commands: Sequence[Any]
    ) -> list[Allowance]:
        """Take each (allowance, quota, cost) of `costs` in turn as `check` does, stopping at the first
        that refuses, and apply `commands` (staged by Store.staged_commands) only if all were let
        through: one round trip, and never one without the others. What each allowance asked found."""
        answers = await self._take_then_apply(
            keys=[allowance_key(account_id, name) for name, _, _ in costs],
            args=[WINDOW_SECONDS * 1000, *(n for _, quota, cost in costs for n in (quota, cost)), *commands],
        )
        return [
            _allowance(name, quota, answer) for (name, quota, _), answer in zip(costs, answers, strict=False)
        ]


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
# The account of a request whose count waits for the images it creates (`defer_request_count`).
_DEFERRED_KEY = "darkroom.uncounted_account"


def request_limits(request: Request) -> RequestLimits | None:
    """The limits checked for this request's account (None before, or without an account)."""
    limits: RequestLimits | None = request.scope.get(_SCOPE_KEY)
    return limits


def deferred_account(request: Request) -> Account | None:
    """The account of a request authenticated but not counted yet (see `defer_request_count`)."""
    account: Account | None = request.scope.get(_DEFERRED_KEY)
    return account


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
    _counted(request, RequestLimits(account, allowance))


def defer_request_count(request: Request, account: Account) -> None:
    """The request is the account's, counted with the images it creates (`count_uploads`), or else by
    `count_request` once the route is done."""
    note_account(request, account.id)
    request.scope[_DEFERRED_KEY] = account


def _counted(request: Request, limits: RequestLimits) -> None:
    request.scope.pop(_DEFERRED_KEY, None)
    request.scope[_SCOPE_KEY] = limits
    if limits.requests.refused:
        raise _rate_limited(limits.requests, "requests")


async def _check_uploads(request: Request, count: int, *, take: bool, then_apply: Sequence[Any] = ()) -> None:
    limits = request_limits(request)
    account = limits.account if limits is not None else deferred_account(request)
    assert account is not None, "the request is authenticated before its uploads are counted"
    plan: Plan = account.plan
    if count > plan.uploads_per_minute:
        raise Problem(
            422,
            "too_many_images",
            f"this request adds {count} images; the account's plan allows {plan.uploads_per_minute} per "
            "minute, so send them in smaller requests",
        )
    limiter: RateLimiter = request.app.state.rate_limiter
    uploads_cost: tuple[AllowanceName, int, int] = ("uploads", plan.uploads_per_minute, count)
    if limits is None:
        assert take, "only a counted request asks for room without taking it"
        requests_cost: tuple[AllowanceName, int, int] = ("requests", plan.requests_per_minute, 1)
        decided = await limiter.take_then_apply(account.id, [requests_cost, uploads_cost], then_apply)
        limits = RequestLimits(account, decided[0])
        _counted(request, limits)
        allowance = decided[1]
    elif take:
        (allowance,) = await limiter.take_then_apply(account.id, [uploads_cost], then_apply)
    else:
        allowance = await limiter.check(account.id, "uploads", plan.uploads_per_minute, count, take=False)
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
    through, and only then: one round trip instead of two. A request whose count was deferred is
    counted in that same step, before its images."""
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
