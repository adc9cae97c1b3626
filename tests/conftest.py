"""Real parts for tests: a redis-server on a free loopback port, arq workers, libvips, HTTP receivers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.worker import Worker
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from jobs.deps import WorkerDeps
from jobs.pipeline import configure_libvips
from jobs.plans import DEFAULT_TIER, TIERS, Plan
from jobs.queue import QueuePool
from jobs.settings import Settings
from jobs.store import Store
from jobs.worker import build_deps, close_deps, worker_settings
from server.app import create_app
from server.embedded_redis import EmbeddedRedis
from tests.pixels import Renderer
from tests.receiver import Receiver
from tests.s3server import CREDENTIALS, REGION, S3Server

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session", autouse=True)
def libvips() -> None:
    """As in the web and worker processes, for tests that call the pipeline directly."""
    configure_libvips()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(None, appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def settings(redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path) -> Settings:
    data_dir = tmp_path / "data"
    return Settings(
        redis_url=redis_server.url,
        data_dir=data_dir,
        storage_url=data_dir.as_uri(),
        public_url="http://testserver",
        allow_private_callbacks=True,
        retry_schedule=(0.05, 0.1, 0.2),
        retry_jitter=0.0,
        webhook_slow_down_seconds=0.3,
        max_upload_bytes=2_000_000,
        max_pixels=50_000_000,
        job_timeout=30,
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session (each test gets its own bucket); its credentials in the
    environment, where the AWS credential chain of our processes and their children finds them."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        server = S3Server().start()
        yield server
        server.stop()


def on_s3(settings: Settings, server: S3Server) -> Settings:
    """`settings` storing blobs in a new bucket of `server`, under a prefix."""
    return replace(
        settings,
        storage_url=f"s3://{server.new_bucket()}/darkroom",
        s3_endpoint_url=server.url,
        s3_region=REGION,
    )


@pytest.fixture(params=["local", "s3"])
def any_storage_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The same test on both storages: the local folder and an S3 bucket."""
    if request.param == "local":
        return settings
    return on_s3(settings, request.getfixturevalue("s3_server"))


@dataclass(frozen=True)
class Partner:
    id: str
    api_key: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


async def make_account(redis: Redis, name: str, plan: Plan = TIERS[DEFAULT_TIER]) -> Partner:
    created = await Store(redis).create_account(name, plan)
    return Partner(created.account.id, created.api_key, created.account.webhook_secret)


@pytest.fixture
async def account(redis: Redis) -> Partner:
    return await make_account(redis, "partner")


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The web app in-process, its lifespan run (Redis pool, storage), behind an httpx client."""
    async with api_clients(settings, ["127.0.0.1"]) as (http,):
        yield http


@contextlib.asynccontextmanager
async def api_clients(settings: Settings, addresses: Sequence[str]) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One in-process web app behind an httpx client for each of the client `addresses`."""
    app = create_app(settings)
    async with LifespanManager(app) as manager, contextlib.AsyncExitStack() as clients:
        yield [
            await clients.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=manager.app, client=(address, 123)),
                    base_url="http://testserver",
                )
            )
            for address in addresses
        ]


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as http:
        yield http


@pytest.fixture
def receiver(account: Partner) -> Iterator[Receiver]:
    server = Receiver(account.webhook_secret).start()
    yield server
    server.stop()


def make_worker(settings: Settings, **overrides: Any) -> Worker:
    return Worker(**{**worker_settings(settings), "handle_signals": False, **overrides})


async def run_burst(settings: Settings) -> Worker:
    """Run a worker until every image is processed and every webhook delivered or given up, retries
    included.

    It polls a plain pool: the wake-up wait would hold a burst worker on an empty queue."""
    pool = QueuePool.connect(settings.redis_url, settings.queue_name, fair=settings.fair_scheduling)
    worker = make_worker(settings, burst=True, redis_pool=pool)
    try:
        await worker.async_run()
    finally:
        await worker.close()
    async with worker_deps(settings) as deps:
        await deps.dispatcher.run_until_idle()
    return worker


@contextlib.asynccontextmanager
async def worker_deps(settings: Settings) -> AsyncIterator[WorkerDeps]:
    """What a worker process builds at start-up, for tests that drive the task cores directly."""
    redis = QueuePool.connect(settings.redis_url, settings.queue_name)
    deps = await build_deps(settings, redis)
    try:
        yield deps
    finally:
        await close_deps(deps)
        await redis.aclose()


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker running in the background for the whole test, as in production."""
    running = make_worker(settings)
    task = asyncio.create_task(running.async_run())
    yield running
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await running.close()


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


@pytest.fixture
def renderer(tmp_path: Path) -> Renderer:
    return Renderer(tmp_path)


# TLS: a self-signed certificate made with the openssl command (no Python package needed).


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    yield cert, key
