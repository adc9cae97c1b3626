"""A batch's ZIP: every completed result streamed from storage into a staging file, then committed.

The archive is written chunk by chunk (never whole in memory) to a staging file on the storage's
filesystem and made visible by an atomic rename (with S3: results are fetched into the scratch folder one
at a time, and the finished file goes up as a multipart upload; a file, not a stream, because each entry's
CRC is written back into its local header), and only then recorded `ready`: a worker killed while
assembling leaves no archive anyone can see, and arq's re-run builds it again from the start. Entries of
compressed formats are stored as they are (deflating a JPEG costs time and saves nothing), copied by the
kernel; others are deflated. ZIP64 fields are written where sizes, offsets or counts need them. Entry
names come from the uploaded file names, made safe and unique; `_report.json` lists every entry's image
and every image left out, and why.

`archive.format` "original" keeps each result as stored; jpeg, png or webp re-encodes results of other
formats (or with another quality) one at a time through a staging file, with libvips.

Expiry: a ready archive can be downloaded for DARKROOM_ARCHIVE_TTL. After that the API answers 410 at
once, and the sweep (an arq cron job, every few minutes) deletes its file and marks it expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import stat
import struct
import threading
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pyvips

from jobs.batches import Batches
from jobs.deps import WorkerDeps
from jobs.ops.encode import SAVERS, OutputFormat
from jobs.records import ArchiveSpec, ArchiveState, BatchRecord, ImageError, ImageRecord, OutputInfo
from jobs.storage import BlobStorage, LocalStorage, StorageFull, StorageUnavailable, is_full
from jobs.variants import VariantSpec, render_variant
from jobs.vips_errors import reports_storage_full
from webhooks.log_context import bind
from webhooks.messages import iso, now_ms

log = logging.getLogger("darkroom.archive")

REPORT_NAME = "_report.json"
# Formats whose data is compressed already: stored, not deflated.
COMPRESSED_FORMATS = frozenset({"jpeg", "png", "webp", "avif", "gif", "heif"})
COPY_CHUNK_BYTES = 1024 * 1024
# Each copy_file_range call: between two, a stopped build notices.
KERNEL_COPY_CHUNK_BYTES = 16 * 1024 * 1024
# How much of a stored entry is mapped at once to compute its CRC (a multiple of the page size).
CRC_WINDOW_BYTES = 16 * 1024 * 1024
MAX_STEM_CHARS = 120
PARTIAL_SUFFIX = ".archive-partial"
# An archive still pending this long after completion had its build enqueue lost: the sweep enqueues it.
PENDING_GRACE_MS = 60_000
# Extensions a partner's file name may end with that name the picture's format, replaced by the result's.
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "tif", "tiff", "avif", "heic", "heif"}
)
# Characters Windows refuses in file names; control characters are removed apart.
_UNSAFE_CHARS = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}
)

ZipTime = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    image_id: str
    filename: str | None
    source: Path
    format: str  # as written into the archive
    date_time: ZipTime
    convert: VariantSpec | None = None  # re-encode on the way in


@dataclass(frozen=True)
class ArchivePlan:
    entries: list[ArchiveEntry]
    # Images left out: `{image_id, filename, error: {code, message}}`.
    failed: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)
    date_time: ZipTime = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ArchiveSummary:
    size: int
    files: int
    failed: int


class AssemblyStopped(Exception):
    """The build was told to stop (timeout or shutdown); its partial file is gone."""


def safe_entry_name(filename: str | None, fallback: str, suffix: str) -> str:
    """A file name that extracts where it is meant to on any system: no directories, `..`, control
    characters, leading dots or characters Windows refuses, ending in `suffix` (the format written)."""
    base = unicodedata.normalize("NFC", filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"\s+", " ", base)  # tabs and newlines too, before the other control characters go
    base = "".join(ch for ch in base if not unicodedata.category(ch).startswith("C"))
    stem, dot, extension = base.rpartition(".")
    if not dot or extension.lower() not in IMAGE_EXTENSIONS:
        stem = base
    stem = _UNSAFE_CHARS.sub("_", stem)
    stem = re.sub(r"\.{2,}", ".", stem)
    stem = stem[:MAX_STEM_CHARS].strip(" .")
    if not stem or stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = fallback
    return stem + suffix


def unique_names(names: Sequence[str]) -> list[str]:
    """`photo.jpg`, `photo-2.jpg`, …: unique ignoring case, as extracting on macOS or Windows needs."""
    taken = {REPORT_NAME.casefold()}
    unique = []
    for name in names:
        stem, dot, extension = name.rpartition(".")
        candidate, number = name, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = f"{stem}-{number}{dot}{extension}"
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


def _zip_time(moment: str | None) -> ZipTime:
    if moment is None:
        return (1980, 1, 1, 0, 0, 0)
    parsed = datetime.fromisoformat(moment)
    return (parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second)


def _conversion(spec: ArchiveSpec, output: OutputInfo) -> VariantSpec | None:
    """How a result is re-encoded for the archive, or None to copy it as stored."""
    if spec.format == "original":
        return None
    quality = spec.quality if SAVERS[spec.format].default_quality is not None else None
    if spec.format == output.format and quality is None:
        return None
    return VariantSpec(cast(OutputFormat, spec.format), output.width, output.height, quality)


def _failure(image_id: str, filename: str | None, code: str, message: str) -> dict[str, Any]:
    return {"image_id": image_id, "filename": filename, "error": {"code": code, "message": message}}


def plan_archive(
    batch: BatchRecord, images: Sequence[ImageRecord], locate: Callable[[str], Path]
) -> ArchivePlan:
    """What goes into the batch's archive: each completed result (its storage key resolved by `locate`)
    under a safe, unique name, and each image left out."""
    assert batch.archive is not None
    entries: list[ArchiveEntry] = []
    failed: list[dict[str, Any]] = []
    for image in images:
        if image.status == "completed" and image.output is not None:
            convert = _conversion(batch.archive, image.output)
            written = convert.format if convert else image.output.format
            name = safe_entry_name(image.filename, image.id, SAVERS[written].suffix)
            source = locate(image.output.key)
            when = _zip_time(image.completed_at)
            entries.append(ArchiveEntry(name, image.id, image.filename, source, written, when, convert))
        elif image.error is not None:
            failed.append(_failure(image.id, image.filename, image.error.code, image.error.message))
        else:
            failed.append(_failure(image.id, image.filename, "not_completed", f"it is {image.status}"))
    names = unique_names([entry.name for entry in entries])
    entries = [replace(entry, name=name) for entry, name in zip(entries, names, strict=True)]
    report = {"batch_id": batch.id, "format": batch.archive.format, "images": len(images)}
    return ArchivePlan(entries, failed, report, _zip_time(batch.completed_at))


def assemble(
    plan: ArchivePlan,
    destination: Path,
    scratch: Callable[[str], Path],
    stop: threading.Event,
    fetch: Callable[[Path], AbstractContextManager[Path]] = contextlib.nullcontext,
) -> ArchiveSummary:
    """Write the archive to `destination`; blocking, so run it in a thread. Each entry's source is read
    from the file `fetch` gives for it while it is added (the source itself by default). Results that
    cannot be read or re-encoded are left out and reported. On any error, and when `stop` is set
    (AssemblyStopped), the partial file is removed before raising."""
    try:
        return _assemble(plan, destination, scratch, stop, fetch)
    except BaseException:
        with contextlib.suppress(OSError):
            destination.unlink(missing_ok=True)
        raise


def _assemble(
    plan: ArchivePlan,
    destination: Path,
    scratch: Callable[[str], Path],
    stop: threading.Event,
    fetch: Callable[[Path], AbstractContextManager[Path]],
) -> ArchiveSummary:
    failed = list(plan.failed)
    files: list[dict[str, Any]] = []
    with destination.open("wb", buffering=0) as sink, ZipWriter(sink.fileno(), stop) as archive:
        for entry in plan.entries:
            if stop.is_set():
                raise AssemblyStopped
            try:
                with fetch(entry.source) as source:
                    _add_entry(archive, replace(entry, source=source), scratch)
            except FileNotFoundError:
                failed.append(
                    _failure(entry.image_id, entry.filename, "output_missing", "its result is gone")
                )
                continue
            except pyvips.Error as exc:
                if reports_storage_full(exc):
                    raise StorageFull("no space left on the storage for the archive") from None
                log.warning("re-encoding %s for its batch archive failed: %s", entry.image_id, exc)
                message = f"its result could not be re-encoded as {entry.format}"
                failed.append(_failure(entry.image_id, entry.filename, "conversion_failed", message))
                continue
            files.append({"name": entry.name, "image_id": entry.image_id, "filename": entry.filename})
        counts = {"archived": len(files), "left_out": len(failed)}
        report = {**plan.report, **counts, "files": files, "failed": failed}
        archive.add_bytes(
            REPORT_NAME, plan.date_time, json.dumps(report, indent=2, ensure_ascii=False).encode()
        )
        archive.finish()
    return ArchiveSummary(destination.stat().st_size, len(files), len(failed))


def _add_entry(archive: ZipWriter, entry: ArchiveEntry, scratch: Callable[[str], Path]) -> None:
    deflate = entry.format not in COMPRESSED_FORMATS
    if entry.convert is None:
        archive.add_file(entry.name, entry.date_time, entry.source, deflate=deflate)
        return
    entry.source.stat()  # a missing result is reported as such, not as a libvips error
    converted = scratch(SAVERS[entry.format].suffix)
    try:
        render_variant(entry.source, converted, entry.convert)
        archive.add_file(entry.name, entry.date_time, converted, deflate=deflate)
    finally:
        converted.unlink(missing_ok=True)


# --- the ZIP format (PKWARE APPNOTE 6.3), as much of it as an archive of files needs ---------------------

# From here on a size or offset goes into ZIP64 fields (some readers take the 32-bit ones as signed).
ZIP64_LIMIT = (1 << 31) - 1
ZIP64_COUNT_LIMIT = 0xFFFF
_MAX32, _MAX16 = 0xFFFFFFFF, 0xFFFF
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_END64_LOCATOR = struct.Struct("<IIQI")
_STORED, _DEFLATED = 0, 8
_VERSION, _VERSION64 = 20, 45  # what a reader needs: deflate; ZIP64
_MADE_BY = (3 << 8) | _VERSION64  # on Unix, so the attributes below are Unix modes
_UTF8_NAME = 0x800
_FILE_ATTRIBUTES = (stat.S_IFREG | 0o644) << 16
# Incompressible data grows a little when deflated: an entry this close to the limit gets ZIP64 sizes.
_DEFLATE_GROWTH = 1.05
# Read the window's pages in when mapping it, rather than one page fault at a time (Linux).
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass
class _ZipEntry:
    name: bytes
    flags: int
    method: int
    dos_time: int
    dos_date: int
    offset: int
    size: int
    zip64: bool  # its local header carries ZIP64 sizes
    compressed: int = 0
    crc: int = 0


class ZipWriter:
    """A ZIP written to a file descriptor entry by entry, never holding an entry in memory.

    Not `zipfile`, which reads each entry into Python, computes its CRC-32 and writes it out, one after
    the other: about 0.6x the speed of a plain copy (benchmarks/archive.py). Here a stored entry is
    copied by the kernel (copy_file_range, page cache to page cache) while another thread computes its
    CRC on the same pages, mapped (zlib releases the GIL); the CRC is then written into the entry's
    local header. Deflated entries go through zlib chunk by chunk. `finish` writes the central
    directory: an archive left unfinished is not a ZIP."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self._fd = fd
        self._stop = stop
        self._offset = 0
        self._entries: list[_ZipEntry] = []
        self._checksums = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zip-crc")

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._checksums.shutdown()

    def add_file(self, name: str, date_time: ZipTime, source: Path, *, deflate: bool) -> None:
        with source.open("rb", buffering=0) as reader:
            fd = reader.fileno()
            size = os.fstat(fd).st_size
            entry = self._begin(name, date_time, size, deflate)
            if deflate:
                self._deflate(entry, iter(lambda: os.read(fd, COPY_CHUNK_BYTES), b""))
            else:
                checksum = self._checksums.submit(_crc32_of, fd, size, self._stop)
                try:
                    _copy_file(fd, self._fd, size, self._stop)
                finally:
                    crc = checksum.result()  # before the file closes: that thread reads it
                if crc is None:
                    raise AssemblyStopped
                entry.crc, entry.compressed = crc, size
                self._offset += size
            self._end(entry)

    def add_bytes(self, name: str, date_time: ZipTime, data: bytes) -> None:
        """A small entry made in memory (the report), deflated."""
        entry = self._begin(name, date_time, len(data), deflate=True)
        self._deflate(entry, iter((data,)))
        self._end(entry)

    def finish(self) -> None:
        """The central directory and its end records: the archive is complete."""
        start = self._offset
        for entry in self._entries:
            self._write(_central_header(entry))
        size = self._offset - start
        count = len(self._entries)
        if count >= ZIP64_COUNT_LIMIT or start >= ZIP64_LIMIT or size >= ZIP64_LIMIT:
            end64 = self._offset
            self._write(
                _END64.pack(
                    0x06064B50, _END64.size - 12, _MADE_BY, _VERSION64, 0, 0, count, count, size, start
                )
            )
            self._write(_END64_LOCATOR.pack(0x07064B50, 0, end64, 1))
            count, size, start = _MAX16, _MAX32, _MAX32
        self._write(_END.pack(0x06054B50, 0, 0, count, count, size, start, 0))

    def _begin(self, name: str, date_time: ZipTime, size: int, deflate: bool) -> _ZipEntry:
        year, month, day, hour, minute, second = date_time
        entry = _ZipEntry(
            name=name.encode(),
            flags=0 if name.isascii() else _UTF8_NAME,
            method=_DEFLATED if deflate else _STORED,
            dos_time=hour << 11 | minute << 5 | second // 2,
            dos_date=(year - 1980) << 9 | month << 5 | day,
            offset=self._offset,
            size=size,
            zip64=size * (_DEFLATE_GROWTH if deflate else 1) >= ZIP64_LIMIT,
        )
        self._write(_local_header(entry))  # its CRC (and deflated size) are filled in by `_end`
        return entry

    def _deflate(self, entry: _ZipEntry, chunks: Iterator[bytes]) -> None:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        crc = written = 0
        for chunk in chunks:
            if self._stop.is_set():
                raise AssemblyStopped
            crc = zlib.crc32(chunk, crc)
            written += self._write(compressor.compress(chunk))
        written += self._write(compressor.flush())
        if written >= ZIP64_LIMIT and not entry.zip64:
            raise OSError(f"{entry.name!r} deflated to {written} bytes, past what its header can hold")
        entry.crc, entry.compressed = crc, written

    def _end(self, entry: _ZipEntry) -> None:
        os.pwrite(self._fd, _local_header(entry), entry.offset)
        self._entries.append(entry)

    def _write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._offset += len(data)
        return len(data)


