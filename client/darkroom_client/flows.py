"""What each call does, as flows of the sans-IO core: images, batches, webhook endpoints, deliveries."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import mimetypes
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias, TypeVar

import httpx

from darkroom_client.core import CONNECT_TIMEOUT_SECONDS, Arrival, Core, Flow, Save, Sleep, dumps
from darkroom_client.errors import APIError, WaitTimeout
from darkroom_client.types import Batch, Delivery, Image, Page, WebhookEndpoint

if TYPE_CHECKING:
    from darkroom_client.listener import WebhookListener

FileSource: TypeAlias = str | os.PathLike[str] | bytes | IO[bytes]
Operations: TypeAlias = Sequence[dict[str, Any]]
# Called with the number of bytes just sent, as a file is read into the request.
Progress: TypeAlias = Callable[[int], None]

# The service takes at most 50 files a request; fewer make each retry smaller and progress smoother.
FILES_PER_REQUEST = 10
DEFAULT_WAIT_SECONDS = 600.0
# With a webhook listener: how long to wait for the event before asking the service once (in case the
# webhook was lost).
DEFAULT_CHECK_SECONDS = 30.0
# A wait asks the service to answer once the image or batch is done, or after this long (`Prefer: wait`;
# the service may apply less, and says what in `Preference-Applied`).
LONG_POLL_SECONDS = 25
# With a progress callback, the service answers at least this often, so that progress shows.
PROGRESS_POLL_SECONDS = 2
# How much longer than the wait asked for a long poll's answer may take to arrive.
LONG_POLL_MARGIN_SECONDS = 15.0


class _CountedReader:
    """A file as httpx reads it into a request, telling `progress` of each byte read for the first time
    (a retry reads the file again; its bytes were counted already)."""

    def __init__(self, file: IO[bytes], progress: Progress) -> None:
        self._file = file
        self._progress = progress
        self._furthest = file.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        position = self._file.tell()
        if position > self._furthest:
            self._progress(position - self._furthest)
            self._furthest = position
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


class _ToldOnce:
    """`progress` for one file sent in several requests (a batch request sent again without a file the
    service refused): each request reads the file from its start, and only bytes no earlier request
    reached are told."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._furthest = 0
        self._read = 0

    def again(self) -> Progress | None:
        """The progress callback for the next request that sends the file (None: nobody listens)."""
        self._read = 0
        return None if self._progress is None else self._tell

    def _tell(self, sent: int) -> None:
        self._read += sent
        if self._read > self._furthest and self._progress is not None:
            self._progress(self._read - self._furthest)
            self._furthest = self._read


def _name_of(source: FileSource, filename: str | None) -> str:
    if filename:
        return filename
    if isinstance(source, str | os.PathLike):
        return Path(source).name
    name = getattr(source, "name", None)
    return Path(name).name if isinstance(name, str) else "image"


def _content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


@contextlib.contextmanager
def _opened(source: FileSource) -> Iterator[IO[bytes]]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        with Path(source).open("rb") as file:
            yield file
    else:
        yield source


def _file_part(
    stack: contextlib.ExitStack, source: FileSource, filename: str | None, progress: Progress | None
) -> tuple[str, tuple[str, Any, str]]:
    name = _name_of(source, filename)
    file = stack.enter_context(_opened(source))
    body: Any = file if progress is None else _CountedReader(file, progress)
    return ("file", (name, body, _content_type(name)))


