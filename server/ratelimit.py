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
from jobs.store import ACCOUNT_UNCHANGED_LUA, APPLY_STAGED_LUA, RememberedAccount, Store
from server.problems import Problem
from server.request_log import note_account

WINDOW_SECONDS = 60
AllowanceName = Literal["requests", "uploads", "failed_authentications"]

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
# KEYS: the allowances to take, in turn, then (when ARGV[3] is not empty) the API key's entry and the
# account's key; ARGV[1] the window (ms), ARGV[2] how many allowances, ARGV[3] and ARGV[4] the account's
# id and fingerprint (its key must still name it, unchanged: else nothing is done and the answer is
# false), a quota and a cost per allowance, then the commands staged (Store.staged_commands). Stops at
# the first allowance that refuses, and applies the commands in the same atomic step only if every one
# let its cost through. Answers each decision made.
_TAKE_THEN_APPLY = (
    _GCRA_FUNCTION
    + ACCOUNT_UNCHANGED_LUA
    + APPLY_STAGED_LUA
    + """
local window, count = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[3] ~= '' and not account_unchanged(KEYS[count + 1], KEYS[count + 2], ARGV[3], ARGV[4]) then
  return false
end
local decisions = {}
for index = 1, count do
  local quota, cost = tonumber(ARGV[3 + 2 * index]), tonumber(ARGV[4 + 2 * index])
  local decided = gcra(KEYS[index], quota, window, cost, true)
  decisions[index] = decided
  if decided[1] == 0 then return decisions end
end
apply_staged(5 + 2 * count)
return decisions
"""
)


def allowance_key(holder: str, name: AllowanceName) -> str:
    """The key of `holder`'s allowance `name`: an account's (by its id), or a client address's."""
    return f"dr:ratelimit:{holder}:{name}"


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
        self,
        holder: str,
        name: AllowanceName,
        quota: int,
        cost: int = 1,
        *,
        take: bool = True,
        window_seconds: int = WINDOW_SECONDS,
    ) -> Allowance:
        """Take `cost` units of the allowance (`quota` per `window_seconds`) if all of them are there
        (only ask, if not `take`)."""
        answer = await self._gcra(
            keys=[allowance_key(holder, name)],
            args=[quota, window_seconds * 1000, cost, int(take)],
        )
        return _allowance(name, quota, answer)

    async def take_then_apply(
        self,
        account_id: str,
        costs: Sequence[tuple[AllowanceName, int, int]],
        commands: Sequence[Any],
        unchanged: RememberedAccount | None = None,
    ) -> list[Allowance] | None:
        """Take each (allowance, quota, cost) of `costs` in turn as `check` does, stopping at the first
        that refuses, and apply `commands` (staged by Store.staged_commands) only if all were let
        through: one round trip, and never one without the others. What each allowance asked found;
        with `unchanged`, None (and nothing done) if its API key no longer names that account as read."""
        checked_keys, checked_args = unchanged.checked() if unchanged is not None else ([], ["", ""])
        answers = await self._take_then_apply(
            keys=[*(allowance_key(account_id, name) for name, _, _ in costs), *checked_keys],
            args=[
                WINDOW_SECONDS * 1000,
                len(costs),
                *checked_args,
                *(n for _, quota, cost in costs for n in (quota, cost)),
                *commands,
            ],
        )
        if answers is None:
            return None
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


@dataclass(frozen=True)
class _Deferred:
    account: Account
    # Set when the account was taken from what this process remembers of the key, not read for this
    # request: the step that counts checks it.
    remembered: RememberedAccount | None


class AccountChanged(Exception):
    """The API key no longer names the account this process remembered for it."""


def request_limits(request: Request) -> RequestLimits | None:
    """The limits checked for this request's account (None before, or without an account)."""
    limits: RequestLimits | None = request.scope.get(_SCOPE_KEY)
    return limits


def deferred_account(request: Request) -> Account | None:
    """The account of a request authenticated but not counted yet (see `defer_request_count`); None if
    there is none, or it is only remembered, not yet checked."""
    deferred: _Deferred | None = request.scope.get(_DEFERRED_KEY)
    return deferred.account if deferred is not None and deferred.remembered is None else None