def _local_header(entry: _ZipEntry) -> bytes:
    sizes = (_MAX32, _MAX32) if entry.zip64 else (entry.compressed, entry.size)
    extra = struct.pack("<HHQQ", 1, 16, entry.size, entry.compressed) if entry.zip64 else b""
    version = _VERSION64 if entry.zip64 else _VERSION
    fixed = _LOCAL_HEADER.pack(
        0x04034B50, version, entry.flags, entry.method, entry.dos_time, entry.dos_date, entry.crc, *sizes,
        len(entry.name), len(extra),
    )  # fmt: skip
    return fixed + entry.name + extra


def _central_header(entry: _ZipEntry) -> bytes:
    # The ZIP64 extra field holds, in this order, each value too large for its 32-bit field.
    values = [entry.size, entry.compressed, entry.offset]
    large = [value for value in values if value >= ZIP64_LIMIT]
    extra = struct.pack(f"<HH{len(large)}Q", 1, 8 * len(large), *large) if large else b""
    size, compressed, offset = (_MAX32 if value >= ZIP64_LIMIT else value for value in values)
    version = _VERSION64 if large or entry.zip64 else _VERSION
    fixed = _CENTRAL_HEADER.pack(
        0x02014B50, _MADE_BY, version, entry.flags, entry.method, entry.dos_time, entry.dos_date, entry.crc,
        compressed, size, len(entry.name), len(extra), 0, 0, 0, _FILE_ATTRIBUTES, offset,
    )  # fmt: skip
    return fixed + entry.name + extra


