"""Downloads of stored blobs (originals, results, variants, archives), from either storage.

Local storage: the file itself (Starlette's FileResponse: Range, Last-Modified). S3: the object streamed
through this process, a single byte range passed on to S3 (several ranges get the whole blob, as RFC 9110
allows), or with DARKROOM_S3_PRESIGNED_DOWNLOADS a 302 to a short-lived presigned GET, which carries the
same Content-Type and Content-Disposition.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from jobs.settings import Settings
from jobs.storage import BlobInfo, BlobMissing, BlobStorage, LocalStorage
from server.problems import Problem

# A presigned download link lives this long: enough to follow the redirect, not to pass it around.
PRESIGNED_GET_SECONDS = 300
# RFC 9110 §14.1's range-spec; positions longer than any file could need are not understood.
_RANGE_SPEC = re.compile(r"(?:(?P<first>[0-9]{1,30})-(?P<last>[0-9]{0,30}))|-(?P<suffix>[0-9]{1,30})")


async def blob_response(
    request: Request,
    key: str,
    *,
    media_type: str,
    filename: str,
    headers: dict[str, str],
    missing: Problem,
    disposition: str = "inline",
    honour_range: bool = True,
) -> Response:
    """The blob under `key`, or `missing` raised when there is none."""
    storage: BlobStorage = request.app.state.storage
    if isinstance(storage, LocalStorage):
        info = await storage.stat(key)
        if info is None:
            raise missing
        range_header = request.headers.get("range") if honour_range else None
        # With If-Range, FileResponse decides whether the range applies: a range that selects nothing
        # is then ignored rather than refused.
        refuse = request.headers.get("if-range") is None
        return _LocalBlobResponse(
            storage.path(key),
            media_type=media_type,
            filename=filename,
            content_disposition_type=disposition,
            headers=headers,
            ignore_range=_ranges_to_serve(range_header, info.size, refuse_unsatisfiable=refuse) is None,
        )
    settings: Settings = request.app.state.settings
    content_disposition = _content_disposition(disposition, filename)
    if settings.s3_presigned_downloads:
        if await storage.stat(key) is None:
            raise missing
        url = await storage.presigned_get(key, PRESIGNED_GET_SECONDS, content_disposition, media_type)
        if url is not None:
            return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
    if_range = request.headers.get("if-range")
    # A range is only for the representation the client already holds part of (RFC 9110 §13.1.5).
    honour_range = honour_range and (if_range is None or if_range == headers.get("ETag"))
    range_header = request.headers.get("range") if honour_range else None
    if request.method == "HEAD":
        # The headers a GET would send, without fetching the body from the bucket.
        found = await storage.stat(key)
        if found is None:
            raise missing
        return Response(
            headers=_headers(headers, content_disposition, found, found.size), media_type=media_type
        )
    wanted = None
    if range_header is not None:
        found = await storage.stat(key)
        if found is None:
            raise missing
        served = _ranges_to_serve(range_header, found.size, refuse_unsatisfiable=True)
        # One `first-[last]` range is asked of S3 as such; a suffix range, or several (which would be
        # multipart/byteranges), get the whole blob.
        if served is not None and len(served) == 1 and served[0][0] is not None:
            wanted = served[0]
    try:
        info, chunks = await storage.stream(key, *(wanted or (None, None)))
    except BlobMissing:
        raise missing from None
    if wanted is None:
        sent_headers = _headers(headers, content_disposition, info, info.size)
        return StreamingResponse(chunks, media_type=media_type, headers=sent_headers)
    first, last = _resolve(wanted, info)
    sent_headers = _headers(headers, content_disposition, info, last - first + 1)
    sent_headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    return StreamingResponse(chunks, status_code=206, media_type=media_type, headers=sent_headers)


def _headers(
    headers: dict[str, str], content_disposition: str, info: BlobInfo, length: int
) -> dict[str, str]:
    """As FileResponse sends them for a local file, from the object's own ETag and time when the caller
    has no ETag of its own."""
    sent = {
        **headers,
        "Content-Disposition": content_disposition,
        "Accept-Ranges": "bytes",
        "Last-Modified": formatdate(info.modified, usegmt=True),
        "Content-Length": str(length),
    }
    sent.setdefault("ETag", f'"{info.etag}"')
    return sent


def _ranges_to_serve(
    header: str | None, size: int, *, refuse_unsatisfiable: bool
) -> list[tuple[int | None, int | None]] | None:
    """The ranges of `header` to act on, each `(first, last)` (`last` None: to the end) or `(None, n)`
    for the last n bytes: a `bytes` range set as RFC 9110 §14.1 writes it (`first-[last]`, last not
    before first, or `-suffix`, comma separated) whose every range selects some of the file. None for
    any other, which is ignored and the file sent whole, as §14.2 allows (where Starlette would answer a
    plain-text 400 or 416); but a single range that selects nothing answers 416, as a problem document,
    when `refuse_unsatisfiable`."""
    if header is None:
        return None
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    ranges: list[tuple[int | None, int | None]] = []
    selecting = []
    for spec in specs:
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None:
            return None
        first, last, suffix = match.group("first", "last", "suffix")
        if first is None:
            ranges.append((None, int(suffix)))
            selecting.append(int(suffix) > 0)
            continue
        if last and int(last) < int(first):
            return None
        ranges.append((int(first), int(last) if last else None))
        selecting.append(int(first) < size)
    if ranges and all(selecting):
        return ranges
    if refuse_unsatisfiable and len(ranges) == 1:
        raise Problem(
            416,
            "range_not_satisfiable",
            f"the file is {size} bytes; the range {header!r} selects none of them",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return None


def _resolve(wanted: tuple[int | None, int | None], info: BlobInfo) -> tuple[int, int]:
    first = wanted[0] or 0
    last = info.size - 1 if wanted[1] is None else min(wanted[1], info.size - 1)
    return first, last


def _content_disposition(disposition: str, filename: str) -> str:
    # As Starlette's FileResponse writes it, so both storages send the same header.
    quoted = quote(filename)
    if quoted != filename:
        return f"{disposition}; filename*=utf-8''{quoted}"
    return f'{disposition}; filename="{filename}"'


class _LocalBlobResponse(FileResponse):
    """FileResponse, told to send the whole file for a `Range` it should not act on (`_ranges_to_serve`)."""

    def __init__(self, *args: Any, ignore_range: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ignore_range = ignore_range

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.ignore_range:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await super().__call__(scope, receive, send)
