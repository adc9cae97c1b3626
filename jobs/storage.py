"""Blob storage for originals and results: a directory tree, written atomically (write, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO


class StorageKeyError(ValueError):
    """A blob key that would escape the storage root."""


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