def _crc32_of(fd: int, size: int, stop: threading.Event) -> int | None:
    """The CRC-32 of the file's first `size` bytes, computed on its pages in the page cache, mapped a
    window at a time (no copy into our memory, and at most a window of them counted in our RSS); None
    when stopped. Mapping is safe because stored blobs are never truncated: storage replaces them whole
    (a rename), and a replaced or deleted file's pages stay readable while mapped."""
    crc = 0
    for start in range(0, size, CRC_WINDOW_BYTES):
        if stop.is_set():
            return None
        length = min(CRC_WINDOW_BYTES, size - start)
        with mmap.mmap(fd, length, offset=start, prot=mmap.PROT_READ, flags=_MAP_FLAGS) as window:
            crc = zlib.crc32(window, crc)
    return crc


def _copy_file(source: int, sink: int, size: int, stop: threading.Event) -> None:
    """The first `size` bytes of `source` to `sink`'s position, by the kernel where it can."""
    copied = 0
    while copied < size:
        if stop.is_set():
            raise AssemblyStopped
        wanted = min(KERNEL_COPY_CHUNK_BYTES, size - copied)
        try:
            count = os.copy_file_range(source, sink, wanted, copied)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY or copied:
                raise
            _copy_through_memory(source, sink, size, stop)
            return
        if count == 0:
            raise OSError(f"the file ended after {copied} of {size} bytes")
        copied += count


