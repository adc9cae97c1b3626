"""Blob storage for originals, results, variants and archives, behind one small async interface.

Two backends: `LocalStorage`, a directory tree written atomically (write, then rename), and
`S3Storage` (jobs/s3storage.py), a bucket of an S3-compatible service. Either way every process keeps
a local scratch folder (`.staging` under its data directory) for files being received, rendered or
read: with S3 that is all that is local, so processes on different machines share only Redis and the
bucket. Keys are relative POSIX paths such as `acc_…/img_…/original`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from jobs.settings import Settings


class StorageKeyError(ValueError):
    """A blob key that would escape the storage root."""


# No room left on the storage's filesystem, or in the quota of the user we run as.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A job that found the storage full runs again after this long, doubling each time up to the most.
FIRST_STORAGE_WAIT_SECONDS = 1.0
LONGEST_STORAGE_WAIT_SECONDS = 60.0
# A download is read and sent this much at a time.
STREAM_CHUNK_BYTES = 1024 * 1024


def is_full(exc: BaseException) -> bool:
    """Whether an error says the storage is full: a passing condition of ours, never the file's fault."""
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


class BlobMissing(FileNotFoundError):
    """No blob under a key where one must be (deleted meanwhile, or expired): the callers' missing-file
    paths (410 output_missing, an archive's output_missing entry) catch it as a FileNotFoundError."""


class StorageUnavailable(Exception):
    """The storage did not answer as it should (an S3 5xx, throttling, connection refused): a passing
    condition of ours. The web answers 503 storage_unavailable; a job runs again later."""


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


@dataclass(frozen=True)
class BlobInfo:
    size: int
    etag: str
    modified: float  # epoch seconds


@dataclass(frozen=True)
class PresignedPost:
    """A form a client POSTs a file to, straight into the storage: `fields`, then the `file` part."""

    url: str
    fields: dict[str, str]


class BlobWriter(Protocol):
    """A blob written as it arrives: visible under its key only after `commit`; `abort` leaves nothing."""

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class BlobStorage(Protocol):
    """What the web and the workers need of a storage. Keys never start with a dot."""

    async def prepare(self) -> None: ...

    async def close(self) -> None: ...

    # The local scratch folder: files being received, rendered or read, private to this process.
    def new_staging_path(self, suffix: str = "") -> Path: ...

    def open_staging(self) -> tuple[Path, BinaryIO]: ...

    def remove_staged_before(self, cutoff: float) -> int: ...

    def is_writable(self) -> bool: ...

    def free_bytes(self) -> int: ...

    # The blobs.
    async def put_file(self, staged: Path, key: str, *, hand_off: bool = False) -> None:
        """Store the staged file under `key` (replacing any earlier blob: re-runs overwrite) and consume
        it (`hand_off`: as `hand_off` does, for an original about to be read). Raises StorageFull
        (OSError ENOSPC) or StorageUnavailable."""

    def local_copy(self, key: str) -> AbstractAsyncContextManager[Path]:
        """A readable local file holding the blob while the context lasts; BlobMissing if there is none."""

    def source(self, key: str) -> AbstractAsyncContextManager[Path | bytes]:
        """The blob to read whole while the context lasts: a local file, or its bytes where the storage
        would otherwise copy it into the scratch folder and it fits one part (DARKROOM_S3_PART_SIZE:
        memory stays bounded by it); BlobMissing if there is none."""

    def open_writer(self, key: str) -> BlobWriter: ...

    async def hand_off(self, staged: Path, key: str, size: int) -> None:
        """`staged` is a copy of the `size` bytes just stored under `key` (an original): consume it,
        keeping it where a worker on this machine reads it rather than fetching the blob, where the blob
        is not local itself."""

    async def take_handoffs(self) -> None:
        """A worker's: say, until closed, that it takes what processes sharing its scratch folder hand
        off (nothing to say where blobs are local)."""

    async def stat(self, key: str) -> BlobInfo | None: ...

    async def read_head(self, key: str, size: int) -> bytes: ...

    async def touch(self, key: str) -> bool:
        """Mark the blob used now (the variants' eviction order, where the storage can); False if absent."""

    async def evict_least_recent(self, prefix: str, keep: int) -> None:
        """Delete the blobs under `prefix` beyond the `keep` most recently used (or written)."""

    async def delete(self, key: str) -> None:
        """Remove one blob; nothing happens if there is none."""

    async def delete_tree(self, prefix: str) -> None: ...

    async def abort_stale_uploads(self, started_before: float) -> int:
        """Abandon unfinished multipart uploads started before `started_before` (epoch seconds), which
        killed processes left behind; how many."""

    async def check(self) -> str:
        """`ok`, or why the storage cannot be used (for /readyz)."""

    async def presigned_get(self, key: str, expires_in: int, filename: str, content_type: str) -> str | None:
        """A URL that downloads the blob without credentials until it expires (None: not supported)."""

    async def presign_post(
        self,
        key: str,
        max_bytes: int,
        expires_in: int,
        success_redirect_url: str | None = None,
        content_type: str | None = None,
    ) -> PresignedPost | None:
        """A form that uploads at most `max_bytes` to `key` until it expires (None: not supported)."""

    async def stream(
        self, key: str, first: int | None = None, last: int | None = None
    ) -> tuple[BlobInfo, AsyncIterator[bytes]]:
        """The blob's bytes `first`..`last` (inclusive; all of it by default) as they arrive, and its info."""


