"""Blob storage in a bucket of an S3-compatible service (AWS S3, MinIO, R2), with aiobotocore.

aiobotocore rather than obstore: it is async on asyncio, takes credentials from botocore's whole chain
(environment, shared profiles, SSO, container and instance metadata), and its endpoint resolution is
the authority on how the bucket's URLs are made; presigned POST forms with a `content-length-range`
condition, which direct uploads need to cap a file's size, follow botocore's byte for byte (obstore's
signer makes query-string URLs, GET and PUT, only, with no policy conditions).

Large files go up as multipart uploads, a part at a time, so memory stays bounded by the part size
(DARKROOM_S3_PART_SIZE). The requests that carry bytes (GetObject, PutObject, UploadPart: up to three per
image) go out as presigned URLs over one pooled aiohttp session: botocore's own request pipeline
cost about 1 ms more CPU per request (benchmarks/s3_requests.py: a put_file and local_copy of a
corpus photo to moto, 6.1 ms against 8.0 ms with put_object and get_object), and its presigner
300 us a URL, so jobs/s3signing.py signs them (20 us), as it signs the presigned GETs of downloads and
the forms of direct uploads. The other calls
(multipart create and complete, listing, deleting, heads) go through the client. Anything the service
answers other than "no such key" that stops an operation (a 5xx, throttling, a refused connection,
after three attempts) is StorageUnavailable.

A worker on the web's machine (one `DARKROOM_DATA_DIR`, as the Procfile runs them) skips the fetch of an
original the web just stored: the web keeps its scratch copy (`hand_off`) and the worker takes it
(`source`), a request and a download fewer per image. Only while a worker says it is there
(`take_handoffs`): a web on a machine of its own keeps nothing, which no one would take.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentials
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from jobs.s3signing import FrozenCredentials, Presigner
from jobs.settings import Settings
from jobs.storage import (
    STREAM_CHUNK_BYTES,
    BlobInfo,
    BlobMissing,
    BlobWriter,
    PresignedPost,
    ScratchFolder,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef, ObjectIdentifierTypeDef

log = logging.getLogger("darkroom.s3")

T = TypeVar("T")

# Connections kept open to the service: enough for every job slot, archive and download of a process.
MAX_POOL_CONNECTIONS = 100
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 60.0
# botocore's own attempts at a request that failed transiently, before we call the storage unavailable.
MAX_ATTEMPTS = 3
# DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
# A presigned data-path URL is used at once; its life only has to cover botocore-like retries.
DATA_URL_SECONDS = 900
# A key of plain characters, whose presigned URL shows how the bucket's object URLs are made.
_PROBE_KEY = "darkroom-probe"
# The originals a web process keeps for a worker of its machine: the newest, up to this many bytes. A
# worker takes one within moments of its upload; the rest were taken by workers elsewhere, or never will
# be, and are removed as newer ones arrive (or by the scratch folder's sweep after a restart).
HANDOFF_BUDGET_BYTES = 256 * 1024 * 1024
# A kept original no worker took within this long was rendered elsewhere (or is fetched when its job
# comes): removed by the scratch folder's sweep, so that it is not kept on this disk for the folder's hours
# after its image may have been deleted through another web process.
HANDOFF_MAX_AGE_SECONDS = 600.0
# A worker sharing the data directory says so this often (the mark's time), and a web keeps originals
# for it while the mark is younger than HANDOFF_TAKER_SILENT_SECONDS.
HANDOFF_TAKER_ANNOUNCE_SECONDS = 30.0
HANDOFF_TAKER_SILENT_SECONDS = 90.0
_HANDOFF_PREFIX = "handoff-"
_HANDOFF_TAKERS_MARK = "workers-here"
# How S3 explains a refusal in its XML error body.
_ERROR_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")


class S3Storage(ScratchFolder):
    """Keys live under the URL's prefix in its bucket; the client is made by `prepare` and closed by
    `close` (the web's lifespan, the worker's start-up and shutdown)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.data_dir / ".staging")
        self.bucket, self.prefix = settings.s3_location
        self.part_size = settings.s3_part_size
        self._settings = settings
        self._exit_stack = AsyncExitStack()
        self._client: S3Client | None = None
        self._http: aiohttp.ClientSession | None = None
        self._credentials: AioCredentials | None = None
        self._signer: Presigner | None = None
        self.handoff_budget_bytes = HANDOFF_BUDGET_BYTES
        # The originals this process kept for a local worker, oldest first: key -> (file, size).
        self._handed_off: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self._handed_off_bytes = 0
        self._announcing: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        settings = self._settings
        config = AioConfig(
            max_pool_connections=MAX_POOL_CONNECTIONS,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            signature_version="s3v4",
            # Our requests are built here, typed against the S3 API: checking each again cost 1.5 ms of
            # CPU per request (9.2 -> 7.7 ms for a 1 MB PutObject to moto).
            parameter_validation=False,
            # Checksums only where S3 requires them: TLS and S3's own MD5/ETag already guard the bytes,
            # and a CRC32 of every part and download costs CPU the renders need.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # MinIO and moto serve buckets by path; AWS picks virtual hosts itself.
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
        )
        session = AioSession()
        client = session.create_client(
            "s3", region_name=settings.s3_region, endpoint_url=settings.s3_endpoint_url, config=config
        )
        self._client = await self._exit_stack.enter_async_context(client)
        # The session's credentials are the client's (one chain, resolved once, refreshed in place).
        self._credentials = await session.get_credentials()
        if self._credentials is not None:  # else every request fails, as the client's would
            probe = await self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": _PROBE_KEY}, ExpiresIn=DATA_URL_SECONDS
            )
            self._signer = Presigner.like(probe, _PROBE_KEY)
        self._http = await self._exit_stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_POOL_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(
                    sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=READ_TIMEOUT_SECONDS
                ),
                # The bytes as stored: an object saved with a Content-Encoding is not ours to decode.
                auto_decompress=False,
            )
        )

    async def close(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None
        self._client = None
        self._http = None
        await self._exit_stack.aclose()

    async def take_handoffs(self) -> None:
        """Say, until closed, that a worker here takes the originals web processes sharing this scratch
        folder hand off."""
        await asyncio.to_thread(self._announce_taker)
        self._announcing = asyncio.create_task(self._keep_announcing())

    async def _keep_announcing(self) -> None:
        while True:
            await asyncio.sleep(HANDOFF_TAKER_ANNOUNCE_SECONDS)
            await asyncio.to_thread(self._announce_taker)

    def _announce_taker(self) -> None:
        # Unsaid, it costs the webs' saving only (the worker fetches originals): said again next time.
        with contextlib.suppress(OSError):
            (self._staging / _HANDOFF_TAKERS_MARK).touch()

    def _handoff_taker_here(self) -> bool:
        """Whether a worker sharing this scratch folder said so lately. Asked on the loop: a stat of a
        file in this folder costs less than the hop to a thread."""
        try:
            announced = (self._staging / _HANDOFF_TAKERS_MARK).stat().st_mtime
        except OSError:
            return False
        return time.time() - announced < HANDOFF_TAKER_SILENT_SECONDS

    def remove_staged_before(self, cutoff: float) -> int:
        """As the scratch folder's rule has it; and the originals kept for a worker here that none took
        within HANDOFF_MAX_AGE_SECONDS."""
        removed = super().remove_staged_before(cutoff)
        untaken_before = time.time() - HANDOFF_MAX_AGE_SECONDS
        for kept in self._staging.glob(f"{_HANDOFF_PREFIX}*"):
            try:
                if kept.stat().st_mtime < untaken_before:
                    kept.unlink()
                    removed += 1
            except FileNotFoundError:  # taken meanwhile
                continue
        return removed

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "S3Storage.prepare() was not awaited"
        return self._client

    def object_key(self, key: str) -> str:
        return self.prefix + key

    async def send(
        self,
        method: str,
        object_key: str,
        query: dict[str, str | int] | None = None,
        body: Sequence[bytes] = (),
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """A data-path request on a presigned URL, answered 2xx (the caller releases the response);
        retried as botocore's standard mode would (connection errors, 5xx) and failing as `_call` does.
        Each URL is signed with the credentials the session holds now, so refreshed ones are used.
        The body goes out as the chunks it came in, never joined: a copy of a part costs more than its
        bytes suggest (a fresh megabyte of memory is page-faulted in; 1-4 ms of CPU a part here)."""
        assert self._http is not None, "S3Storage.prepare() was not awaited"
        if body:
            headers = {**(headers or {}), "Content-Length": str(sum(map(len, body)))}
        for attempt in range(1, MAX_ATTEMPTS + 1):
            signer, credentials = await self._signing()
            url = signer.presign(method, object_key, query or {}, credentials, DATA_URL_SECONDS)
            try:
                sent = _payload(body)
                response = await self._http.request(method, url, data=sent, headers=headers)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == MAX_ATTEMPTS:
                    raise StorageUnavailable(f"the storage cannot be reached: {exc}") from exc
            else:
                if response.status < 300:
                    return response
                refusal = await _refusal(response)
                if response.status < 500 or attempt == MAX_ATTEMPTS:
                    raise refusal
            await asyncio.sleep(random.random() * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _signing(self) -> tuple[Presigner, FrozenCredentials]:
        """The signer, with the credentials the session holds now (refreshed ones, once refreshed)."""
        if self._signer is None or self._credentials is None:
            raise StorageUnavailable("no AWS credentials found (environment, profile or instance role)")
        return self._signer, await self._credentials.get_frozen_credentials()

    async def put_file(self, staged: Path, key: str, *, hand_off: bool = False) -> None:
        """One PutObject for a file that fits a part (read and removed in one thread hop: a result or
        an original is read by the worker once per image), a multipart upload a part at a time else;
        with `hand_off`, the file is then handed off rather than removed."""
        if hand_off:
            # A second name for the bytes, kept once they are stored (the first is consumed).
            kept = self.new_staging_path()
            size = await asyncio.to_thread(_link, staged, kept)
            try:
                await self.put_file(staged, key)
            except BaseException:
                await asyncio.shield(asyncio.to_thread(kept.unlink, missing_ok=True))
                raise
            await self.hand_off(kept, key, size)
            return
        first, rest = await asyncio.to_thread(_first_part, staged, self.part_size)
        writer = self.open_writer(key)
        try:
            await writer.write(first)
            if rest is not None:
                with rest:
                    while part := await asyncio.to_thread(rest.read, self.part_size):
                        await writer.write(part)
            await writer.commit()
        except BaseException:
            await asyncio.shield(writer.abort())
            raise
        finally:
            if rest is not None:
                await asyncio.to_thread(staged.unlink, missing_ok=True)

    @contextlib.asynccontextmanager
    async def local_copy(self, key: str) -> AsyncIterator[Path]:
        _, chunks = await self.stream(key)
        async with self._scratch_copy(chunks) as copy:
            yield copy

    @contextlib.asynccontextmanager
    async def source(self, key: str) -> AsyncIterator[Path | bytes]:
        handed_off = self._take_handed_off(key)
        if handed_off is not None:
            try:
                yield handed_off
            finally:
                handed_off.unlink(missing_ok=True)
            return
        info, chunks = await self.stream(key)
        if info.size > self.part_size:
            async with self._scratch_copy(chunks) as copy:
                yield copy
            return
        # Held whole: no scratch file to write, read back and remove (about 0.2 ms of CPU for a
        # 650 KB photo, and three thread hops).
        yield b"".join([chunk async for chunk in chunks])

    @contextlib.asynccontextmanager
    async def _scratch_copy(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[Path]:
        copy = self.new_staging_path()
        try:
            with copy.open("wb") as sink:
                # Written a megabyte at a time: a thread hop costs more CPU than writing the 64 KB
                # pieces the response arrives in (about 60 against 20 us here).
                batch: list[bytes] = []
                batch_bytes = 0
                async for chunk in chunks:
                    batch.append(chunk)
                    batch_bytes += len(chunk)
                    if batch_bytes >= STREAM_CHUNK_BYTES:
                        await asyncio.to_thread(sink.writelines, batch)
                        batch, batch_bytes = [], 0
                if batch:
                    await asyncio.to_thread(sink.writelines, batch)
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def open_writer(self, key: str) -> BlobWriter:
        return _MultipartWriter(self, self.object_key(key))

    async def hand_off(self, staged: Path, key: str, size: int) -> None:
        """Keep `staged`, a copy of the blob just stored under `key`, where a worker sharing this
        process's scratch folder finds it (`source`); unless none is there, or the disk is short of room
        for uploads."""
        if not self._handoff_taker_here():
            await asyncio.to_thread(_remove, [staged])
            return
        kept = self._handoff_path(key)
        self._forget_handed_off(key)  # a job run again hands its original off again, in the same place
        self._handed_off[key] = (kept, size)
        self._handed_off_bytes += size
        evicted: list[Path] = []
        while self._handed_off_bytes > self.handoff_budget_bytes:
            _, (oldest, oldest_size) = self._handed_off.popitem(last=False)
            self._handed_off_bytes -= oldest_size
            evicted.append(oldest)
        await asyncio.to_thread(self._keep, staged, kept, evicted)

    def _keep(self, staged: Path, kept: Path, evicted: list[Path]) -> None:
        # A saving, never a reason to fail the upload: what cannot be kept or removed now, the scratch
        # folder's sweep removes later.
        with contextlib.suppress(OSError):
            _remove(evicted)
            if self.free_bytes() < self._settings.min_free_bytes:
                staged.unlink(missing_ok=True)
            else:
                os.replace(staged, kept)

    def _take_handed_off(self, key: str) -> Path | None:
        """The original a web of this machine kept for us, moved into our own scratch name: a rename, so
        of two workers only one takes it (a re-run fetches the blob). Done on the loop: a rename within
        one folder costs less than the hop to a thread, and most calls find nothing."""
        taken = self.new_staging_path()
        try:
            os.rename(self._handoff_path(key), taken)
        except FileNotFoundError:
            return None
        return taken

    def _handoff_path(self, key: str) -> Path:
        # Named by a digest: the prefix and key may hold any character a file name cannot.
        digest = hashlib.sha256(f"{self.bucket}/{self.object_key(key)}".encode()).hexdigest()[:40]
        return self._staging / f"{_HANDOFF_PREFIX}{digest}"

    async def _remove_handed_off(self, key: str, *, under: bool = False) -> None:
        if kept := self._forget_handed_off(key, under=under):
            await asyncio.to_thread(_remove, kept)

    def _forget_handed_off(self, key: str, *, under: bool = False) -> list[Path]:
        """The file this process kept of the blob `key` (`under`: of every blob under it), no longer
        counted."""
        if under:
            folder = key + "/"
            keys = [kept_key for kept_key in self._handed_off if kept_key.startswith(folder)]
        else:
            keys = [key] if key in self._handed_off else []
        forgotten = []
        for kept_key in keys:
            path, size = self._handed_off.pop(kept_key)
            self._handed_off_bytes -= size
            forgotten.append(path)
        return forgotten

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            head = await _call(self.client.head_object(Bucket=self.bucket, Key=self.object_key(key)))
        except BlobMissing:
            return None
        return BlobInfo(head["ContentLength"], head["ETag"].strip('"'), head["LastModified"].timestamp())

    async def read_head(self, key: str, size: int) -> bytes:
        _, chunks = await self.stream(key, 0, size - 1)
        return b"".join([chunk async for chunk in chunks])

    async def touch(self, key: str) -> bool:
        # S3 cannot change an object's time in place: the eviction order is the order they were written.
        return await self.stat(key) is not None

    async def evict_least_recent(self, prefix: str, keep: int) -> None:
        listed = await self._list(prefix)
        listed.sort(key=lambda entry: entry["LastModified"], reverse=True)
        await self._delete([entry["Key"] for entry in listed[keep:]])

    async def delete(self, key: str) -> None:
        await self._remove_handed_off(key)
        await _call(self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key)))

    async def delete_tree(self, prefix: str) -> None:
        await self._remove_handed_off(prefix, under=True)
        listed = await self._list(prefix)
        await self._delete([entry["Key"] for entry in listed])

    async def _list(self, prefix: str) -> list[Any]:
        paginator = self.client.get_paginator("list_objects_v2")
        listed: list[Any] = []

        async def collect() -> None:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.object_key(prefix) + "/"):
                listed.extend(page.get("Contents", []))

        await _call(collect())
        return listed

    async def _delete(self, object_keys: list[str]) -> None:
        for start in range(0, len(object_keys), DELETE_BATCH):
            batch: list[ObjectIdentifierTypeDef] = [
                {"Key": key} for key in object_keys[start : start + DELETE_BATCH]
            ]
            await _call(
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            )

    async def abort_stale_uploads(self, started_before: float) -> int:
        paginator = self.client.get_paginator("list_multipart_uploads")
        stale: list[tuple[str, str]] = []

        async def collect() -> None:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < started_before:
                        stale.append((upload["Key"], upload["UploadId"]))

        # Some S3-compatible servers (rclone's) answer NoSuchUpload when the bucket has none in progress.
        with contextlib.suppress(BlobMissing):
            await _call(collect())
        for key, upload_id in stale:
            with contextlib.suppress(BlobMissing):  # finished or aborted meanwhile
                await _call(
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                )
        return len(stale)

    async def check(self) -> str:
        if not await asyncio.to_thread(self.is_writable):
            return "scratch folder not writable"
        try:
            await _call(self.client.head_bucket(Bucket=self.bucket))
        except BlobMissing:  # HeadBucket's bare 404: a bucket is made by its owner, never by us
            return f"unreachable: there is no bucket named {self.bucket}; create it first"
        except StorageUnavailable as exc:
            return f"unreachable: {exc}"
        return "ok"

    async def presigned_get(self, key: str, expires_in: int, filename: str, content_type: str) -> str | None:
        signer, credentials = await self._signing()
        query = {"response-content-disposition": filename, "response-content-type": content_type}
        return signer.presign("GET", self.object_key(key), query, credentials, expires_in)

    async def presign_post(
        self,
        key: str,
        max_bytes: int,
        expires_in: int,
        success_redirect_url: str | None = None,
        content_type: str | None = None,
    ) -> PresignedPost | None:
        fields: dict[str, str] = {}
        if success_redirect_url is not None:
            fields["success_action_redirect"] = success_redirect_url
        if content_type is not None:
            fields["Content-Type"] = content_type
        signer, credentials = await self._signing()
        url, form = signer.presign_post(
            self.bucket, self.object_key(key), fields, max_bytes, credentials, expires_in
        )
        return PresignedPost(url, form)

    async def stream(
        self, key: str, first: int | None = None, last: int | None = None
    ) -> tuple[BlobInfo, AsyncIterator[bytes]]:
        wanted = None
        if first is not None or last is not None:
            wanted = {"Range": f"bytes={first or 0}-{'' if last is None else last}"}
        response = await self.send("GET", self.object_key(key), headers=wanted)
        headers = response.headers
        content_range = headers.get("Content-Range")
        size = int(content_range.rpartition("/")[2] if content_range else headers["Content-Length"])
        modified = email.utils.parsedate_to_datetime(headers["Last-Modified"]).timestamp()
        return BlobInfo(size, headers["ETag"].strip('"'), modified), _chunks(response)


def _first_part(staged: Path, part_size: int) -> tuple[bytes, BinaryIO | None]:
    """The staged file's first `part_size` bytes and, when there may be more, the file open after them;
    a file shorter than a part is removed once read (put_file consumes it)."""
    source = staged.open("rb")
    try:
        first = source.read(part_size)
    except BaseException:
        source.close()
        staged.unlink(missing_ok=True)
        raise
    if len(first) == part_size:
        return first, source
    source.close()
    staged.unlink(missing_ok=True)
    return first, None


def _link(path: Path, other_name: Path) -> int:
    """Give `path` another name; its size."""
    os.link(path, other_name)
    return other_name.stat().st_size


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _payload(chunks: Sequence[bytes]) -> bytes | AsyncIterator[bytes] | None:
    """A request body from its chunks (sent with an explicit Content-Length, so not chunked), made anew
    for every attempt: one chunk up to a megabyte as it is, which aiohttp writes with the headers in one
    send (a result, an original that arrived whole), several one after the other, the loop free to run
    between them."""
    if not chunks:
        return None
    if len(chunks) == 1 and len(chunks[0]) <= STREAM_CHUNK_BYTES:
        return chunks[0]
    return _replay(chunks)


async def _replay(chunks: Sequence[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async with response:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"the storage stopped sending: {exc}") from exc


async def _refusal(response: aiohttp.ClientResponse) -> Exception:
    """What an S3 error answer means for us: BlobMissing for a missing key (or upload), else
    StorageUnavailable naming S3's code and message."""
    async with response:
        try:
            said = dict(_ERROR_FIELD.findall(await response.content.read(64 * 1024)))
        except (aiohttp.ClientError, OSError, TimeoutError):
            said = {}
    code = said.get(b"Code", str(response.status).encode()).decode(errors="replace")
    message = said.get(b"Message", (response.reason or "").encode()).decode(errors="replace")
    if code in _NOT_FOUND:  # not NoSuchBucket, a 404 too: that is the storage misconfigured
        return BlobMissing(message or "no such blob")
    return StorageUnavailable(f"the storage answered {code}: {message}")


class _MultipartWriter:
    """A multipart upload sending each part as soon as it is full (one part of memory at most), or one
    PutObject when the whole blob fits one part. A part is held as the chunks that make it up."""

    def __init__(self, storage: S3Storage, object_key: str) -> None:
        self._storage = storage
        self._key = object_key
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []

    async def write(self, chunk: bytes) -> None:
        part_size = self._storage.part_size
        while self._pending_bytes + len(chunk) >= part_size:
            fits = part_size - self._pending_bytes
            self._pending.append(chunk[:fits])
            chunk = chunk[fits:]
            await self._send_part(self._take_pending())
        if chunk:
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)

    def _take_pending(self) -> list[bytes]:
        part, self._pending, self._pending_bytes = self._pending, [], 0
        return part

    async def _send_part(self, part: list[bytes]) -> None:
        client, bucket = self._storage.client, self._storage.bucket
        if self._upload_id is None:
            started = await _call(client.create_multipart_upload(Bucket=bucket, Key=self._key))
            self._upload_id = started["UploadId"]
        number = len(self._parts) + 1
        query: dict[str, str | int] = {"uploadId": self._upload_id, "partNumber": number}  # botocore's order
        async with await self._storage.send("PUT", self._key, query, body=part) as sent:
            self._parts.append({"PartNumber": number, "ETag": sent.headers["ETag"]})

    async def commit(self) -> None:
        client, bucket = self._storage.client, self._storage.bucket
        if self._upload_id is None:
            body = self._take_pending() or [b""]
            await (await self._storage.send("PUT", self._key, body=body)).release()
            return
        if self._pending:
            await self._send_part(self._take_pending())
        await _call(
            client.complete_multipart_upload(
                Bucket=bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
        )

    async def abort(self) -> None:
        self._take_pending()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            await _call(
                self._storage.client.abort_multipart_upload(
                    Bucket=self._storage.bucket, Key=self._key, UploadId=upload_id
                )
            )
        except (StorageUnavailable, BlobMissing):
            # The sweep aborts it later (abort_stale_uploads); a bucket lifecycle rule is the backstop.
            log.warning("could not abort the multipart upload of %s; the sweep will", self._key)


async def _call(operation: Awaitable[T]) -> T:
    """An S3 request, its failures as ours: BlobMissing for a missing key, StorageUnavailable else."""
    try:
        return await operation
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") in _NOT_FOUND:
            raise BlobMissing(error.get("Message") or "no such blob") from None
        raise StorageUnavailable(f"the storage answered {error.get('Code')}: {error.get('Message')}") from exc
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise StorageUnavailable(f"the storage cannot be reached: {exc}") from exc