# copy_file_range cannot copy between these files (another filesystem, an old kernel): copy by hand.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _copy_through_memory(source: int, sink: int, size: int, stop: threading.Event) -> None:
    buffer = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buffer)
    copied = 0
    while copied < size:
        if stop.is_set():
            raise AssemblyStopped
        count = os.preadv(source, [view[: min(len(buffer), size - copied)]], copied)
        if count == 0:
            raise OSError(f"the file ended after {copied} of {size} bytes")
        chunk = view[:count]
        while chunk:
            chunk = chunk[os.write(sink, chunk) :]
        copied += count


def archive_key(batch: BatchRecord) -> str:
    return f"{batch.account_id}/batches/{batch.id}/archive.zip"


def archive_etag(batch_id: str, key: str, size: int, built_at: str) -> str:
    """Names one build of the archive across processes (a rebuild is another one)."""
    return hashlib.sha256(f"{batch_id}\n{key}\n{size}\n{built_at}".encode()).hexdigest()[:32]


async def build_archive(deps: WorkerDeps, batch_id: str, job_try: int) -> None:
    """The core of the `build_archive` arq task: safe to run again at any point."""
    batches = Batches(deps.store, deps.redis, deps.settings)
    batch = await batches.get(batch_id)
    state = None if batch is None else batch.archive_state
    if batch is None or state is None:
        return
    with bind(batch_id=batch_id, account_id=batch.account_id, request_id=batch.request_id):
        await _build_archive(deps, batches, batch_id, state, job_try)


