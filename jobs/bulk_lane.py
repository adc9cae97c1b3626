"""A worker process's bulk lane: a child `arq jobs.worker.BulkWorkerSettings` at a lower CPU priority,
started, kept running and stopped by the worker process itself, the express lane (see jobs/queue.py).

The child is the worker's own: it must not outlive it, however the worker ends (a `kill -9` too).
It holds the read end of a pipe whose write end only the worker has; end of file means the worker is
gone, and the child stops as a SIGTERM would stop it (its jobs run again elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("darkroom.worker")

BULK_WORKER_SETTINGS = "jobs.worker.BulkWorkerSettings"
# A bulk lane that exits (a crash on a hostile file kills the process rendering it) is started again
# after this long, as a process manager would start the worker.
RESTART_DELAY_SECONDS = 1.0
# arq cancels its jobs at SIGTERM (they run again); past this the lane is killed.
STOP_GRACE_SECONDS = 10.0
STDIN_FILENO = 0


class BulkLane:
    """The child process, started again whenever it exits until `stop`."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self._process: asyncio.subprocess.Process | None = None
        self._keeper: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._keeper = asyncio.create_task(self._keep_running(), name="darkroom-bulk-lane")

    async def _keep_running(self) -> None:
        while True:
            self._process = await asyncio.create_subprocess_exec(*self.command, stdin=asyncio.subprocess.PIPE)
            code = await self._process.wait()
            log.error("the bulk lane (pid %s) exited with %s; starting it again", self._process.pid, code)
            await asyncio.sleep(RESTART_DELAY_SECONDS)

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()


def bulk_lane_command(log_args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "arq", BULK_WORKER_SETTINGS, *log_args]


def lower_priority(increment: int) -> None:
    """Lower this process's CPU priority by `increment` (nice). Linux keeps a nice value per thread, and
    a thread starts with its creator's: every thread there now is lowered, and those started later
    (libvips's, the event loop's executor) follow."""
    if sys.platform != "linux":
        os.nice(increment)
        return
    for task in os.listdir("/proc/self/task"):
        thread = int(task)
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + increment)


def end_with_the_worker() -> None:
    """Stop (as at SIGTERM) once the worker that started this lane is gone: its pipe on our stdin ends."""

    def watch() -> None:
        # The file descriptor, not sys.stdin: a thread blocked inside sys.stdin's buffer holds its lock,
        # which the interpreter takes at exit (a fatal error).
        while os.read(STDIN_FILENO, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="darkroom-worker-watch", daemon=True).start()
