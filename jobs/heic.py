"""HEVC-coded HEIF (the HEIC photos phones take) decoded with pillow-heif into a pyvips image.

pyvips-binary's libheif reads HEIF headers but has no HEVC decoder, so libvips cannot decode an iPhone
photo; pillow-heif ships libde265. Other HEIF codings (AV1, that is AVIF) keep going through libvips.

Only the pillow-heif functions are called: Pillow's opener registry is left alone, so nothing else in the
process starts reading HEIC by way of Pillow. Blocking: call these from the render's thread.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import pillow_heif
import pyvips

from jobs.ops.base import ProcessingError

# libheif decodes into YCbCr planes (4:2:0, up to 16 bits a sample for 10-bit files) before converting to
# the interleaved RGB it hands over: 8.5 MP of 8-bit iPhone HEIC peaked at 5.1 bytes a pixel, 3 of them
# the result. Counted on top of the result when a decode is weighed against the job's memory limit.
DECODER_BYTES_PER_PIXEL = 3


def is_hevc(header: pyvips.Image) -> bool:
    """Whether a HEIF file, as libvips read its header, is HEVC-coded (then libvips cannot decode it)."""
    return bool(header.get_typeof("heif-compression")) and header.get("heif-compression") == "hevc"


def decoded_bytes(header: pyvips.Image, *, sixteen_bit: bool) -> int:
    """What `decode` holds at its peak for the file whose libvips header this is, without decoding it."""
    deep = sixteen_bit and header.format == "ushort"
    pixels = int(header.width * header.height)
    return pixels * (int(header.bands) * (2 if deep else 1) + DECODER_BYTES_PER_PIXEL)


def decode(source: Path | bytes, *, sixteen_bit: bool) -> pyvips.Image:
    """The file's primary picture (a burst or Live Photo holds several; the primary is the photo),
    upright, with its ICC profile (iPhones: Display P3) and its EXIF attached, for the pipeline to
    convert to sRGB and strip or keep as it does a JPEG's.

    libheif applies the HEIF transforms (irot, imir) while decoding, and iPhones also write the EXIF
    orientation: that is reset to 1 here, so the picture is never turned a second time. 10- and 12-bit
    pictures come as 8 bits unless `sixteen_bit`, then as 16."""
    cut_short = _cut_short(source)
    if cut_short is not None:
        raise ProcessingError("corrupt_image", cut_short)
    try:
        heif_file = pillow_heif.open_heif(source, convert_hdr_to_8bit=not sixteen_bit)
        picture = heif_file[heif_file.primary_index]
        data = picture.data
    except (ValueError, EOFError, SyntaxError, RuntimeError, OSError) as exc:
        raise _decode_failure(exc) from None
    width, height = picture.size
    layout, _, depth = picture.mode.partition(";")
    bands = len(layout)
    deep = depth == "16"
    image = pyvips.Image.new_from_memory(data, width, height, bands, "ushort" if deep else "uchar")
    interpretation = ("grey16" if deep else "b-w") if bands <= 2 else ("rgb16" if deep else "srgb")
    image = image.copy(interpretation=interpretation)
    info = picture.info
    if info.get("icc_profile"):
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", info["icc_profile"])
    if info.get("exif"):
        pillow_heif.set_orientation(info)
        image.set_type(pyvips.GValue.blob_type, "exif-data", info["exif"])
    return image


def _cut_short(source: Path | bytes) -> str | None:
    """Why the file (or the file's bytes) is truncated, when its top-level boxes run past its end;
    else None.

    libheif refuses a truncated single picture, but fills the missing tiles of a tiled one (as iPhones
    write them: 512 px tiles) with green and reports success: half an upload would complete."""
    if isinstance(source, bytes):
        return _boxes_cut_short(io.BytesIO(source), len(source))
    with source.open("rb") as file:
        return _boxes_cut_short(file, source.stat().st_size)


def _boxes_cut_short(file: BinaryIO, size: int) -> str | None:
    offset = 0
    while offset + 8 <= size:
        file.seek(offset)
        header = file.read(16)
        box_size = int.from_bytes(header[:4], "big")
        if box_size == 1 and len(header) == 16:  # a 64-bit size follows the type
            box_size = int.from_bytes(header[8:16], "big")
        if box_size < 8:
            return None  # 0 runs to the end of the file; a smaller size is libheif's to refuse
        if offset + box_size > size:
            return f"the HEIC is cut short: its boxes need {offset + box_size:,} bytes, it has {size:,}"
        offset += box_size
    return None


def _decode_failure(exc: Exception) -> ProcessingError:
    text = str(exc) or type(exc).__name__
    if "security limit" in text.lower():
        return ProcessingError("image_too_large", f"the HEIC is too large to decode: {text}")
    return ProcessingError("corrupt_image", f"the HEIC cannot be decoded (damaged or truncated): {text}")
