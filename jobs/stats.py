"""Service-wide counters and latency histograms in Redis hashes, so `/metrics` on any web process shows
every process's work.

Counts and observations are staged inside the transactions that make the change (an image finishing,
a webhook attempt recorded), so a re-run job never counts twice, and they cost no round trip of their
own.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from jobs.records import ImageRecord, epoch_ms
from webhooks.messages import Attempt, AttemptCounts, Delivery, Message, now_ms

STATS_KEY = "dr:stats"
# Each histogram's observations by bucket (`<name>:<upper bound>`, not cumulative) and their sum.
HISTOGRAMS_KEY = "dr:histograms"
IMAGE_EVENTS = frozenset({"image.completed", "image.failed"})


@dataclass(frozen=True)
class Histogram:
    """A latency histogram: `buckets` are upper bounds in seconds, ascending (+Inf is implied)."""

    name: str
    help: str
    buckets: tuple[float, ...]

    def bucket_of(self, seconds: float) -> str:
        index = bisect.bisect_left(self.buckets, seconds)
        return "+Inf" if index == len(self.buckets) else bound_label(self.buckets[index])


def bound_label(bound: float) -> str:
    return format(bound, "g")


# Each spans what its latency ranges over: a webhook delivered in a second after a quick render, up to
# one retried for hours; a job that starts at once, or behind a long queue.
UPLOAD_TO_WEBHOOK = Histogram(
    "darkroom_upload_to_webhook_seconds",
    "From an image's upload to its webhook delivered (each destination's first 2xx answer).",
    (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600),
)
QUEUE_WAIT = Histogram(
    "darkroom_queue_wait_seconds",
    "From an image's upload (a direct upload's bytes or start) to the start of its processing (its "
    "last start, for one run again).",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
RENDER = Histogram(
    "darkroom_render_seconds",
    "Rendering one image: decoding, its operations and encoding the result.",
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
WEBHOOK_ATTEMPT = Histogram(
    "darkroom_webhook_attempt_seconds",
    "One webhook delivery attempt, from connecting to the receiver's answer (or the timeout).",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)
HISTOGRAMS = (UPLOAD_TO_WEBHOOK, QUEUE_WAIT, RENDER, WEBHOOK_ATTEMPT)


def count(pipe: Any, name: str, amount: int = 1) -> None:
    pipe.hincrby(STATS_KEY, name, amount)


def observe(pipe: Any, histogram: Histogram, seconds: float) -> None:
    pipe.hincrby(HISTOGRAMS_KEY, f"{histogram.name}:{histogram.bucket_of(seconds)}", 1)
    pipe.hincrbyfloat(HISTOGRAMS_KEY, f"{histogram.name}:sum", seconds)


def count_finished(pipe: Any, status: str, error_code: str | None) -> None:
    count(pipe, f"images_{status}")
    if error_code is not None:
        count(pipe, f"images_failed_by_code:{error_code}")


def observe_job(pipe: Any, image: ImageRecord, render_seconds: float | None) -> None:
    """The finished job's wait in the queue and its render (when it got that far)."""
    if image.queue_wait_ms is not None:
        observe(pipe, QUEUE_WAIT, image.queue_wait_ms / 1000)
    if render_seconds is not None:
        observe(pipe, RENDER, render_seconds)


def count_attempt(counts: AttemptCounts, message: Message, delivery: Delivery, attempt: Attempt) -> None:
    count(counts, f"webhook_attempts:{'delivered' if attempt.succeeded else 'failed'}")
    if attempt.url is not None:  # a request was sent (a refusal sends none)
        observe(counts, WEBHOOK_ATTEMPT, attempt.latency_ms / 1000)
    # A delivery sent again on request after it succeeded says nothing of how long the upload took.
    first_success = attempt.succeeded and not any(earlier.succeeded for earlier in delivery.attempts)
    if first_success and message.event_type in IMAGE_EVENTS:
        uploaded = json.loads(message.body)["data"]["created_at"]
        observe(counts, UPLOAD_TO_WEBHOOK, (now_ms() - epoch_ms(uploaded)) / 1000)


async def read(redis: Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = await redis.hgetall(STATS_KEY)  # type: ignore[misc]
    return {name.decode(): int(value) for name, value in raw.items()}


@dataclass(frozen=True)
class HistogramCounts:
    buckets: list[tuple[float, int]]  # (upper bound, observations up to it), cumulative, inf last
    sum: float


async def read_histograms(redis: Redis) -> dict[Histogram, HistogramCounts]:
    raw: dict[bytes, bytes] = await redis.hgetall(HISTOGRAMS_KEY)  # type: ignore[misc]
    fields = {name.decode(): value for name, value in raw.items()}
    counts = {}
    for histogram in HISTOGRAMS:
        running, cumulative = 0, []
        for bound in [*histogram.buckets, math.inf]:
            label = "+Inf" if bound == math.inf else bound_label(bound)
            running += int(fields.get(f"{histogram.name}:{label}", 0))
            cumulative.append((bound, running))
        counts[histogram] = HistogramCounts(cumulative, float(fields.get(f"{histogram.name}:sum", 0)))
    return counts
