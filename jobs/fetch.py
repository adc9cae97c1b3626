"""Fetching an image a partner named by `source_url`: SSRF-guarded, capped, timed, retried when transient.

The URL is the partner's, so it gets the webhook guard (webhooks/addresses.py): every hop, the first and
each redirect (at most MAX_REDIRECTS), is checked as a URL and its host resolved and judged before we
connect, and the connection goes to the very address judged, never resolved a second time (the way
webhooks/transport.py connects). TLS still verifies, and sends SNI for, the URL's host name.

httpcore, not httpx's client: httpx offers no way to choose where a connection goes (its network backend),
and its decoders inflate a whole chunk at once, where a gzip bomb grows a 64 KB chunk to 64 MB. We ask for
the bytes as they are stored (`Accept-Encoding: identity`), and a server that compresses anyway is
inflated in bounded steps, each byte of the result counted against DARKROOM_MAX_UPLOAD_BYTES.

This pool is the fetches' own: a slow source never takes a connection or a slot webhook deliveries need.
They share only the guard's resolver threads (16), of which fetches hold at most one per running job.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import BinaryIO
from urllib.parse import urljoin

import httpcore

from jobs.inspection import HEAD_BYTES
from jobs.ops.base import ProcessingError
from jobs.settings import Settings
from webhooks.addresses import (
    BlockedDestination,
    Destination,
    InvalidURL,
    ResolutionError,
    parse_destination,
    resolve,
)

MAX_REDIRECTS = 5
# Attempts at a source that fails transiently (refused or reset connections, 5xx, 429), waiting
# FIRST_RETRY_SECONDS and doubling between them, or what Retry-After asks up to LONGEST_RETRY_AFTER.
SOURCE_ATTEMPTS = 3
FIRST_RETRY_SECONDS = 0.5
LONGEST_RETRY_AFTER_SECONDS = 10.0
CHUNK_BYTES = 64 * 1024
USER_AGENT = b"Darkroom-Fetch/1"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_STATUSES = frozenset({429}) | frozenset(range(500, 600))
# Content codings inflated with a size cap (zlib reads both, and the gzip header, with these window bits).
_INFLATED_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
_ZLIB_OR_GZIP = zlib.MAX_WBITS | 32


class _PinnedNetwork(httpcore.AsyncNetworkBackend):
    """Connects only to an address the SSRF guard approved for the host, resolved once per connection."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore names it so)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve(host, port, allow_private=self.allow_private)
        failure: Exception = httpcore.ConnectError(f"cannot connect to {host}")
        for address in addresses:
            try:
                return await self._network.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


@dataclass(frozen=True)
class FetchedSource:
    size: int
    head: bytes  # the first HEAD_BYTES, for the format check