async def _build_archive(
    deps: WorkerDeps, batches: Batches, batch_id: str, state: ArchiveState, job_try: int
) -> None:
    """build_archive, once its batch's ids are bound for its log lines."""
    if state.status not in ("pending", "building"):
        if state.message_id is not None:
            deps.dispatcher.nudge()  # already announced in the transaction that recorded it: only hurry it
        return
    if await deps.crashed_too_often(batch_id, job_try):
        message = f"assembling the archive stopped the worker {job_try - 1} times"
        await _finish(
            deps, batches, batch_id, ArchiveState("failed", error=ImageError("worker_crashed", message))
        )
        return
    started = await batches.start_archive(batch_id)
    if started is None:
        return
    storage = deps.storage
    # Local results are read where they are; S3 ones are fetched one at a time into the scratch folder.
    locate = storage.path if isinstance(storage, LocalStorage) else Path
    plan = plan_archive(started, await batches.images(batch_id), locate)
    staged = storage.new_staging_path(PARTIAL_SUFFIX)
    key = archive_key(started)
    try:
        summary = await _assemble_with_deadline(deps, plan, staged)
        await storage.put_file(staged, key)
    except StorageUnavailable:
        await asyncio.to_thread(staged.unlink, missing_ok=True)
        await _wait_for_storage(deps, batches, batch_id, unavailable=True)
        return
    except AssemblyStopped:
        error = ImageError("timeout", f"assembling took longer than {deps.settings.archive_timeout:g} s")
        await _finish(deps, batches, batch_id, ArchiveState("failed", error=error))
        return
    except OSError as exc:
        with contextlib.suppress(OSError):  # tidying must not hide why the build ended
            staged.unlink()
        if is_full(exc):
            await _wait_for_storage(deps, batches, batch_id)
            return
        log.exception("the archive of %s could not be written", batch_id)
        error = ImageError("archive_failed", f"the archive could not be written: {exc.strerror or exc}")
        await _finish(deps, batches, batch_id, ArchiveState("failed", error=error))
        return
    built_ms = now_ms()
    built_at = iso(built_ms)
    ready = ArchiveState(
        "ready",
        key=key,
        size=summary.size,
        etag=archive_etag(batch_id, key, summary.size, built_at),
        built_at=built_at,
        expires_at=iso(built_ms + round(deps.settings.archive_ttl * 1000)),
    )
    await _finish(deps, batches, batch_id, ready)


