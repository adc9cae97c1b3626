"""What the worker's task cores need, built once in the worker's on_startup."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis

from jobs.settings import Settings
from jobs.storage import LocalStorage, WaitForStorage
from jobs.store import Store
from webhooks.dispatcher import Dispatcher
from webhooks.messages import now_ms
from webhooks.transport import DeliveryClient


@dataclass(frozen=True)
class WorkerDeps:
    settings: Settings
    redis: ArqRedis
    store: Store
    storage: LocalStorage
    http: DeliveryClient
    dispatcher: Dispatcher

    async def crashed_too_often(self, subject_id: str, job_try: int) -> bool:
        """Whether the job of `subject_id` (an image or a batch's archive) started more than
        `max_attempts` times without ending: runs that ended waiting for storage do not count."""
        if job_try <= self.settings.max_attempts:
            return False
        return job_try - await self.store.storage_waits(subject_id) > self.settings.max_attempts

    async def wait_for_storage(self, subject_id: str) -> WaitForStorage | None:
        """The job of `subject_id` found the storage full: the wait to raise so that it runs again
        later, or None once it has waited `storage_full_give_up` (then it fails as `storage_full`)."""
        give_up = self.settings.storage_full_give_up
        waits, since_ms = await self.store.note_storage_wait(subject_id, keep_seconds=2 * give_up)
        if now_ms() - since_ms >= give_up * 1000:
            return None
        return WaitForStorage(waits)
