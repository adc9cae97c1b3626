"""Stream a multipart upload to storage, never holding the file in memory, refusing it past a size cap.

Starlette's `request.form()` spools files without a size limit; this reads the body chunk by chunk,
writes file parts straight to a staging file and stops the moment the cap is crossed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from jobs.params import FieldError
from jobs.storage import LocalStorage
from server.problems import Problem

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 16
# Room for the fields and multipart framing around the file itself.
ENVELOPE_BYTES = 1024 * 1024


@dataclass
class UploadedFile:
    field_name: str
    filename: str
    path: Path
    size: int = 0
    head: bytes = b""


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    def discard(self) -> None:
        for upload in self.files:
            upload.path.unlink(missing_ok=True)


class _Receiver:
    """python-multipart callbacks, collecting fields in memory and files on disk."""

    def __init__(self, storage: LocalStorage, max_file_bytes: int, max_files: int) -> None:
        self.storage = storage
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.result = MultipartUpload()
        self.problem: Problem | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field_name = ""
        self._field_value = bytearray()
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

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.result.fields) >= MAX_FIELDS:
                self._fail(Problem(422, "too_many_fields", f"at most {MAX_FIELDS} form fields"))
            return
        if len(self.result.files) >= self.max_files:
            message = f"at most {self.max_files} file part(s) per request"
            self._fail(
                Problem(
                    422,
                    "too_many_files",
                    message,
                    errors=[FieldError(self._field_name or "file", message)],
                )
            )
            return
        path, self._sink = self.storage.open_staging()
        filename = options[b"filename"].decode("utf-8", "replace")
        self._file = UploadedFile(self._field_name, filename, path)
        self.result.files.append(self._file)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.problem is not None:
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

    def _part_end(self) -> None:
        if self._file is None:
            if self.problem is None:
                self.result.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
            return
        self.close()

    def _end(self) -> None:
        self.complete = True

    def _fail(self, problem: Problem) -> None:
        if self.problem is None:
            self.problem = problem
        self.close()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def _too_large(limit: int) -> Problem:
    return Problem(413, "file_too_large", f"the file exceeds the upload limit of {limit} bytes")


async def receive_multipart(
    request: Request, storage: LocalStorage, max_file_bytes: int, max_files: int = 1
) -> MultipartUpload:
    """Parse the request body; on any problem, staged files are removed and the Problem is raised."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Problem(
            415, "unsupported_media_type", "send the image as multipart/form-data with a `file` part"
        )
    declared = request.headers.get("content-length")
    body_limit = max_file_bytes * max_files + ENVELOPE_BYTES
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_file_bytes)
    receiver = _Receiver(storage, max_file_bytes, max_files)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if receiver.problem is not None:
                raise receiver.problem
        parser.finalize()
        if not receiver.complete:
            raise Problem(400, "malformed_multipart", "the multipart body ended before its closing boundary")
    except Problem:
        receiver.result.discard()
        raise
    except Exception as exc:
        receiver.result.discard()
        raise Problem(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            receiver.close()
    return receiver.result
