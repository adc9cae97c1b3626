"""The sans-IO core: every call is a generator ("flow") that yields effects — send this request, stream
that response into a file, sleep — and receives their results. It builds the requests, retries, parses
answers and raises errors, and never touches the network or the clock's sleep itself, so the blocking
and the asyncio clients are two small loops running the same flows (see `darkroom_client.client`).
"""

from __future__ import annotations

import email.utils
import json
import random
import time
import uuid
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypeVar

import httpx

from darkroom_client.errors import APIError, TransportError, error_for
from darkroom_client.version import __version__

# However long a request may take, a connection that takes longer than this to open is not coming.
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Send:
    """Send the request; the result is the response, read whole."""

    request: httpx.Request
    follow_redirects: bool = False


@dataclass(frozen=True)
class Save:
    """Send the request, following redirects (to a presigned storage URL), and stream a 2xx body into
    `path`: appended after a 206 (a resumed range), replacing the file after a 200. The result is the
    response (an error answer read whole)."""

    request: httpx.Request
    path: Path


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Arrival:
    """Wait up to `seconds` for `future` (resolved by another thread, as a webhook listener's); the
    result is its value, or None when it is still pending then."""

    future: Future[Any]
    seconds: float


Effect: TypeAlias = Send | Save | Sleep | Arrival
Result = TypeVar("Result")
Flow: TypeAlias = Generator[Effect, Any, Result]


class Stepper(Generic[Result]):
    """Drives a flow for a runner: `effect` is what to perform next (None once the flow returned
    `result`); `answer` gives it the effect's outcome, `fail` the transport error it raised instead."""

    def __init__(self, flow: Flow[Result]) -> None:
        self._flow = flow
        self.effect: Effect | None = None
        self._advance(lambda: next(flow))

    @property
    def result(self) -> Result:
        return self._result

    def answer(self, outcome: Any) -> None:
        self._advance(lambda: self._flow.send(outcome))

    def fail(self, error: httpx.TransportError) -> None:
        self._advance(lambda: self._flow.throw(error))

    def _advance(self, step: Callable[[], Effect]) -> None:
        try:
            self.effect = step()
        except StopIteration as done:
            self.effect = None
            self._result: Result = done.value


RETRIED_STATUSES = frozenset({429, 502, 503, 504})
# A 409 worth waiting out: the same Idempotency-Key is still running elsewhere (it answers Retry-After: 1).
RETRIED_CODES = frozenset({"idempotency_key_in_use"})


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429, 502 to 504, a key still in use, and a failed connection: `Retry-After` when the
    service sends one (up to `max_wait`; a longer wait is raised at once), else exponential backoff
    with jitter."""

    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 20.0
    max_wait: float = 120.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.max_backoff, self.backoff * 2.0**retry) * random.uniform(0.5, 1.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def problem_of(response: httpx.Response) -> APIError:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"detail": response.text[:500] or response.reason_phrase}
    return error_for(
        response.status_code,
        problem,
        response.headers.get("x-request-id"),
        parse_retry_after(response.headers.get("retry-after")),
    )


def _retry_wait(response: httpx.Response, policy: RetryPolicy, retry: int) -> float | None:
    """How long to wait before sending again, or None when the answer is final."""
    if response.status_code == 409:
        error = problem_of(response)
        if error.code not in RETRIED_CODES:
            return None
        retry_after = error.retry_after
    elif response.status_code in RETRIED_STATUSES:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    else:
        return None
    if retry >= policy.max_retries or (retry_after is not None and retry_after > policy.max_wait):
        return None
    return policy.delay(retry, retry_after)


JsonBody = dict[str, Any] | list[Any]


class Core:
    """Request building and the retry loop, shared by every resource."""

    def __init__(self, api_key: str, base_url: str, retry: RetryPolicy) -> None:
        if not api_key:
            raise ValueError("an API key is needed (sk_live_…)")
        # Without a scheme every request fails in httpx as a transport error, which is retried with
        # backoff and then blamed on a service that may well be running there.
        if not base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"the service's URL starts with http:// or https:// (given: {base_url!r})")
        # Our paths start with /v1: with it in the base, every request is a 404 that names no wrong URL.
        if base_url.rstrip("/").lower().endswith("/v1"):
            raise ValueError(f"the service's URL is its base, without /v1 (given: {base_url!r})")
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.retry = retry

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: JsonBody | None = None,
        data: dict[str, str] | None = None,
        files: list[tuple[str, tuple[str, Any, str]]] | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        authenticated: bool = True,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Request:
        """One request, sent as is on every retry: a POST's `Idempotency-Key`, made here once per call,
        is the same on each, so the service runs the call once however many times it is sent. `timeout`
        replaces the HTTP client's own for it (a long poll is answered late on purpose)."""
        sent = {"User-Agent": f"darkroom-client/{__version__}", **(headers or {})}
        if authenticated:
            sent["Authorization"] = f"Bearer {self.api_key}"
        if method == "POST" and authenticated:
            sent["Idempotency-Key"] = str(uuid.uuid4())
        kept = None if params is None else {k: v for k, v in params.items() if v is not None}
        return httpx.Request(
            method,
            self.url(path),
            params=kept,
            json=json_body,
            data=data,
            files=files,
            content=content,
            headers=sent,
            extensions=None if timeout is None else {"timeout": timeout.as_dict()},
        )

    def send(self, request: httpx.Request, *, follow_redirects: bool = False) -> Flow[httpx.Response]:
        """The response to `request`, after retries; an `APIError` for a problem answer."""
        return self.exchange(lambda: Send(request, follow_redirects))

    def exchange(self, effect: Callable[[], Send | Save]) -> Flow[httpx.Response]:
        """Yield `effect()` until it gets a final answer, waiting between tries as the policy says;
        `effect` is called again for each try (a resumed download asks from where the file ends)."""
        retry = 0
        while True:
            try:
                response: httpx.Response = yield effect()
            except httpx.TransportError as exc:
                if retry >= self.retry.max_retries:
                    raise TransportError(f"{type(exc).__name__}: {exc}") from exc
                yield Sleep(self.retry.delay(retry, None))
                retry += 1
                continue
            if response.is_success:
                return response
            wait = _retry_wait(response, self.retry, retry)
            if wait is None:
                raise problem_of(response)
            yield Sleep(wait)
            retry += 1

    def call(self, method: str, path: str, **options: Any) -> Flow[Any]:
        """The JSON answer to one request (None for an empty body, as a 204)."""
        response = yield from self.send(self.request(method, path, **options))
        return response.json() if response.content else None


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