def _fields(
    operations: Operations | None, callback_url: str | None, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    """The optional fields every way of creating an image shares, as JSON values."""
    return {
        "operations": None if operations is None else list(operations),
        "callback_url": callback_url,
        "metadata": metadata,
    }


def _form(fields: dict[str, Any]) -> dict[str, str]:
    """The same fields as multipart form values: JSON text for lists and objects."""
    return {
        name: value if isinstance(value, str) else dumps(value)
        for name, value in fields.items()
        if value is not None
    }


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def folder_files(path: Path) -> list[Path]:
    """A folder's files (not hidden, not recursive, by name), or the path itself when it is no folder."""
    if not path.is_dir():
        return [path]
    return [item for item in sorted(path.iterdir()) if item.is_file() and not item.name.startswith(".")]


def files_in(files: str | os.PathLike[str] | Iterable[FileSource]) -> list[FileSource]:
    """A folder's files, one file's path, or the sources given."""
    if isinstance(files, str | os.PathLike):
        return list(folder_files(Path(files)))
    return list(files)


class _Polling:
    """Polling with backoff, until a deadline."""

    def __init__(self, what: str, timeout: float, interval: float, max_interval: float) -> None:
        if interval <= 0:
            # Zero would ask the service in a tight loop until the timeout.
            raise ValueError(f"the time between checks must be above 0 s, not {interval:g}")
        self.what = what
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.interval = interval
        self.max_interval = max_interval

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(f"{self.what} did not finish within {self.timeout:g} s")

    def pause(self) -> Flow[None]:
        left = self.left()
        if left <= 0:
            raise self.timed_out()
        yield Sleep(min(self.interval, left))
        self.interval = min(self.max_interval, self.interval * 1.5)


Finishing = TypeVar("Finishing", Image, Batch)


def _long_polled(
    core: Core,
    path: str,
    parse: Callable[[Any], Finishing],
    polling: _Polling,
    longest: int = LONG_POLL_SECONDS,
    seen: Callable[[Finishing], None] | None = None,
) -> Flow[Finishing]:
    """The image or batch at `path` once done: asked with `Prefer: wait=` (up to `longest` seconds, and no
    longer than the deadline leaves), so the service answers as it finishes; `seen` sees each answer. A
    service that does not apply the preference (it says so by leaving out `Preference-Applied`) is
    polled, backing off as `polling` says."""
    while True:
        wait = math.ceil(min(longest, polling.left()))
        request = core.request(
            "GET",
            path,
            headers={"Prefer": f"wait={wait}"},
            timeout=httpx.Timeout(wait + LONG_POLL_MARGIN_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
        )
        response = yield from core.send(request)
        found = parse(response.json())
        if seen is not None:
            seen(found)
        if found.done:
            return found
        if "preference-applied" not in response.headers:
            yield from polling.pause()
        elif polling.left() <= 0:
            raise polling.timed_out()


def _by_webhook(
    finished: Future[Finishing], fetch: Callable[[], Flow[Finishing]], checks: _Polling
) -> Flow[Finishing]:
    """The image or batch from the webhook `finished` is resolved by; fetched after each `checks.interval`
    without it, and when the deadline passed."""
    while True:
        arrived: Finishing | None = yield Arrival(finished, min(checks.interval, checks.left()))
        if arrived is not None:
            return arrived
        current = yield from fetch()
        if current.done:
            return current
        if checks.left() <= 0:
            raise checks.timed_out()


class ImageFlows:
    def __init__(self, core: Core) -> None:
        self._core = core

    def upload(
        self,
        file: FileSource,
        *,
        operations: Operations | None = None,
        callback_url: str | None = None,
        batch_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        filename: str | None = None,
        progress: Progress | None = None,
    ) -> Flow[Image]:
        """Upload a file (a path, bytes or an open binary file) with the operations to apply; the image
        answers `queued`. `progress` is called with each count of bytes sent."""
        with contextlib.ExitStack() as stack:
            form = _form({**_fields(operations, callback_url, metadata), "batch_id": batch_id})
            part = _file_part(stack, file, filename, progress)
            answer = yield from self._core.call("POST", "/v1/images", data=form, files=[part])
        return Image.from_json(answer)

    def from_url(
        self,
        url: str,
        *,
        operations: Operations | None = None,
        callback_url: str | None = None,
        batch_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Flow[Image]:
        """Have a worker fetch the image at `url` (http or https) and process it."""
        body = _present(
            {"source_url": url, **_fields(operations, callback_url, metadata), "batch_id": batch_id}
        )
        answer = yield from self._core.call("POST", "/v1/images", json_body=body)
        return Image.from_json(answer)

    def direct_upload(
        self,
        file: str | os.PathLike[str] | bytes,
        *,
        operations: Operations | None = None,
        callback_url: str | None = None,
        batch_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        filename: str | None = None,
    ) -> Flow[Image]:
        """Create a direct upload, then send the bytes to its signed URL (or its S3 form) as a phone or
        browser would, without the API key. The answer is the image once its bytes landed."""
        name = _name_of(file, filename)
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        content_type = _content_type(name)
        declared = {"filename": name, "content_type": content_type, "size": len(data)}
        fields = _present({**declared, **_fields(operations, callback_url, metadata), "batch_id": batch_id})
        created = yield from self._core.call("POST", "/v1/uploads", json_body=fields)
        form = created.get("upload_form")
        if form:
            request = self._core.request(
                "POST",
                form["url"],
                data=form["fields"],
                files=[("file", (name, data, content_type))],
                authenticated=False,
            )
            landed = yield from self._core.send(request, follow_redirects=True)
        else:
            request = self._core.request(
                created.get("upload_method", "PUT"),
                created["upload_url"],
                content=data,
                headers=created.get("upload_headers") or {},
                authenticated=False,
            )
            landed = yield from self._core.send(request)
        return Image.from_json(landed.json())

    def get(self, image_id: str) -> Flow[Image]:
        answer = yield from self._core.call("GET", f"/v1/images/{image_id}")
        return Image.from_json(answer)

    def list_page(
        self,
        cursor: str | None,
        /,
        *,
        status: str | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
    ) -> Flow[Page[Image]]:
        """One page of images, newest first (`cursor`: the previous page's `next_cursor`, or None)."""
        params = {"status": status, "batch_id": batch_id, "limit": limit, "cursor": cursor}
        answer = yield from self._core.call("GET", "/v1/images", params=params)
        return _page(answer, Image.from_json)

    def delete(self, image_id: str) -> Flow[None]:
        """Delete the image and its files (a render under way stops; no webhook is sent)."""
        yield from self._core.call("DELETE", f"/v1/images/{image_id}")

    def _variant_request(
        self,
        image_id: str,
        original: bool,
        format: str | None,
        quality: int | None,
        width: int | None,
        height: int | None,
    ) -> httpx.Request:
        params = {"format": format, "quality": quality, "width": width, "height": height}
        if original and any(value is not None for value in params.values()):
            # The service answers 422 to any query on /original: say so before sending anything.
            raise ValueError(
                "format, quality, width and height ask for a variant of the result, not of the original"
            )
        which = "original" if original else "output"
        return self._core.request("GET", f"/v1/images/{image_id}/{which}", params=params)

    def download(
        self,
        image_id: str,
        *,
        original: bool = False,
        format: str | None = None,
        quality: int | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> Flow[bytes]:
        """The result's bytes (or the uploaded file's, with `original=True`); `format`, `quality`, `width`
        and `height` ask for a variant of the result."""
        request = self._variant_request(image_id, original, format, quality, width, height)
        response = yield from self._core.send(request, follow_redirects=True)
        return response.content

    def download_to(
        self,
        image_id: str,
        to: str | os.PathLike[str],
        *,
        original: bool = False,
        format: str | None = None,
        quality: int | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> Flow[Path]:
        """As `download`, streamed into the file `to` (a folder: the service's file name in it)."""
        request = self._variant_request(image_id, original, format, quality, width, height)
        target = Path(to)
        if target.is_dir():
            partial = target / f".{image_id}.part"
            response = yield from self._core.exchange(lambda: Save(request, partial))
            target = target / _attachment_name(response, image_id)
            partial.replace(target)
        else:
            yield from self._core.exchange(lambda: Save(request, target))
        return target

    def wait(
        self,
        image_id: str,
        *,
        timeout: float = DEFAULT_WAIT_SECONDS,
        interval: float = 0.25,
        listener: WebhookListener | None = None,
        check_every: float = DEFAULT_CHECK_SECONDS,
    ) -> Flow[Image]:
        """Wait until the image is `completed` or `failed`, and answer it; `WaitTimeout` after `timeout`
        seconds. The service is asked to answer as the image finishes (`Prefer: wait`, a long poll,
        asked again each time it answers unfinished); one that does not is polled, backing off from
        `interval` to 5 s.

        With a `listener` (the image uploaded with its `callback_url`), wait for the webhook instead and
        answer the image it carries, without asking the service. A webhook can be lost, so after each
        `check_every` seconds without it, and once more when the timeout is reached, the image is asked
        for once."""
        if listener is not None:
            checks = _Polling(f"image {image_id}", timeout, check_every, check_every)
            return (
                yield from _by_webhook(
                    listener.finished(image_id), functools.partial(self.get, image_id), checks
                )
            )
        polling = _Polling(f"image {image_id}", timeout, interval, max_interval=5.0)
        return (yield from _long_polled(self._core, f"/v1/images/{image_id}", Image.from_json, polling))

    def wait_many(
        self,
        image_ids: Iterable[str],
        *,
        timeout: float = DEFAULT_WAIT_SECONDS,
        interval: float = 0.25,
        listener: WebhookListener | None = None,
        check_every: float = DEFAULT_CHECK_SECONDS,
    ) -> Flow[list[Image]]:
        """`wait` for several images at once; answers them in the order given."""
        ids = list(image_ids)
        if listener is not None:
            checks = _Polling(f"{len(ids)} images", timeout, check_every, check_every)
            images = []
            for image_id in ids:
                fetch = functools.partial(self.get, image_id)
                images.append((yield from _by_webhook(listener.finished(image_id), fetch, checks)))
            return images
        polling = _Polling(f"{len(ids)} images", timeout, interval, max_interval=5.0)
        # One after another: by the time the first is done, the others mostly are, and answer at once.
        images = []
        for image_id in ids:
            path = f"/v1/images/{image_id}"
            images.append((yield from _long_polled(self._core, path, Image.from_json, polling)))
        return images


def _attachment_name(response: httpx.Response, fallback: str) -> str:
    """The file name the service gave the download (its Content-Disposition), made a bare name."""
    names: dict[str, str] = {}
    for part in response.headers.get("content-disposition", "").split(";"):
        key, _, value = part.strip().partition("=")
        names[key.lower()] = value.strip('"')
    encoded = names.get("filename*", "")
    if encoded.lower().startswith("utf-8''"):
        return Path(urllib.parse.unquote(encoded[7:])).name or fallback
    return Path(names.get("filename", "")).name or fallback


def _page(answer: dict[str, Any], parse: Callable[[dict[str, Any]], Any]) -> Page[Any]:
    return Page(
        [parse(item) for item in answer["data"]], answer.get("has_more", False), answer.get("next_cursor")
    )


# What the service answers about one file sent alone; several at once are refused as `files_refused`.
FILE_REFUSALS = frozenset(
    {
        "file_too_large",
        "unsupported_format",
        "empty_file",
        "unreadable_image",
        "image_too_large",
        "too_many_pages",
    }
)


def _refused_files(error: APIError, sent: int) -> dict[int, str]:
    """Which of the `sent` files the refusal names (their index in the request), and why."""
    if error.code == "files_refused":
        named = {}
        for item in error.problem.get("errors") or []:
            field = str(item.get("field", ""))
            if field.startswith("file[") and field.endswith("]") and field[5:-1].isdigit():
                named[int(field[5:-1])] = str(item.get("message", ""))
        return named
    if sent == 1 and error.code in FILE_REFUSALS:
        return {0: f"{error.status} {error.code}: {error.detail}"}
    return {}


class BatchFlows:
    def __init__(self, core: Core) -> None:
        self._core = core

    def create(
        self,
        *,
        operations: Operations | None = None,
        callback_url: str | None = None,
        archive: bool | dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Flow[Batch]:
        """A new open batch: `operations` are the default of images added without their own; `archive`
        (True, or `{"format": …, "quality": …}`) has one ZIP built when it completes."""
        body = _present({**_fields(operations, callback_url, metadata), "archive": archive})
        answer = yield from self._core.call("POST", "/v1/batches", json_body=body)
        return Batch.from_json(answer)

    def add(
        self,
        batch_id: str,
        files: str | os.PathLike[str] | Iterable[FileSource],
        *,
        operations: Operations | None = None,
        callback_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        progress: Progress | None = None,
        refused: Callable[[str, str], None] | None = None,
    ) -> Flow[list[Image]]:
        """Add a folder's files, or the files given, a few per request; `progress` hears each count of
        bytes sent. The service refuses a whole request for one bad file: with `refused`, each file it
        names is reported there (its name, and why) and the others are sent again without it; without
        `refused`, the refusal is raised."""
        sources = files_in(files)
        form = _form(_fields(operations, callback_url, metadata))
        images: list[Image] = []
        told = [_ToldOnce(progress) for _ in sources]
        for start in range(0, len(sources), FILES_PER_REQUEST):
            pending = list(range(start, min(start + FILES_PER_REQUEST, len(sources))))
            while pending:
                try:
                    with contextlib.ExitStack() as stack:
                        parts = [_file_part(stack, sources[at], None, told[at].again()) for at in pending]
                        answer = yield from self._core.call(
                            "POST", f"/v1/batches/{batch_id}/images", data=form, files=parts
                        )
                except APIError as exc:
                    bad = _refused_files(exc, len(pending))
                    if refused is None or not bad:
                        raise
                    for index, why in sorted(bad.items()):
                        name = _name_of(sources[pending[index]], None)
                        refused(name, why.removeprefix(f"{name!r}: "))  # the service's message names it too
                    pending = [at for index, at in enumerate(pending) if index not in bad]
                    continue
                images.extend(Image.from_json(item) for item in answer["data"])
                break
        return images

    def seal(self, batch_id: str) -> Flow[Batch]:
        """No more images: the batch completes when every image has finished."""
        answer = yield from self._core.call("POST", f"/v1/batches/{batch_id}/seal")
        return Batch.from_json(answer)

    def get(self, batch_id: str) -> Flow[Batch]:
        answer = yield from self._core.call("GET", f"/v1/batches/{batch_id}")
        return Batch.from_json(answer)

    def list_page(
        self, cursor: str | None, /, *, status: str | None = None, limit: int | None = None
    ) -> Flow[Page[Batch]]:
        params = {"status": status, "limit": limit, "cursor": cursor}
        answer = yield from self._core.call("GET", "/v1/batches", params=params)
        return _page(answer, Batch.from_json)

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float = DEFAULT_WAIT_SECONDS,
        interval: float = 0.5,
        on_poll: Callable[[Batch], None] | None = None,
        listener: WebhookListener | None = None,
        check_every: float = DEFAULT_CHECK_SECONDS,
    ) -> Flow[Batch]:
        """Wait until the batch is completed and its archive, if any, ready or failed, as `images.wait`
        does (a long poll, or polling a service that does not take one); `on_poll` sees the batch at each
        answer (its `counts` for a progress bar), which then comes at least every PROGRESS_POLL_SECONDS.
        With a `listener` (the batch created with its `callback_url`), wait for its webhooks instead, as
        `images.wait` does."""

        def fetch() -> Flow[Batch]:
            batch = yield from self.get(batch_id)
            if on_poll is not None:
                on_poll(batch)
            return batch

        if listener is not None:
            checks = _Polling(f"batch {batch_id}", timeout, check_every, check_every)
            return (yield from _by_webhook(listener.batch_finished(batch_id), fetch, checks))
        polling = _Polling(f"batch {batch_id}", timeout, interval, max_interval=5.0)
        longest = LONG_POLL_SECONDS if on_poll is None else PROGRESS_POLL_SECONDS
        path = f"/v1/batches/{batch_id}"
        return (yield from _long_polled(self._core, path, Batch.from_json, polling, longest, on_poll))

    def download_archive(self, batch_id: str, to: str | os.PathLike[str]) -> Flow[Path]:
        """Download the batch's ZIP into the file `to`. The bytes go to a partial file beside it first,
        renamed when whole: a cut connection resumes where the partial file ends (`Range`, guarded by
        `If-Range` so a changed archive starts over), and so does a later call after this one failed."""
        target = Path(to)
        partial = target.with_name(f".{target.name}.{batch_id}.part")
        url = f"/v1/batches/{batch_id}/archive"
        # The archive's ETag first, from its first byte (a HEAD would carry no problem document when the
        # archive is not ready): a range is only worth having from the very same file.
        first_byte = self._core.request("GET", url, headers={"Range": "bytes=0-0"})
        probe = yield from self._core.send(first_byte, follow_redirects=True)
        same_file = {"If-Range": probe.headers["etag"]} if "etag" in probe.headers else {}

        def from_where_it_ends() -> Save:
            have = partial.stat().st_size if partial.exists() else 0
            headers = {"Range": f"bytes={have}-", **same_file} if have and same_file else {}
            return Save(self._core.request("GET", url, headers=headers), partial)

        try:
            yield from self._core.exchange(from_where_it_ends)
        except APIError as exc:
            if exc.status != 416:  # 416: the partial file is whole already
                raise
        partial.replace(target)
        return target


class EndpointFlows:
    def __init__(self, core: Core) -> None:
        self._core = core

    def create(
        self, url: str, *, events: Sequence[str] = ("*",), description: str | None = None
    ) -> Flow[WebhookEndpoint]:
        """Register an endpoint for the account's events; the answer carries its signing `secret`."""
        body = _present({"url": url, "events": list(events), "description": description})
        answer = yield from self._core.call("POST", "/v1/webhook-endpoints", json_body=body)
        return WebhookEndpoint.from_json(answer)

    def get(self, endpoint_id: str) -> Flow[WebhookEndpoint]:
        answer = yield from self._core.call("GET", f"/v1/webhook-endpoints/{endpoint_id}")
        return WebhookEndpoint.from_json(answer)

    def list(self) -> Flow[list[WebhookEndpoint]]:
        answer = yield from self._core.call("GET", "/v1/webhook-endpoints")
        return [WebhookEndpoint.from_json(item) for item in answer["data"]]

    def update(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        events: Sequence[str] | None = None,
        description: str | None = None,
        status: str | None = None,
    ) -> Flow[WebhookEndpoint]:
        """Change what is given; `status` "disabled" pauses the endpoint, "enabled" resumes it."""
        listed = None if events is None else list(events)
        changes = {"url": url, "events": listed, "description": description, "status": status}
        path = f"/v1/webhook-endpoints/{endpoint_id}"
        answer = yield from self._core.call("PATCH", path, json_body=_present(changes))
        return WebhookEndpoint.from_json(answer)

    def delete(self, endpoint_id: str) -> Flow[None]:
        yield from self._core.call("DELETE", f"/v1/webhook-endpoints/{endpoint_id}")

    def send_test(self, endpoint_id: str) -> Flow[dict[str, Any]]:
        """Send a `webhook.test` event to the endpoint now."""
        answer: dict[str, Any] = yield from self._core.call(
            "POST", f"/v1/webhook-endpoints/{endpoint_id}/test"
        )
        return answer


class DeliveryFlows:
    def __init__(self, core: Core) -> None:
        self._core = core

    def get(self, message_id: str) -> Flow[Delivery]:
        """One message and, per destination, every attempt."""
        answer = yield from self._core.call("GET", f"/v1/deliveries/{message_id}")
        return Delivery.from_json(answer)

    def list_page(
        self,
        cursor: str | None,
        /,
        *,
        status: str | None = None,
        endpoint_id: str | None = None,
        image_id: str | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
    ) -> Flow[Page[Delivery]]:
        params = {
            "status": status,
            "endpoint_id": endpoint_id,
            "image_id": image_id,
            "batch_id": batch_id,
            "limit": limit,
            "cursor": cursor,
        }
        answer = yield from self._core.call("GET", "/v1/deliveries", params=params)
        return _page(answer, Delivery.from_json)

    def retry(self, message_id: str) -> Flow[Delivery]:
        """Send the message again now, under the same `webhook-id`."""
        answer = yield from self._core.call("POST", f"/v1/deliveries/{message_id}/retry")
        return Delivery.from_json(answer)