class _Transient(Exception):
    """A failure worth another attempt: `failure` is what the image ends with if none is left."""

    def __init__(self, failure: ProcessingError, retry_after: float | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.retry_after = retry_after


class SourceFetcher:
    """One per worker process (made at start-up, closed at shutdown): the pool of source connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            # Each job fetches over one connection at a time.
            max_connections=2 * settings.worker_concurrency,
            max_keepalive_connections=settings.worker_concurrency,
            keepalive_expiry=5.0,
            network_backend=_PinnedNetwork(settings.allow_private_callbacks),
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def fetch(self, url: str, sink: BinaryIO, deadline: float) -> FetchedSource:
        """Write the body `url` leads to into `sink`, by the loop time `deadline` at the latest (and
        within DARKROOM_SOURCE_TIMEOUT); raise ProcessingError with a `source_…` code otherwise."""
        loop = asyncio.get_running_loop()
        timeout = max(0.0, min(self.settings.source_timeout, deadline - loop.time()))
        deadline = loop.time() + timeout
        attempt = 1
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._follow(url, sink)
            except TimeoutError:
                raise ProcessingError(
                    "source_timeout", f"fetching the source took longer than {timeout:g} s"
                ) from None
            except _Transient as transient:
                wait = transient.retry_after or FIRST_RETRY_SECONDS * 2 ** (attempt - 1)
                if attempt >= SOURCE_ATTEMPTS or loop.time() + wait >= deadline:
                    raise transient.failure from None
            attempt += 1
            sink.seek(0)
            sink.truncate()
            await asyncio.sleep(wait)

    async def _follow(self, url: str, sink: BinaryIO) -> FetchedSource:
        for hop in range(MAX_REDIRECTS + 1):
            destination = self._checked(url, hop)
            try:
                fetched, location = await self._get(destination, sink)
            except BlockedDestination as exc:  # the host resolved to a private address
                raise _blocked(exc, url, hop) from None
            if location is None:
                assert fetched is not None
                return fetched
            url = urljoin(url, location)
        raise ProcessingError(
            "source_too_many_redirects", f"the source redirected more than {MAX_REDIRECTS} times"
        )

    def _checked(self, url: str, hop: int) -> Destination:
        try:
            return parse_destination(url, allow_private=self.settings.allow_private_callbacks)
        except InvalidURL as exc:
            where = "the source URL" if hop == 0 else f"redirect {hop} (to {url[:200]})"
            raise ProcessingError("source_invalid_url", f"{where}: {exc}") from None
        except BlockedDestination as exc:
            raise _blocked(exc, url, hop) from None

    async def _get(self, destination: Destination, sink: BinaryIO) -> tuple[FetchedSource | None, str | None]:
        """The body written to `sink`, or the Location of a redirect."""
        request_url = httpcore.URL(
            scheme=destination.scheme.encode(),
            host=destination.host.encode(),
            port=destination.port,
            target=destination.target.encode(),
        )
        headers = [
            (b"Host", destination.host_header.encode()),
            (b"User-Agent", USER_AGENT),
            (b"Accept", b"image/*"),
            (b"Accept-Encoding", b"identity"),
        ]
        connect = self.settings.source_connect_timeout
        where = destination.host_header
        try:
            async with self._pool.stream(
                "GET",
                request_url,
                headers=headers,
                extensions={"timeout": {"connect": connect}},
            ) as response:
                answer = {name.decode("latin-1").lower(): value for name, value in response.headers}
                status = response.status
                if status in _REDIRECTS and "location" in answer:
                    return None, answer["location"].decode("latin-1")
                if status in _TRANSIENT_STATUSES:
                    raise _Transient(_http_error(status), _retry_after(answer.get("retry-after")))
                if not 200 <= status < 300:
                    raise _http_error(status)
                return await self._save(response, answer, sink), None
        except ResolutionError as exc:
            raise ProcessingError("source_unreachable", str(exc)) from None
        except httpcore.ConnectTimeout:
            raise ProcessingError(
                "source_timeout", f"connecting to {where} took longer than {connect:g} s"
            ) from None
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            tls_problem = _tls_problem(exc, where)
            if tls_problem is not None:  # the same certificate would come back: not worth retrying
                raise ProcessingError("source_unreachable", tls_problem) from None
            detail = str(exc) or type(exc).__name__
            raise _Transient(
                ProcessingError("source_unreachable", f"cannot fetch from {where}: {detail}")
            ) from None

    async def _save(
        self, response: httpcore.Response, answer: dict[str, bytes], sink: BinaryIO
    ) -> FetchedSource:
        cap = self.settings.max_upload_bytes
        too_large = ProcessingError("source_too_large", f"the source is over the limit of {cap:,} bytes")
        declared = answer.get("content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            raise too_large
        coding = answer.get("content-encoding", b"identity").decode("latin-1").strip().lower()
        if coding not in _INFLATED_CODINGS | {"identity", ""}:
            raise ProcessingError(
                "unsupported_format",
                f"the source sent the file compressed as {coding!r}, which Darkroom does not decode",
            )
        inflater = zlib.decompressobj(_ZLIB_OR_GZIP) if coding in _INFLATED_CODINGS else None
        size = 0
        head = b""

        def keep(pieces: Iterable[bytes]) -> None:
            nonlocal size, head
            for piece in pieces:
                size += len(piece)
                if size > cap:
                    raise too_large
                if len(head) < HEAD_BYTES:
                    head += piece[: HEAD_BYTES - len(head)]
                sink.write(piece)

        async for chunk in response.aiter_stream():
            keep([chunk] if inflater is None else _inflate(inflater, chunk, cap - size + 1))
        if inflater is not None:
            keep([inflater.flush()])
        return FetchedSource(size, head)


def _inflate(inflater: zlib._Decompress, chunk: bytes, room: int) -> list[bytes]:
    """The bytes `chunk` inflates to, stopping once they pass `room` (the caller then refuses them)."""
    pieces: list[bytes] = []
    data = chunk
    while data and room > 0:
        try:
            piece = inflater.decompress(data, min(room, CHUNK_BYTES))
        except zlib.error as exc:
            raise ProcessingError(
                "corrupt_image", f"the source's compressed body is damaged: {exc}"
            ) from None
        pieces.append(piece)
        room -= len(piece)
        data = inflater.unconsumed_tail
    return pieces


def _tls_problem(exc: Exception, where: str) -> str | None:
    """What went wrong in the TLS handshake that `exc` (httpcore's) stands for, in words; None for
    another failure."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {where} was rejected: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"the TLS handshake with {where} failed ({cause.reason or 'protocol error'})"
    return None


def _blocked(exc: BlockedDestination, url: str, hop: int) -> ProcessingError:
    where = "the source URL" if hop == 0 else f"redirect {hop} (to {url[:200]})"
    return ProcessingError("source_blocked", f"{where}: {exc}")


def _http_error(status: int) -> ProcessingError:
    try:
        phrase = f" {HTTPStatus(status).phrase}"
    except ValueError:
        phrase = ""
    return ProcessingError("source_http_error", f"the source answered {status}{phrase}")


def _retry_after(raw: bytes | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), at most LONGEST_RETRY_AFTER_SECONDS."""
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), LONGEST_RETRY_AFTER_SECONDS)
