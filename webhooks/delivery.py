"""One delivery attempt: POST the signed body, classify the answer, never raise for the receiver's faults."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from webhooks.messages import RESPONSE_EXCERPT_BYTES, is_success
from webhooks.signing import sign_headers

USER_AGENT = "Darkroom-Webhooks/1"


@dataclass(frozen=True)
class AttemptOutcome:
    status_code: int | None
    latency_ms: float
    response_excerpt: str
    error: str | None

    @property
    def succeeded(self) -> bool:
        return is_success(self.status_code)


async def post_signed(
    client: httpx.AsyncClient, url: str, msg_id: str, body: bytes, secrets: Sequence[str]
) -> AttemptOutcome:
    """Send `body` exactly as given; a redirect is a failure (the receiver must name its real URL)."""
    headers = {
        **sign_headers(secrets, msg_id, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    started = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, content=body, headers=headers, follow_redirects=False
        ) as response:
            excerpt = await _read_excerpt(response)
    except httpx.TimeoutException:
        return AttemptOutcome(None, _elapsed_ms(started), "", "timeout")
    except httpx.HTTPError as exc:
        return AttemptOutcome(None, _elapsed_ms(started), "", f"connection failed: {type(exc).__name__}")
    error = None if is_success(response.status_code) else f"HTTP {response.status_code}"
    if response.is_redirect:
        error = f"HTTP {response.status_code} redirect (not followed)"
    return AttemptOutcome(response.status_code, _elapsed_ms(started), excerpt, error)


async def _read_excerpt(response: httpx.Response) -> str:
    received = bytearray()
    async for chunk in response.aiter_raw():
        received.extend(chunk)
        if len(received) >= RESPONSE_EXCERPT_BYTES:
            break
    return bytes(received[:RESPONSE_EXCERPT_BYTES]).decode("utf-8", errors="replace")


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def retry_delay(schedule: Sequence[float], attempts_made: int) -> float | None:
    """Seconds to wait before the next attempt, or None once the schedule is spent."""
    index = attempts_made - 1
    return schedule[index] if 0 <= index < len(schedule) else None
