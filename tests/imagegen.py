"""Test images made on the fly with pyvips, so tests need no binary fixtures and no corpus.

Every generator draws the same picture: a grey-blue gradient (red grows left to right, green top to
bottom) with a red block in the top-left corner. It looks different under each of the eight EXIF
orientations, so a test can tell whether an image came out upright. Files carry no metadata unless a
generator says otherwise.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable

import pillow_heif
import pyvips
from PIL import Image as PillowImage

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOCK_RGB = (220, 30, 30)
# The libvips loader that decodes each output format from memory: how a test tells what a file really is.
LOADER_OF_FORMAT = {
    "jpeg": "jpegload_buffer",
    "png": "pngload_buffer",
    "webp": "webpload_buffer",
    "avif": "heifload_buffer",
    "tiff": "tiffload_buffer",
    "gif": "gifload_buffer",
}

# EXIF orientation n tells a viewer how to turn the stored pixels upright; storing the picture put through
# the inverse of that turn makes every orientation display the same upright picture.
_STORED_FOR_ORIENTATION: dict[int, Callable[[pyvips.Image], pyvips.Image]] = {
    1: lambda image: image,
    2: lambda image: image.fliphor(),
    3: lambda image: image.rot180(),
    4: lambda image: image.flipver(),
    5: lambda image: image.rot90().fliphor(),
    6: lambda image: image.rot270(),
    7: lambda image: image.rot90().flipver(),
    8: lambda image: image.rot90(),
}


def picture(width: int = 64, height: int = 48) -> pyvips.Image:
    """The upright picture every generator encodes: 3-band 8-bit sRGB."""
    coordinates = pyvips.Image.xyz(width, height)
    x, y = coordinates[0], coordinates[1]
    gradient = (70 + x * (100 / width)).bandjoin([90 + y * (100 / height), 170 + x * 0])
    in_block = (x < max(width // 4, 1)) & (y < max(height // 4, 1))
    return in_block.ifthenelse(list(BLOCK_RGB), gradient).cast("uchar").copy(interpretation="srgb")


def jpeg(
    width: int = 64,
    height: int = 48,
    *,
    quality: int = 90,
    progressive: bool = False,
    orientation: int | None = None,
) -> bytes:
    """A JPEG that displays as `width` x `height`. With an orientation the stored pixels are turned to
    match it (so orientations 5 to 8 store `height` x `width`) and EXIF carries the tag."""
    upright = picture(width, height)
    if orientation is None:
        return bytes(upright.write_to_buffer(".jpg", Q=quality, interlace=progressive, keep="none"))
    if orientation not in _STORED_FOR_ORIENTATION:
        raise ValueError(f"EXIF orientation is 1 to 8, not {orientation}")
    stored = _STORED_FOR_ORIENTATION[orientation](upright).copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return bytes(stored.write_to_buffer(".jpg", Q=quality, interlace=progressive, keep="exif"))


def png(
    width: int = 64,
    height: int = 48,
    *,
    alpha: bool = False,
    sixteen_bit: bool = False,
    palette: bool = False,
) -> bytes:
    """An RGB PNG; with `alpha` the bottom-right quarter is fully transparent."""
    if palette and sixteen_bit:
        raise ValueError("PNG palettes hold 8-bit colours only")
    image = picture(width, height)
    if alpha:
        coordinates = pyvips.Image.xyz(width, height)
        transparent = (coordinates[0] >= width // 2) & (coordinates[1] >= height // 2)
        image = image.bandjoin(transparent.ifthenelse(0, 255).cast("uchar"))
    if sixteen_bit:
        image = image.colourspace("rgb16")
    return bytes(image.write_to_buffer(".png", palette=palette, keep="none"))


def cmyk_jpeg(width: int = 64, height: int = 48, *, quality: int = 90) -> bytes:
    """A 4-channel CMYK JPEG with its CMYK ICC profile, as print-ready files come."""
    cmyk = picture(width, height).colourspace("cmyk")
    return bytes(cmyk.write_to_buffer(".jpg", Q=quality, keep="icc"))


def webp(width: int = 64, height: int = 48, *, lossless: bool = False, pages: int = 1) -> bytes:
    """A WebP; with `pages` > 1 an animation of that many frames."""
    return bytes(_frames(width, height, pages).write_to_buffer(".webp", lossless=lossless, keep="none"))


def gif(width: int = 64, height: int = 48, *, pages: int = 1) -> bytes:
    """A GIF; with `pages` > 1 an animation of that many frames."""
    return bytes(_frames(width, height, pages).write_to_buffer(".gif", keep="none"))


def tiff(width: int = 64, height: int = 48, *, pages: int = 1, bigtiff: bool = False) -> bytes:
    """A TIFF; with `pages` > 1 a multi-page TIFF; with `bigtiff` in the 64-bit BigTIFF layout."""
    return bytes(_frames(width, height, pages).write_to_buffer(".tif", keep="none", bigtiff=bigtiff))


def flat_lossless_webp(width: int, height: int) -> bytes:
    """One colour, losslessly: a few kilobytes that decode to width x height pixels."""
    flat = pyvips.Image.black(width, height, bands=3).linear(1, [30, 60, 90]).cast("uchar")
    return bytes(flat.copy(interpretation="srgb").write_to_buffer(".webp", lossless=True, keep="none"))


def many_page_tiff(pages: int) -> bytes:
    """A little-endian TIFF of `pages` 1x1 grey pages, each directory as small as libtiff reads (66 bytes),
    so a few megabytes hold a hundred thousand pages."""
    # ImageWidth, ImageLength, PhotometricInterpretation (SHORT 1); StripOffsets, StripByteCounts (LONG).
    directory = struct.pack("<H", 5) + b"".join(
        [
            struct.pack("<HHIHH", 256, 3, 1, 1, 0),
            struct.pack("<HHIHH", 257, 3, 1, 1, 0),
            struct.pack("<HHIHH", 262, 3, 1, 1, 0),
            struct.pack("<HHII", 273, 4, 1, 8),  # the one pixel, right after the header
            struct.pack("<HHII", 279, 4, 1, 1),
        ]
    )
    first = 16
    step = len(directory) + 4
    chain = b"".join(
        directory + struct.pack("<I", first + (page + 1) * step if page + 1 < pages else 0)
        for page in range(pages)
    )
    return b"II*\x00" + struct.pack("<I", first) + b"\x80" + bytes(7) + chain


@functools.cache
def can_save_avif() -> bool:
    """Whether this libvips build has an AV1 encoder (pyvips-binary's libheif has one, not HEVC)."""
    try:
        pyvips.Image.black(8, 8).write_to_buffer(".avif")
    except pyvips.Error:
        return False
    return True


def avif(width: int = 64, height: int = 48) -> bytes:
    return bytes(picture(width, height).write_to_buffer(".avif", keep="none"))


_EXIF_ORIENTATION_TAG = 0x0112


def heic(
    width: int = 64,
    height: int = 48,
    *,
    orientation: int | None = None,
    alpha: bool = False,
    ten_bit: bool = False,
    display_p3: bool = False,
    frames_before: int = 0,
    tile_size: int = 0,
) -> bytes:
    """An HEVC-coded HEIC (pillow-heif's x265, 4:4:4) that displays as `width` x `height`.

    With an orientation it is written as an iPhone writes it: the stored pixels turned, and both the
    HEIF transform (irot/imir) and the EXIF tag saying so. `display_p3` stores the picture's colours in
    Display P3 with that ICC profile; `alpha` adds a left-to-right alpha ramp; `ten_bit` codes 10 bits a
    sample. `frames_before` puts that many other (black, half-size) pictures first, this one primary,
    as in a burst. A `tile_size` makes it a grid of tiles that size, as iPhones write theirs (512 px)."""
    upright = picture(width, height)
    if display_p3:
        upright = upright.icc_transform("p3")
    if alpha:
        upright = upright.bandjoin((pyvips.Image.xyz(width, height)[0] * (255 / width)).cast("uchar"))
    stored = _STORED_FOR_ORIENTATION[orientation or 1](upright)
    mode = "RGBA" if alpha else "RGB"
    if ten_bit:
        stored, mode = (stored.cast("ushort") * 257).cast("ushort"), f"{mode};16"
    container = pillow_heif.HeifFile()
    for _ in range(frames_before):
        container.add_frombytes("RGB", (width // 2, height // 2), bytes(width // 2 * (height // 2) * 3))
    container.add_frombytes(mode, (stored.width, stored.height), stored.write_to_memory())
    extra: dict[str, bytes] = {}
    if orientation is not None:
        exif = PillowImage.Exif()
        exif[_EXIF_ORIENTATION_TAG] = orientation
        extra["exif"] = exif.tobytes()
    if display_p3:
        extra["icc_profile"] = upright.get("icc-profile-data")
    output = io.BytesIO()
    container.save(output, quality=90, chroma=444, primary_index=frames_before, tile_size=tile_size, **extra)
    return output.getvalue()


def truncated_jpeg(width: int = 64, height: int = 48) -> bytes:
    """A baseline JPEG cut halfway through its scan data: the header reads, decoding fails."""
    whole = jpeg(width, height)
    scan_start = _jpeg_scan_data_start(whole)
    return whole[: (scan_start + len(whole)) // 2]


def _jpeg_scan_data_start(data: bytes) -> int:
    offset = 2  # past SOI
    while True:
        marker = data[offset + 1]
        segment_length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if marker == 0xDA:  # start of scan
            return offset + 2 + segment_length
        offset += 2 + segment_length


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny 8-bit greyscale PNG whose IHDR claims `width` x `height`; its IDAT holds one empty row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def text_as_jpeg() -> bytes:
    """Plain text, as uploaded under a .jpg name with an image/jpeg content type."""
    return b"This is a text file, not a JPEG, whatever its name says.\n"


def _frames(width: int, height: int, pages: int) -> pyvips.Image:
    upright = picture(width, height)
    if pages == 1:
        return upright
    # Each frame a little darker than the last, so no encoder can merge frames as duplicates.
    frames = [upright.linear(1, -8 * page).cast("uchar") for page in range(pages)]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", height)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * pages)
    return strip
