"""`/metrics`: Prometheus text for the whole service, whichever web process answers.

Every process counts and observes into Redis (jobs/stats.py): web processes their requests, workers
their jobs and webhook attempts. This reads it all back and hands it to prometheus-client, which writes
the exposition format; nothing is kept in the process itself, which only ever saw its own part.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs import stats
from jobs.queue import queued_jobs
from jobs.settings import Settings
from webhooks.messages import DUE_KEY

# Methods counted by name; any other a client sends is counted as OTHER, so it adds no series.
_COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route of a request no route matched (each path would otherwise be a series of its own).
UNMATCHED_ROUTE = "unmatched"


# How often a web process adds the requests it answered to the service's counts in Redis.
REQUEST_COUNTS_FLUSH_SECONDS = 1.0


# Adds ARGV's (field, amount) pairs to the counters hash KEYS[2], unless the flush named by KEYS[1] was
# applied already: a flush whose reply was lost is sent again as it was, and counts once.
_APPLY_FLUSH = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""
FLUSH_MARKER_PREFIX = "dr:stats:flush:"
# How long Redis remembers an applied flush: far longer than a web process keeps sending one again.
FLUSH_MARKER_TTL_MS = 600_000


class RequestCounts:
    """The requests this web process answered and has not yet added to Redis. Counted in memory, so a
    request never waits for Redis (nor for one that hangs) to be counted, and a second of requests costs
    one round trip."""

    def __init__(self) -> None:
        self._unsent: Counter[str] = Counter()
        # Sent, with no answer (Redis failed, or stalled past the timeout and may yet apply it): sent
        # again as it was, under its token, before anything newer.
        self._unconfirmed: tuple[str, Counter[str]] | None = None

    def count(self, method: str, route: str | None, status: int) -> None:
        method = method if method in _COUNTED_METHODS else "OTHER"
        self._unsent[f"requests:{method}|{route or UNMATCHED_ROUTE}|{status}"] += 1

    async def flush(self, redis: Redis) -> None:
        """Add the unsent counts to Redis, each once: if Redis fails, they wait for the next flush."""
        if self._unconfirmed is not None:
            await self._send(redis, *self._unconfirmed)
        if self._unsent:
            self._unconfirmed, self._unsent = (secrets.token_hex(8), self._unsent), Counter()
            await self._send(redis, *self._unconfirmed)

    async def _send(self, redis: Redis, token: str, sending: Counter[str]) -> None:
        pairs = [part for field, amount in sending.items() for part in (field, str(amount))]
        marker = FLUSH_MARKER_PREFIX + token
        await redis.eval(_APPLY_FLUSH, 2, marker, stats.STATS_KEY, str(FLUSH_MARKER_TTL_MS), *pairs)  # type: ignore[misc]
        # Unless a flush beside this one (/metrics asking) confirmed it first and went on to newer counts.
        if self._unconfirmed is not None and self._unconfirmed[0] == token:
            self._unconfirmed = None


@contextlib.asynccontextmanager
async def request_counting(redis: Redis) -> AsyncIterator[RequestCounts]:
    """A web process's request counts, added to Redis every REQUEST_COUNTS_FLUSH_SECONDS and once more
    when it stops."""
    counts = RequestCounts()

    async def flush_every_interval() -> None:
        while True:
            await asyncio.sleep(REQUEST_COUNTS_FLUSH_SECONDS)
            with contextlib.suppress(RedisError, OSError):
                await counts.flush(redis)

    flushing = asyncio.create_task(flush_every_interval())
    try:
        yield counts
    finally:
        flushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flushing
        with contextlib.suppress(RedisError, OSError):
            await counts.flush(redis)


class _Snapshot(Collector):
    """What Redis held when `/metrics` was asked, as metric families."""

    def __init__(
        self,
        counters: dict[str, int],
        histograms: dict[stats.Histogram, stats.HistogramCounts],
        queue_jobs: int,
        webhooks_pending: int,
    ) -> None:
        self.counters = counters
        self.histograms = histograms
        self.queue_jobs = queue_jobs
        self.webhooks_pending = webhooks_pending

    def collect(self) -> Iterator[Metric]:
        uploaded = CounterMetricFamily("darkroom_images_uploaded", "Images accepted for processing.")
        finished = CounterMetricFamily(
            "darkroom_images_finished", "Images that reached a terminal status, by status.", labels=["status"]
        )
        failed = CounterMetricFamily(
            "darkroom_images_failed", "Failed images, by error code.", labels=["code"]
        )
        attempts = CounterMetricFamily(
            "darkroom_webhook_attempts", "Webhook delivery attempts, by outcome.", labels=["outcome"]
        )
        requests = CounterMetricFamily(
            "darkroom_http_requests",
            "Requests answered by the web processes, by method, route template and status.",
            labels=["method", "route", "status"],
        )
        for name, value in sorted(self.counters.items()):
            kind, _, label = name.partition(":")
            if kind == "images_uploaded":
                uploaded.add_metric([], value)
            elif kind in ("images_completed", "images_failed"):
                finished.add_metric([kind.removeprefix("images_")], value)
            elif kind == "images_failed_by_code":
                failed.add_metric([label], value)
            elif kind == "webhook_attempts":
                attempts.add_metric([label], value)
            elif kind == "requests":
                requests.add_metric(label.split("|"), value)
        yield from (uploaded, finished, failed, attempts, requests)
        for histogram, counts in self.histograms.items():
            family = HistogramMetricFamily(histogram.name, histogram.help, unit="seconds")
            # prometheus-client spells bounds (`le`) as its own histograms do: "60.0", "+Inf".
            buckets = [(floatToGoString(bound), running) for bound, running in counts.buckets]  # type: ignore[no-untyped-call]
            family.add_metric([], buckets, counts.sum)
            yield family
        yield GaugeMetricFamily(
            "darkroom_queue_jobs",
            "Image jobs queued (waiting their account's turn included) or running.",
            value=self.queue_jobs,
        )
        yield GaugeMetricFamily(
            "darkroom_webhooks_pending",
            "Webhook messages waiting for their next attempt.",
            value=self.webhooks_pending,
        )


async def metrics(request: Request) -> Response:
    redis = request.app.state.redis
    settings: Settings = request.app.state.settings
    # This process's own requests are up to date; the other web processes' are at most a flush behind.
    await request.app.state.request_counts.flush(redis)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        _Snapshot(
            await stats.read(redis),
            await stats.read_histograms(redis),
            await queued_jobs(redis, settings.queue_name),
            await redis.zcard(DUE_KEY),
        )
    )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics)]
