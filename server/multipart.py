"""Stream a multipart upload to storage, never holding the file in memory, refusing it past a size cap.

Starlette's `request.form()` spools files without a size limit; this reads the body chunk by chunk,
writes file parts straight to a staging file and stops the moment the cap is crossed. With S3 storage
each file is also sent on to its original's key while it arrives (a multipart upload, a part at a time),
so a large upload is in the bucket moments after its last byte; it becomes visible only when the caller
commits it, after the checks.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header
from starlette.requests import Request

from jobs.ids import new_id
from jobs.params import FieldError
from jobs.records import original_key
from jobs.storage import BlobStorage, BlobWriter, LocalStorage, StorageUnavailable, is_full
from server.problems import Problem, storage_full_problem

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 16
# The part that carries the image: it must be a file part (one with a filename).
FILE_FIELD = "file"
_EXTENDED_CHARSETS = ("utf-8", "iso-8859-1")
# Room for the fields and multipart framing around the file itself.
ENVELOPE_BYTES = 1024 * 1024


@dataclass
class UploadedFile:
    field_name: str
    filename: str
    path: Path
    size: int = 0
    head: bytes = b""
    # The image it will be: its original's key is known while it arrives.
    image_id: str = field(default_factory=lambda: new_id("img"))
    # The original on its way to S3 (None for local storage, and once committed or aborted).
    stored: BlobWriter | None = None
    # The pieces parsed since the last send, as they came: gathering them into one buffer cost a copy
    # (and page faults) of every byte.
    unsent: list[bytes] = field(default_factory=list)

    async def send_arrived(self) -> None:
        if self.stored is not None and self.unsent:
            pieces, self.unsent = self.unsent, []
            for piece in pieces:
                await self.stored.write(piece)

    async def commit(self, storage: BlobStorage, key: str) -> None:
        """Store the file under `key`: the upload under way is completed (and the staged copy handed off
        to a worker of this machine), or the staged file stored."""
        if self.stored is None:
            await storage.put_file(self.path, key)
            return
        stored, self.stored = self.stored, None
        await self.send_arrived()
        await stored.commit()
        await storage.hand_off(self.path, key, self.size)


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)
    # Fields the body got wrong (sent twice, not UTF-8, `file` without a filename): reported with the
    # other validation errors, so one 422 names every problem.
    errors: list[FieldError] = field(default_factory=list)

    async def discard(self) -> None:
        """Remove the staged files, and abandon the uploads to S3 not committed."""
        for upload in self.files:
            upload.path.unlink(missing_ok=True)
            stored, upload.stored = upload.stored, None
            if stored is not None:
                await stored.abort()


class _Receiver:
    """python-multipart callbacks, collecting fields in memory and files on disk."""

    def __init__(
        self, storage: BlobStorage, max_file_bytes: int, max_files: int, account_id: str | None
    ) -> None:
        self.storage = storage
        # Files are sent on to S3 as they arrive when the account (so the original's key) is known.
        self.account_id = None if isinstance(storage, LocalStorage) else account_id
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.result = MultipartUpload()
        self.problem: Problem | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field_name = ""
        self._field_value = bytearray()
        self._field_names: set[str] = set()
        # Set for a part refused whole, whose data is then read past.
        self._skipping = False
        self._file: UploadedFile | None = None
        self._sink: BinaryIO | None = None
        # Set by the closing boundary: a body cut short must not pass for a complete upload.
        self.complete = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._field_value = bytearray()
        self._file = None
        self._skipping = False

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        try:
            self._field_name, filename = _disposition(self._headers.get(b"content-disposition", b""))
        except UnreadableFilename as exc:
            self._field_name = FILE_FIELD
            self._skip(str(exc))
            return
        if filename is None:
            self._field_started()
            return
        if len(self.result.files) >= self.max_files:
            message = f"at most {self.max_files} file part(s) per request"
            self._fail(
                Problem(
                    422,
                    "too_many_files",
                    message,
                    errors=[FieldError(self._field_name or FILE_FIELD, message)],
                )
            )
            return
        path, self._sink = self.storage.open_staging()
        self._file = UploadedFile(self._field_name, filename, path)
        if self.account_id is not None and self._field_name == FILE_FIELD:
            self._file.stored = self.storage.open_writer(original_key(self.account_id, self._file.image_id))
        self.result.files.append(self._file)

    def _field_started(self) -> None:
        """A part without a filename: a text field, unless it is refused whole (its data then skipped)."""
        name = self._field_name
        if name == FILE_FIELD:
            # `curl -F 'file=<photo.jpg'` sends the bytes as a text field: no name to keep, and the
            # 64 KB field cap would misreport it as an oversized field.
            self._skip(
                "must be a file part with a filename (Content-Disposition: form-data; "
                'name="file"; filename="photo.jpg"), as curl -F file=@photo.jpg sends it'
            )
        elif name in self._field_names:
            self._skip(f"was sent more than once: give {name} once")
        elif len(self._field_names) >= MAX_FIELDS:
            self._fail(Problem(422, "too_many_fields", f"at most {MAX_FIELDS} form fields"))
        self._field_names.add(name)

    def _skip(self, message: str) -> None:
        self._skipping = True
        if all(error.field != self._field_name for error in self.result.errors):
            self.result.errors.append(FieldError(self._field_name, message))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.problem is not None or self._skipping:
            return
        chunk = data[start:end]
        if self._file is None:
            if len(self._field_value) + len(chunk) > MAX_FIELD_BYTES:
                self._fail(Problem(413, "field_too_large", f"form field {self._field_name!r} exceeds 64 KB"))
                return
            self._field_value.extend(chunk)
            return
        self._file.size += len(chunk)
        if self._file.size > self.max_file_bytes:
            self._fail(_too_large(self.max_file_bytes))
            return
        if len(self._file.head) < 64:
            self._file.head += chunk[: 64 - len(self._file.head)]
        assert self._sink is not None
        self._sink.write(chunk)
        if self._file.stored is not None:
            self._file.unsent.append(chunk)

    def _part_end(self) -> None:
        if self._file is not None:
            self.close()
            return
        if self.problem is not None or self._skipping:
            return
        try:
            self.result.fields[self._field_name] = self._field_value.decode()
        except UnicodeDecodeError:
            # Replacing the bad bytes would store text the partner never sent.
            self.result.errors.append(FieldError(self._field_name, "must be UTF-8 text"))

    def _end(self) -> None:
        self.complete = True

    def _fail(self, problem: Problem) -> None:
        if self.problem is None:
            self.problem = problem
        self.close()

    def close(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close()

    def close_quietly(self) -> None:
        """Close the staging file whatever happened: its buffered bytes may not fit on a full disk."""
        with contextlib.suppress(OSError):
            self.close()


class UnreadableFilename(ValueError):
    """A `filename*` in a charset other than RFC 8187's two, or bytes that are not text in it."""


