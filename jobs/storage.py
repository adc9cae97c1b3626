"""Blob storage for originals and results: a directory tree, written atomically (write, then rename)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO


class StorageKeyError(ValueError):
    """A blob key that would escape the storage root."""


# No room left on the storage's filesystem, or in the quota of the user we run as.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A job that found the storage full runs again after this long, doubling each time up to the most.
FIRST_STORAGE_WAIT_SECONDS = 1.0
LONGEST_STORAGE_WAIT_SECONDS = 60.0


def is_full(exc: BaseException) -> bool:
    """Whether an error says the storage is full: a passing condition of ours, never the file's fault."""
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


class StorageFull(OSError):
    """Writing to the storage failed for want of room (libvips reports it as text: this carries it)."""

    def __init__(self, detail: str = "no space left on the storage") -> None:
        super().__init__(errno.ENOSPC, detail)


class WaitForStorage(Exception):
    """A job stopped because the storage is full: run it again after `delay` seconds (its `waits`-th
    wait), when space may have returned."""

    def __init__(self, waits: int) -> None:
        super().__init__(f"the storage is full (wait {waits})")
        self.waits = waits
        self.delay = min(FIRST_STORAGE_WAIT_SECONDS * 2 ** (waits - 1), LONGEST_STORAGE_WAIT_SECONDS)


def most_storage_waits(give_up_after: float) -> int:
    """How many waits fit in `give_up_after` seconds at the shortest, so a job retry limit can allow
    them all (the job itself gives up by time)."""
    doublings = 1 + int(LONGEST_STORAGE_WAIT_SECONDS / FIRST_STORAGE_WAIT_SECONDS).bit_length()
    return doublings + int(give_up_after / LONGEST_STORAGE_WAIT_SECONDS) + 1


class LocalStorage:
    """Keys are relative POSIX paths such as `acc_…/img_…/original`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / ".staging"

    def prepare(self) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(part in {"", ".", ".."} or part.startswith(".") for part in parts):
            raise StorageKeyError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def new_staging_path(self, suffix: str = "") -> Path:
        """A private path on the same filesystem as the blobs, so `commit` is an atomic rename."""
        return self._staging / f"{uuid.uuid4().hex}{suffix}"

    def open_staging(self) -> tuple[Path, BinaryIO]:
        fd, name = tempfile.mkstemp(dir=self._staging)
        return Path(name), os.fdopen(fd, "wb")

    def commit(self, staged: Path, key: str) -> Path:
        """Make `staged` visible under `key`, replacing any earlier blob (re-runs overwrite)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        return target

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def remove_staged_before(self, cutoff: float) -> int:
        """Remove staging files last written before `cutoff` (epoch seconds): what killed processes left
        behind. How many."""
        removed = 0
        for entry in os.scandir(self._staging):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # its writer committed or removed it meanwhile
                continue
        return removed

    def is_writable(self) -> bool:
        return self._staging.is_dir() and os.access(self._staging, os.W_OK)

    def free_bytes(self) -> int:
        """Room left for our writes (what an unprivileged user may use). Blocking: run it in a thread."""
        return shutil.disk_usage(self._staging).free
