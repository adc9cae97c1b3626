"""One delivery attempt: POST the signed body, classify the answer, never raise for the receiver's faults."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from webhooks.messages import is_success
from webhooks.signing import sign_headers
from webhooks.transport import DeliveryClient, Timeout, TransportError


@dataclass(frozen=True)
class AttemptOutcome:
    status_code: int | None
    latency_ms: float
    response_excerpt: str
    error: str | None
    retry_after: str | None = None  # the receiver's Retry-After header, raw
    timed_out: bool = False
    resent: str | None = None  # why the request went twice within this attempt (the transport's note)

    @property
    def succeeded(self) -> bool:
        return is_success(self.status_code)


async def post_signed(
    client: DeliveryClient, url: str, msg_id: str, body: bytes, secrets: Sequence[str]
) -> AttemptOutcome:
    """Send `body` exactly as given; a redirect is a failure (the receiver must name its real URL)."""
    headers = {**sign_headers(secrets, msg_id, body), "content-type": "application/json"}
    started = time.perf_counter()
    try:
        response = await client.post(url, body, headers)
    except Timeout as exc:
        return AttemptOutcome(None, _elapsed_ms(started), "", str(exc), timed_out=True, resent=exc.resent)
    except TransportError as exc:
        return AttemptOutcome(None, _elapsed_ms(started), "", str(exc), resent=exc.resent)
    status = response.status_code
    error = None if is_success(status) else f"HTTP {status}"
    if 300 <= status < 400:
        error = f"HTTP {status} redirect (not followed)"
    excerpt = response.body_excerpt.decode("utf-8", errors="replace")
    return AttemptOutcome(
        status, response.elapsed_ms, excerpt, error, response.retry_after, resent=response.resent
    )


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def retry_delay(schedule: Sequence[float], attempts_made: int) -> float | None:
    """Seconds to wait before the next attempt, or None once the schedule is spent."""
    index = attempts_made - 1
    return schedule[index] if 0 <= index < len(schedule) else None