def _disposition(header: bytes) -> tuple[str, str | None]:
    """A part's field name and file name (None for a text field) from its Content-Disposition.

    Read with the standard library rather than python-multipart, which drops RFC 5987 `filename*` and
    cuts `C:\\dir\\a.jpg` down to `a.jpg` but not `..\\a.jpg`: the name is kept as sent, in either
    form (`filename*` first, as RFC 6266 asks), and made safe where it is used."""
    message = Message()
    message["content-disposition"] = header.decode("latin-1")
    params: dict[str, str] = {}
    for key, value in message.get_params([], header="content-disposition")[1:]:
        if isinstance(value, tuple):  # RFC 2231 `key*=charset'lang'text`, percent-decoded here
            params[key.lower()] = _extended_value(key, *value)
        else:  # header bytes, as UTF-8 clients send them
            params.setdefault(key.lower(), value.encode("latin-1").decode("utf-8", "replace"))
    return params.get("name", ""), params.get("filename")


def _extended_value(key: str, charset: str | None, language: str | None, text: str) -> str:
    """An RFC 8187 value in UTF-8 or ISO-8859-1, decoded strictly. Python would decode any codec it
    knows, some of which (UTF-7, unicode_escape) make text no response could carry: `+2AA-` is half of
    a UTF-16 pair."""
    if (charset or "").lower() not in _EXTENDED_CHARSETS:
        raise UnreadableFilename(f"{key}* must be in UTF-8 or ISO-8859-1 (RFC 8187), not {charset!r}")
    try:
        # The standard library percent-decodes each byte to the character of that number.
        return text.encode("latin-1").decode(charset or "")
    except UnicodeError:
        raise UnreadableFilename(f"{key}* is not {charset} text") from None


