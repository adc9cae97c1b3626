"""Failed authentications per client address: a limit of their own, so that guessing API keys soon costs
the guesser 429s and us no lookups.

Every `invalid_api_key` 401 of the API and every sign-in of the dashboard refused for its key takes one
unit of the address's allowance: `DARKROOM_FAILED_AUTH_LIMIT` per `DARKROOM_FAILED_AUTH_WINDOW` seconds,
in Redis, by the plans' GCRA (server/ratelimit.py), so one unit comes back every window/limit seconds.
A valid key takes nothing. Once the allowance is used up, the address is answered 429 (a problem
`too_many_failed_authentications`, or the sign-in page) until a unit comes back, and its key is not
looked up. A web process that refused an address remembers until when, so that what the address sends
meanwhile costs no Redis round trip at all; on the API, a key this process has accepted before is still
looked up (a partner's working service is not shut out by a broken one sharing its address), and the
dashboard's sign-in also asks Redis first, so that no web process checks a key for a limited address.

The address is the one uvicorn gives the request: the peer's, or the `X-Forwarded-For` client's when
the peer is a proxy uvicorn trusts (its `FORWARDED_ALLOW_IPS`, loopback only by default). IPv6
addresses count by their /64, which one client usually holds whole. A loopback client is not limited:
a process on this machine guesses nothing it could not read, and a wrong key it sends (a test, a
script being set up) is answered 401 however often.
"""

from __future__ import annotations

import ipaddress
import math
import time

from starlette.requests import Request

from jobs.settings import Settings
from server.problems import Problem
from server.ratelimit import RateLimiter

IPV6_CLIENT_PREFIX = 64
# Addresses one web process remembers refusing; past this, it forgets the longest remembered first.
MAX_REMEMBERED_ADDRESSES = 10_000


class TooManyFailedAuthentications(Problem):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            "too_many_failed_authentications",
            f"too many requests from this address failed to authenticate; retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


def client_address(request: Request) -> str | None:
    """Whose failures a request's count among; None for a client not limited: none named by the server,
    or one on this machine (a loopback peer that no trusted proxy header says is another)."""
    if request.client is None:
        return None
    host = request.client.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


class FailedAuthentications:
    def __init__(self, limiter: RateLimiter, settings: Settings) -> None:
        self._limiter = limiter
        self._limit = settings.failed_auth_limit
        self._window = settings.failed_auth_window
        # Address → the monotonic time this process refuses it until.
        self._refused_until: dict[str, float] = {}

    def remembered_refusal(self, address: str | None) -> TooManyFailedAuthentications | None:
        """The 429 for `address` if this process refused it and the wait it gave is not over."""
        if address is None or address not in self._refused_until:
            return None
        left = self._refused_until[address] - time.monotonic()
        if left <= 0:
            del self._refused_until[address]
            return None
        return TooManyFailedAuthentications(math.ceil(left))

    async def refusal(self, address: str | None) -> TooManyFailedAuthentications | None:
        """The 429 for `address` if it may not try now, as this process remembers or Redis knows."""
        remembered = self.remembered_refusal(address)
        if remembered is not None or address is None:
            return remembered
        return await self._decide(address, take=False)

    async def count_failure(self, address: str | None) -> TooManyFailedAuthentications | None:
        """One more failure from `address`; the 429 if it was one too many (the failure not counted)."""
        if address is None:
            return None
        return await self._decide(address, take=True)

    async def _decide(self, address: str, *, take: bool) -> TooManyFailedAuthentications | None:
        allowance = await self._limiter.check(
            f"address:{address}",
            "failed_authentications",
            self._limit,
            take=take,
            window_seconds=self._window,
        )
        if not allowance.refused:
            return None
        self._refused_until.pop(address, None)
        if len(self._refused_until) >= MAX_REMEMBERED_ADDRESSES:
            del self._refused_until[next(iter(self._refused_until))]
        self._refused_until[address] = time.monotonic() + allowance.reset
        return TooManyFailedAuthentications(allowance.reset)
