"""`/metrics`: Prometheus text for the whole service (counters live in Redis, shared by all processes)."""

from __future__ import annotations

from collections import defaultdict

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from jobs import stats
from jobs.queue import queued_jobs
from jobs.settings import Settings
from webhooks.messages import DUE_KEY

_HELP = {
    "darkroom_images_uploaded_total": ("counter", "Images accepted for processing."),
    "darkroom_images_finished_total": ("counter", "Images that reached a terminal status, by status."),
    "darkroom_images_failed_total": ("counter", "Failed images, by error code."),
    "darkroom_webhook_attempts_total": ("counter", "Webhook delivery attempts, by outcome."),
    "darkroom_queue_jobs": ("gauge", "Image jobs queued (waiting their account's turn included) or running."),
    "darkroom_webhooks_pending": ("gauge", "Webhook messages waiting for their next attempt."),
}


def render_metrics(counters: dict[str, int], queue_jobs: int, webhooks_pending: int) -> str:
    samples: dict[str, list[str]] = defaultdict(list)
    for name, value in sorted(counters.items()):
        kind, _, label = name.partition(":")
        if kind == "images_uploaded":
            samples["darkroom_images_uploaded_total"].append(f"darkroom_images_uploaded_total {value}")
        elif kind in ("images_completed", "images_failed"):
            status = kind.removeprefix("images_")
            samples["darkroom_images_finished_total"].append(
                f'darkroom_images_finished_total{{status="{status}"}} {value}'
            )
        elif kind == "images_failed_by_code":
            samples["darkroom_images_failed_total"].append(
                f'darkroom_images_failed_total{{code="{label}"}} {value}'
            )
        elif kind == "webhook_attempts":
            samples["darkroom_webhook_attempts_total"].append(
                f'darkroom_webhook_attempts_total{{outcome="{label}"}} {value}'
            )
    samples["darkroom_queue_jobs"].append(f"darkroom_queue_jobs {queue_jobs}")
    samples["darkroom_webhooks_pending"].append(f"darkroom_webhooks_pending {webhooks_pending}")
    lines: list[str] = []
    for metric, (kind, text) in _HELP.items():
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}", *samples.get(metric, [])]
    return "\n".join(lines) + "\n"


async def metrics(request: Request) -> Response:
    redis = request.app.state.redis
    settings: Settings = request.app.state.settings
    counters = await stats.read(redis)
    queue_jobs = await queued_jobs(redis, settings.queue_name)
    webhooks_pending = await redis.zcard(DUE_KEY)
    return PlainTextResponse(
        render_metrics(counters, queue_jobs, webhooks_pending), media_type="text/plain; version=0.0.4"
    )


routes = [Route("/metrics", metrics)]
