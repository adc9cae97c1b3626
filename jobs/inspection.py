"""The checks every original passes before it is processed, however it came: a multipart upload, a
direct upload's PUT, or a `source_url` fetched by the worker. The format from its bytes, a header libvips
can read, and pixels and pages within the limits."""

from __future__ import annotations

from pathlib import Path

from jobs.formats import ImageFormat, TooManyPages, UnreadableImage, read_header, sniff_format
from jobs.records import InputInfo
from jobs.settings import Settings

# How much of a file's start sniff_format looks at: receivers keep it as the bytes stream past.
HEAD_BYTES = 64


class ImageRefused(Exception):
    """The file cannot be accepted. `code` is stable and the message safe to show the partner; `status`
    is the HTTP status a request refused for it answers (a fetched source only ends failed with `code`)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def inspect_image(path: Path, head: bytes, size: int, filename: str | None, settings: Settings) -> InputInfo:
    """What the file at `path` (`size` bytes, starting with `head`) is, or ImageRefused. Blocking (it
    reads the header): run it in a thread."""
    if size == 0:
        raise ImageRefused(422, "empty_file", "the file is empty")
    image_format = sniff_format(head)
    if image_format is None:
        accepted = ", ".join(fmt.value for fmt in ImageFormat)
        raise ImageRefused(
            415, "unsupported_format", f"the file is not an image Darkroom accepts ({accepted})"
        )
    try:
        header = read_header(str(path), image_format, max_pages=settings.max_pages)
    except TooManyPages as exc:
        raise ImageRefused(422, "too_many_pages", exc.message) from None
    except UnreadableImage as exc:
        raise ImageRefused(
            422, "unreadable_image", f"the {image_format.value} file cannot be read: {exc}"
        ) from None
    if header.pixels > settings.max_pixels:
        raise ImageRefused(
            422,
            "image_too_large",
            f"{header.width}x{header.height}"
            + (f"x{header.pages} pages" if header.pages > 1 else "")
            + f" is {header.pixels:,} pixels; the limit is {settings.max_pixels:,}",
        )
    return InputInfo(
        format=header.format.value,
        width=header.width,
        height=header.height,
        pages=header.pages,
        bytes=size,
        filename=filename or None,
    )


def inspect_stored(path: Path, filename: str | None, settings: Settings) -> InputInfo:
    """inspect_image of a file already stored whole (its head read back). Blocking: run it in a thread."""
    with path.open("rb") as stored:
        head = stored.read(HEAD_BYTES)
    return inspect_image(path, head, path.stat().st_size, filename, settings)
