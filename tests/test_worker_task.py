"""The arq task wrapper: what arq sees when the core cannot finish."""

from __future__ import annotations

import pytest
from arq.worker import Retry

from jobs import worker
from jobs.settings import Settings
from tests.conftest import with_settings, worker_deps


async def test_redis_outage_mid_job_is_retried_not_failed(settings: Settings, unused_tcp_port: int) -> None:
    """arq fails a job that raises for good, which would leave its image `processing` forever."""
    unreachable = with_settings(settings, redis_url=f"redis://127.0.0.1:{unused_tcp_port}/0")
    async with worker_deps(unreachable) as deps:
        with pytest.raises(Retry):
            await worker.process_image({"deps": deps, "job_try": 1}, "img_01m8000000000000000000000")
