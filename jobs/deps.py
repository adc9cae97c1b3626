"""What the worker's task cores need, built once in the worker's on_startup."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis

from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.store import Store
from webhooks.dispatcher import Dispatcher
from webhooks.transport import DeliveryClient


@dataclass(frozen=True)
class WorkerDeps:
    settings: Settings
    redis: ArqRedis
    store: Store
    storage: LocalStorage
    http: DeliveryClient
    dispatcher: Dispatcher