def _too_large(limit: int) -> Problem:
    return Problem(413, "file_too_large", f"the file exceeds the upload limit of {limit} bytes")


async def receive_multipart(
    request: Request,
    storage: BlobStorage,
    max_file_bytes: int,
    max_files: int = 1,
    account_id: str | None = None,
) -> MultipartUpload:
    """Parse the request body; on any problem, staged files are removed (uploads under way abandoned)
    and the Problem is raised. With `account_id`, files go on to S3 as they arrive (see above)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        # Both routes reading a form take JSON too (by URL, a direct upload, a batch's `images`).
        sent = content_type.decode(errors="replace") or "missing"
        raise Problem(
            415,
            "unsupported_media_type",
            "send the image as multipart/form-data with a `file` part (curl -F file=@photo.jpg), or a "
            f"JSON body with Content-Type: application/json; this request's Content-Type is {sent}",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise _malformed(
            "the Content-Type multipart/form-data has no boundary parameter; let your HTTP client set "
            "the header (curl -F does) rather than setting it by hand"
        )
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise _malformed(
            f"the multipart boundary is {len(boundary)} characters long; at most {MAX_BOUNDARY_LENGTH} "
            "are accepted (RFC 2046 allows 70)"
        )
    declared = request.headers.get("content-length")
    body_limit = max_file_bytes * max_files + ENVELOPE_BYTES
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_file_bytes)
    receiver = _Receiver(storage, max_file_bytes, max_files, account_id)
    parsed = 0  # bytes of the body parsed before the current chunk, to say where a problem is
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
            parsed += len(chunk)
            if receiver.problem is not None:
                raise receiver.problem
            for upload in receiver.result.files:
                await upload.send_arrived()
        parser.finalize()
        if not receiver.complete:
            raise _malformed("the multipart body ended before its closing boundary")
    except (Problem, StorageUnavailable):
        await receiver.result.discard()
        raise
    except MultipartParseError as exc:
        await receiver.result.discard()
        raise _malformed(f"{_explain(str(exc))} (at byte {parsed + exc.offset} of the body)") from None
    except OSError as exc:
        receiver.close_quietly()
        await receiver.result.discard()
        if is_full(exc):
            raise storage_full_problem() from None
        raise
    except BaseException as exc:
        await asyncio.shield(receiver.result.discard())
        if not isinstance(exc, Exception):
            raise  # cancelled: the client went away
        raise _malformed(f"the multipart body could not be parsed: {exc}") from None
    finally:
        receiver.close_quietly()
    return receiver.result


def _malformed(detail: str) -> Problem:
    return Problem(400, "malformed_multipart", detail)


# python-multipart's messages, by how they start, as a partner can act on them.
_PARSER_MESSAGES = (
    (
        "Expected boundary character",
        "the body does not start with `--` and the boundary given in Content-Type",
    ),
    ("Did not find CR at end of boundary", "a boundary line does not end with CRLF"),
    ("Did not find LF at end of boundary", "a boundary line does not end with CRLF"),
    ("Did not find CRLF after boundary padding", "a boundary line does not end with CRLF"),
    ("Did not find - at end of boundary", "the closing boundary does not end with `--`"),
    ("Maximum header size exceeded", "a part has a header line over 4 KB"),
    ("Maximum header count exceeded", "a part has too many header lines"),
    ("Found invalid character", "a part's header has a name with characters a header name cannot have"),
    ("Found 0-length header", "a part has a header line without a name"),
    ("Did not find LF", "a part's header line does not end with CRLF"),
)


def _explain(message: str) -> str:
    sentence = next((text for start, text in _PARSER_MESSAGES if message.startswith(start)), None)
    if sentence is None:
        return f"the multipart body could not be parsed: {message}"
    return f"the multipart body is malformed: {sentence}"
