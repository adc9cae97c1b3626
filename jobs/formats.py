"""Which image format an upload is, decided from its bytes, and what its header declares.

The format comes from magic bytes, never from the file name or the client's content type, and the loader
libvips then picks must agree with it: a file that sniffs as one format but decodes as another is refused.
"""

from __future__ import annotations

import enum
import io
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO

import pyvips

from jobs.vips_errors import describe_vips_error


class ImageFormat(enum.StrEnum):
    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    GIF = "gif"
    TIFF = "tiff"
    AVIF = "avif"
    HEIF = "heif"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

_LOADERS: dict[ImageFormat, frozenset[str]] = {
    # uhdrload takes JPEGs that carry an UltraHDR gain map.
    ImageFormat.JPEG: frozenset({"jpegload", "uhdrload"}),
    ImageFormat.PNG: frozenset({"pngload"}),
    ImageFormat.WEBP: frozenset({"webpload"}),
    ImageFormat.GIF: frozenset({"gifload"}),
    ImageFormat.TIFF: frozenset({"tiffload"}),
    ImageFormat.AVIF: frozenset({"heifload"}),
    ImageFormat.HEIF: frozenset({"heifload"}),
}

# libvips has one process-wide error buffer, and loads that succeed can leave lines in it: libheif and
# libtiff log "<path>: bad seek to N" while probing. Clearing it before each load, one load at a time,
# keeps another file's lines (and path) out of this file's message. Header reads take about a millisecond.
_error_buffer_lock = threading.Lock()


def sniff_format(head: bytes) -> ImageFormat | None:
    """The format the first bytes of a file announce (callers pass 64), or None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if head.startswith(_PNG_SIGNATURE):
        return ImageFormat.PNG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return ImageFormat.GIF
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return ImageFormat.WEBP
    if head.startswith(_TIFF_SIGNATURES):
        return ImageFormat.TIFF
    if head[4:8] == b"ftyp":
        return _iso_bmff_format(head)
    return None


def _iso_bmff_format(head: bytes) -> ImageFormat | None:
    box_size = int.from_bytes(head[:4], "big")
    # Sizes 0 ("to end of file") and 1 (64-bit size follows) are legal for boxes but never used by ftyp.
    if box_size < 16:
        return None
    box = head[:box_size]
    major_brand = box[8:12]
    compatible_brands = {box[offset : offset + 4] for offset in range(16, len(box) - 3, 4)}
    brands = compatible_brands | {major_brand}
    if brands & _AVIF_BRANDS:
        return ImageFormat.AVIF
    if brands & _HEIF_BRANDS:
        return ImageFormat.HEIF
    return None


@dataclass(frozen=True)
class ImageHeader:
    format: ImageFormat
    width: int
    height: int
    pages: int

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.pages


class UnreadableImage(Exception):
    """libvips cannot read the file as the format its bytes announce; the message is safe to show users."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyPages(Exception):
    """The file holds more pages (or frames) than the caller takes; the message is safe to show users."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def read_header(path: str, fmt: ImageFormat, *, max_pages: int | None = None) -> ImageHeader:
    """Read only the header of the file at `path`, which sniffed as `fmt`. Blocking: run it in a thread.

    Declared sizes are not checked here: a few kilobytes can declare gigapixels, so callers compare
    `pixels` with their limit before decoding anything. More than `max_pages` pages raises TooManyPages;
    a TIFF's are counted before libvips sees the file, because libvips reads every page's directory to
    count them (a 2 MB file can hold 30,000, and 120,000 take libvips 2.7 s).
    """
    if fmt is ImageFormat.TIFF and max_pages is not None:
        with open(path, "rb") as file:
            pages = count_tiff_pages(file, max_pages + 1)
        if pages > max_pages:
            raise TooManyPages(f"the file has more than {max_pages:,} pages; the limit is {max_pages:,}")
    with _error_buffer_lock:
        pyvips.vips_lib.vips_error_clear()
        try:
            # revalidate: libvips caches some loads (webpload, uhdrload) by file name, so a reused path
            # would otherwise get the previous file's header.
            image = pyvips.Image.new_from_file(path, access="sequential", fail_on="error", revalidate=True)
        except pyvips.Error as exc:
            raise UnreadableImage(describe_vips_error(exc, "not a readable image")) from exc
    loader = str(image.get("vips-loader"))
    if loader not in _LOADERS[fmt]:
        raise UnreadableImage(f"the file starts like {fmt} but libvips reads it with {loader}")
    pages = int(image.get("n-pages")) if "n-pages" in image.get_fields() else 1
    if max_pages is not None and pages > max_pages:
        raise TooManyPages(f"the file has {pages:,} pages; the limit is {max_pages:,}")
    return ImageHeader(format=fmt, width=int(image.width), height=int(image.height), pages=pages)


def count_tiff_pages(file: BinaryIO, limit: int) -> int:
    """The pages of a TIFF (its chain of image file directories), counted up to `limit`.

    Reads 8 to 16 bytes per page. A chain that runs off the file ends there (libvips then says what is
    wrong); one that loops back raises UnreadableImage, as libtiff would refuse it.
    """
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    head = file.read(16)
    order = "<" if head[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", head[2:4])
    big = version == 43
    # Classic TIFF: 2-byte entry count, 12-byte entries, 4-byte offsets; BigTIFF: 8, 20 and 8.
    count_format, entry_size, offset_format = ("Q", 20, "Q") if big else ("H", 12, "I")
    count_size, offset_size = struct.calcsize(count_format), struct.calcsize(offset_format)
    (offset,) = struct.unpack(order + offset_format, head[8:16] if big else head[4:8])
    seen: set[int] = set()
    while offset and len(seen) < limit:
        if offset in seen:
            raise UnreadableImage(f"its page directories loop back after {len(seen):,} pages")
        seen.add(offset)
        # Offsets are checked against the size first: seeking to a BigTIFF's 2**64 - 1 raises.
        if offset + count_size > size:
            break
        file.seek(offset)
        (entries,) = struct.unpack(order + count_format, file.read(count_size))
        next_at = offset + count_size + entries * entry_size
        if next_at + offset_size > size:
            break
        file.seek(next_at)
        (offset,) = struct.unpack(order + offset_format, file.read(offset_size))
    return len(seen)