async def _wait_for_storage(
    deps: WorkerDeps, batches: Batches, batch_id: str, *, unavailable: bool = False
) -> None:
    """No room for the archive, or (`unavailable`) the storage did not answer: the build runs again later
    (WaitForStorage), its images untouched, until the storage is back; only after
    `storage_full_give_up` of waiting does the archive fail."""
    wait = await deps.wait_for_storage(batch_id)
    if wait is None:
        hours = deps.settings.storage_full_give_up / 3600
        code, state = ("storage_unavailable", "unreachable") if unavailable else ("storage_full", "full")
        error = ImageError(code, f"the storage stayed {state} for {hours:g} h")
        await _finish(deps, batches, batch_id, ArchiveState("failed", error=error))
        return
    log.warning(
        "storage %s for the archive of %s; trying again later (wait %d)",
        "unreachable" if unavailable else "full",
        batch_id,
        wait.waits,
    )
    raise wait


async def _assemble_with_deadline(deps: WorkerDeps, plan: ArchivePlan, staged: Path) -> ArchiveSummary:
    stop = threading.Event()
    storage = deps.storage
    fetch = contextlib.nullcontext if isinstance(storage, LocalStorage) else _fetcher(storage)
    work = asyncio.ensure_future(
        asyncio.to_thread(assemble, plan, staged, storage.new_staging_path, stop, fetch)
    )
    try:
        done, _ = await asyncio.wait({work}, timeout=deps.settings.archive_timeout)
    except asyncio.CancelledError:
        stop.set()  # the thread stops within a chunk and removes its partial file
        raise
    if not done:
        stop.set()
        raise AssemblyStopped
    return work.result()


def _fetcher(storage: BlobStorage) -> Callable[[Path], AbstractContextManager[Path]]:
    """For the assembling thread: a local copy of the blob whose key is the entry's source, made on
    this event loop and removed once the entry is added."""
    loop = asyncio.get_running_loop()

    @contextlib.contextmanager
    def fetch(key: Path) -> Iterator[Path]:
        copy = storage.local_copy(key.as_posix())
        path = asyncio.run_coroutine_threadsafe(copy.__aenter__(), loop).result()
        try:
            yield path
        finally:
            asyncio.run_coroutine_threadsafe(copy.__aexit__(None, None, None), loop).result()

    return fetch


async def _finish(deps: WorkerDeps, batches: Batches, batch_id: str, outcome: ArchiveState) -> None:
    recorded = await batches.finish_archive(batch_id, outcome)
    if recorded is not None and recorded.archive_state is not None and recorded.archive_state.message_id:
        deps.dispatcher.nudge()


async def sweep_archives(deps: WorkerDeps) -> None:
    """The periodic `sweep_archives` task: delete expired archives and enqueue builds whose enqueue was
    lost. (Partial files that killed workers left behind go with every other staging leftover, in
    jobs/retention.py.)"""
    batches = Batches(deps.store, deps.redis, deps.settings)
    moment = now_ms()
    for batch_id in await batches.due_expiries(moment):
        batch = await batches.get(batch_id)
        if batch is not None:
            # The file first: if we stop between, the record still lists it and the next sweep retries.
            await deps.storage.delete_tree(f"{batch.account_id}/batches/{batch.id}")
        await batches.expire_archive(batch_id)
    for batch_id in await batches.overdue_archives(moment - PENDING_GRACE_MS):
        await batches.enqueue_archive(batch_id)