class ScratchFolder:
    """The local staging folder every backend keeps (on the blobs' filesystem for LocalStorage, so that
    its commit is an atomic rename)."""

    def __init__(self, staging: Path) -> None:
        self._staging = staging

    def new_staging_path(self, suffix: str = "") -> Path:
        return self._staging / f"{uuid.uuid4().hex}{suffix}"

    def open_staging(self) -> tuple[Path, BinaryIO]:
        fd, name = tempfile.mkstemp(dir=self._staging)
        return Path(name), os.fdopen(fd, "wb")

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


class LocalStorage(ScratchFolder):
    """A directory tree: the blob under `a/b/c` is the file root/a/b/c."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / ".staging")
        self.root = root

    async def prepare(self) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(part in {"", ".", ".."} or part.startswith(".") for part in parts):
            raise StorageKeyError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def commit(self, staged: Path, key: str) -> Path:
        """Make `staged` visible under `key`, replacing any earlier blob. Blocking: run it in a thread."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        return target

    async def put_file(self, staged: Path, key: str, *, hand_off: bool = False) -> None:
        await asyncio.to_thread(self.commit, staged, key)  # the blob is a local file: nothing to keep

    @contextlib.asynccontextmanager
    async def local_copy(self, key: str) -> AsyncIterator[Path]:
        # The blob itself: it is replaced whole by a rename, never rewritten, so reading it is safe.
        path = self.path(key)
        if not await asyncio.to_thread(path.is_file):
            raise BlobMissing(key)
        yield path

    def source(self, key: str) -> AbstractAsyncContextManager[Path]:
        return self.local_copy(key)

    def open_writer(self, key: str) -> BlobWriter:
        return _LocalWriter(self, key)

    async def hand_off(self, staged: Path, key: str, size: int) -> None:
        await asyncio.to_thread(staged.unlink, missing_ok=True)  # the blob is a local file already

    async def take_handoffs(self) -> None:
        return None

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            found = await asyncio.to_thread(os.stat, self.path(key))
        except FileNotFoundError:
            return None
        return BlobInfo(found.st_size, f"{found.st_mtime_ns:x}-{found.st_size:x}", found.st_mtime)

    async def read_head(self, key: str, size: int) -> bytes:
        def read() -> bytes:
            with self.path(key).open("rb") as blob:
                return blob.read(size)

        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError:
            raise BlobMissing(key) from None

    async def touch(self, key: str) -> bool:
        try:
            await asyncio.to_thread(_stamp_used, self.path(key))
        except FileNotFoundError:
            return False
        return True

    async def evict_least_recent(self, prefix: str, keep: int) -> None:
        await asyncio.to_thread(_evict_least_recently_used, self.path(prefix), keep)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path(key).unlink, missing_ok=True)

    async def delete_tree(self, prefix: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path(prefix), ignore_errors=True)

    async def abort_stale_uploads(self, started_before: float) -> int:
        return 0  # a local upload is a staging file: remove_staged_before takes those

    async def check(self) -> str:
        return "ok" if await asyncio.to_thread(self.is_writable) else "not writable"

    async def presigned_get(self, key: str, expires_in: int, filename: str, content_type: str) -> str | None:
        return None

    async def presign_post(
        self,
        key: str,
        max_bytes: int,
        expires_in: int,
        success_redirect_url: str | None = None,
        content_type: str | None = None,
    ) -> PresignedPost | None:
        return None

    async def stream(
        self, key: str, first: int | None = None, last: int | None = None
    ) -> tuple[BlobInfo, AsyncIterator[bytes]]:
        info = await self.stat(key)
        if info is None:
            raise BlobMissing(key)
        start = first or 0
        end = info.size - 1 if last is None else min(last, info.size - 1)
        return info, _read_range(self.path(key), start, end)


async def _read_range(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    with path.open("rb") as blob:
        blob.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = await asyncio.to_thread(blob.read, min(left, STREAM_CHUNK_BYTES))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


class _LocalWriter:
    """Chunks into a staging file, committed by rename."""

    def __init__(self, storage: LocalStorage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._path, self._sink = storage.open_staging()

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._sink.write, chunk)

    async def commit(self) -> None:
        self._sink.close()
        await self._storage.put_file(self._path, self._key)

    async def abort(self) -> None:
        self._sink.close()
        self._path.unlink(missing_ok=True)


def _stamp_used(path: Path) -> None:
    """Set the file's mtime, its place in the eviction order, from the precise clock: a file's own write
    and a bare `utime` take the kernel's coarse one, whose ticks (several ms) would tie two uses and
    let the order fall to the file names."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _evict_least_recently_used(folder: Path, keep: int) -> None:
    used: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # another request evicted it first
                used.append((entry.stat().st_mtime_ns, Path(entry.path)))
    used.sort(reverse=True)
    for _, path in used[keep:]:
        path.unlink(missing_ok=True)


async def open_storage(settings: Settings) -> BlobStorage:
    """The storage DARKROOM_STORAGE_URL names, ready for use; `close()` it on shutdown."""
    storage: BlobStorage
    if settings.uses_s3:
        # Imported here: aiobotocore is loaded only by processes that use S3.
        from jobs.s3storage import S3Storage

        storage = S3Storage(settings)
    else:
        storage = LocalStorage(settings.storage_root)
    await storage.prepare()
    return storage
