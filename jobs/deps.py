"""What the worker's task cores need, built once in the worker's on_startup."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from jobs.fetch import SourceFetcher
from jobs.queue import QueuePool
from jobs.settings import Settings
from jobs.storage import BlobStorage, WaitForStorage
from jobs.store import Store
from webhooks.dispatcher import Dispatcher
from webhooks.messages import now_ms
from webhooks.transport import DeliveryClient

# Runs of one job that worker shutdowns may stop before a further stop counts as a crash (arq allows
# that many more tries), and how long they are remembered.
CLEAN_STOPS_FORGIVEN = 10
CLEAN_STOP_MEMORY_SECONDS = 2 * 24 * 3600


@dataclass(frozen=True)
class WorkerDeps:
    settings: Settings
    redis: QueuePool
    store: Store
    storage: BlobStorage
    http: DeliveryClient
    dispatcher: Dispatcher
    sources: SourceFetcher
    # Renders at once, DARKROOM_WORKER_CONCURRENCY of them (arq may run more jobs: see jobs_at_once).
    render_slots: asyncio.Semaphore

    async def crashed_too_often(self, subject_id: str, job_try: int) -> bool:
        """Whether the job of `subject_id` (an image or a batch's archive) started more than
        `max_attempts` times without ending: runs that ended waiting for storage, or that a worker
        shutting down stopped (a deploy; at most CLEAN_STOPS_FORGIVEN), do not count."""
        if job_try <= self.settings.max_attempts:
            return False
        ended = await self.store.runs_ended_without_crash(subject_id, CLEAN_STOPS_FORGIVEN)
        return job_try - ended > self.settings.max_attempts

    async def note_clean_stop(self, subject_id: str) -> None:
        await self.store.note_clean_stop(subject_id, keep_seconds=CLEAN_STOP_MEMORY_SECONDS)

    async def wait_for_storage(self, subject_id: str) -> WaitForStorage | None:
        """The job of `subject_id` found the storage full: the wait to raise so that it runs again
        later, or None once it has waited `storage_full_give_up` (then it fails as `storage_full`)."""
        give_up = self.settings.storage_full_give_up
        waits, since_ms = await self.store.note_storage_wait(subject_id, keep_seconds=2 * give_up)
        if now_ms() - since_ms >= give_up * 1000:
            return None
        return WaitForStorage(waits)
