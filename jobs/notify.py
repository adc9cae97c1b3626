"""Deliver one webhook attempt and schedule the next: the core behind the `deliver_webhook` task.

Attempt `n` of a message runs as arq job `deliver:{msg}:{n}`; a re-run of the same job after a crash
does not record the attempt twice, and always makes sure the following attempt is scheduled.
"""

from __future__ import annotations

from jobs import stats
from jobs.deps import WorkerDeps
from jobs.events import iso_in, schedule_delivery, seconds_until
from jobs.records import utc_now
from webhooks.delivery import post_signed, retry_delay
from webhooks.messages import Attempt, Message, MessageStatus


async def deliver_webhook(deps: WorkerDeps, msg_id: str, attempt_number: int) -> None:
    message = await deps.store.messages.get(msg_id)
    if message is None or message.status != "pending":
        return
    if len(message.attempts) < attempt_number:
        message = await _attempt(deps, message, attempt_number)
    last = message.attempts[-1]
    if message.status == "pending" and last.next_attempt_at is not None:
        await schedule_delivery(
            deps.redis, deps.settings.queue_name, msg_id, last.number + 1, seconds_until(last.next_attempt_at)
        )


async def _attempt(deps: WorkerDeps, message: Message, attempt_number: int) -> Message:
    account = await deps.store.get_account(message.account_id)
    started_at = utc_now()
    if account is None:
        attempt = Attempt(attempt_number, started_at, None, 0.0, "", "the account no longer exists")
        updated = message.with_attempt(attempt, "failed")
    else:
        outcome = await post_signed(
            deps.http, message.url, message.id, message.body.encode(), [account.webhook_secret]
        )
        delay = None if outcome.succeeded else retry_delay(deps.settings.retry_schedule, attempt_number)
        attempt = Attempt(
            number=attempt_number,
            at=started_at,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            response_excerpt=outcome.response_excerpt,
            error=outcome.error,
            next_attempt_at=None if delay is None else iso_in(delay),
        )
        status: MessageStatus = (
            "delivered" if outcome.succeeded else ("pending" if delay is not None else "failed")
        )
        updated = message.with_attempt(attempt, status)
    async with deps.redis.pipeline(transaction=True) as pipe:
        deps.store.messages.stage_save(pipe, updated)
        stats.count(pipe, f"webhook_attempts:{'delivered' if attempt.succeeded else 'failed'}")
        await pipe.execute()
    return updated