def _rate_limited(allowance: Allowance, what: str) -> Problem:
    return Problem(
        429,
        "rate_limited",
        f"the account's plan allows {allowance.quota} {what} per minute; retry after {allowance.reset} s",
        headers={"Retry-After": str(allowance.reset)},
    )


def _too_many_images(count: int, plan: Plan) -> Problem:
    return Problem(
        422,
        "too_many_images",
        f"this request adds {count} images; the account's plan allows {plan.uploads_per_minute} per "
        "minute, so send them in smaller requests",
    )


async def count_request(request: Request, account: Account) -> None:
    """The request is the account's (its log line says so): take one request from the account's
    allowance, 429 `rate_limited` when none is left."""
    note_account(request, account.id)
    limiter: RateLimiter = request.app.state.rate_limiter
    allowance = await limiter.check(account.id, "requests", account.plan.requests_per_minute)
    _counted(request, RequestLimits(account, allowance))


def defer_request_count(
    request: Request, account: Account, remembered: RememberedAccount | None = None
) -> None:
    """The request is `account`'s (read for it, or `remembered`), counted with the images it creates
    (`count_uploads`), or else by `count_request` once the route is done."""
    request.scope[_DEFERRED_KEY] = _Deferred(account, remembered)


def _counted(request: Request, limits: RequestLimits) -> None:
    note_account(request, limits.account.id)
    request.scope.pop(_DEFERRED_KEY, None)
    request.scope[_SCOPE_KEY] = limits
    if limits.requests.refused:
        raise _rate_limited(limits.requests, "requests")


async def _count_with_uploads(request: Request, count: int, then_apply: Sequence[Any]) -> None:
    """Take the deferred request and its `count` images from the account's allowances, and apply
    `then_apply`, in one step; a remembered account is checked in that step, and read again if it
    changed (AccountChanged if its key names it no more)."""
    deferred: _Deferred | None = request.scope.get(_DEFERRED_KEY)
    assert deferred is not None, "the request is authenticated before its uploads are counted"
    limiter: RateLimiter = request.app.state.rate_limiter
    account, unchanged = deferred.account, deferred.remembered
    decided = None
    while decided is None:
        plan = account.plan
        # Refused on the plan as read for this request, not as remembered.
        if count > plan.uploads_per_minute and unchanged is None:
            raise _too_many_images(count, plan)
        if count <= plan.uploads_per_minute:
            costs: list[tuple[AllowanceName, int, int]] = [
                ("requests", plan.requests_per_minute, 1),
                ("uploads", plan.uploads_per_minute, count),
            ]
            decided = await limiter.take_then_apply(account.id, costs, then_apply, unchanged)
        if decided is None:
            assert unchanged is not None, "only a remembered account is checked"
            store: Store = request.app.state.store
            read = await store.account_for_key_hash(unchanged.key_hash)
            if read is None or read.id != account.id:
                raise AccountChanged(account.id)
            account, unchanged = read, None
    limits = RequestLimits(account, decided[0])
    _counted(request, limits)
    limits.uploads = decided[1]
    if limits.uploads.refused:
        raise _rate_limited(limits.uploads, "uploads")


async def _check_uploads(request: Request, count: int, *, take: bool, then_apply: Sequence[Any] = ()) -> None:
    limits = request_limits(request)
    if limits is None:
        assert take, "only a counted request asks for room without taking it"
        await _count_with_uploads(request, count, then_apply)
        return
    plan: Plan = limits.account.plan
    if count > plan.uploads_per_minute:
        raise _too_many_images(count, plan)
    limiter: RateLimiter = request.app.state.rate_limiter
    if take:
        uploads_cost: tuple[AllowanceName, int, int] = ("uploads", plan.uploads_per_minute, count)
        decided = await limiter.take_then_apply(limits.account.id, [uploads_cost], then_apply)
        assert decided is not None, "no account to check, so nothing to fail"
        (allowance,) = decided
    else:
        allowance = await limiter.check(
            limits.account.id, "uploads", plan.uploads_per_minute, count, take=False
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
