"""Encoding: the `convert` operation and how each output format is saved.

What `convert` means per format:

- `quality` (1-100) is the lossy quality of jpeg (default 82), webp (80) and avif (55). PNG, TIFF and GIF
  have none, so it is ignored there: PNG and TIFF are lossless, GIF's palette comes from libvips' quantiser
  (effort 7, full dithering, 256 colours).
- `lossless` switches webp and avif to their lossless modes (quality is then unused); png and tiff are
  lossless anyway. JPEG and GIF cannot be lossless, so asking is an error.
- `progressive` interlaces jpeg, png (Adam7) and gif. Like `quality`, it is a hint that webp, avif and
  tiff (which have no such mode) ignore: a partner may set it for every format. The options that promise
  something about the file (`lossless`, `max_bytes`, `bit_depth`, `keep_*`) are errors where unkeepable.
- `max_bytes` caps the file size by lowering the quality: only for the lossy jpeg, webp and avif (PNG,
  TIFF and GIF have no quality to lower, and lossless output has none either). `quality` is then the
  highest quality tried. A budget no quality meets fails the image with `max_bytes_unreachable`.
- `keep_icc` embeds the profile of the colours written, which the pipeline has made sRGB: libvips'
  built-in sRGB profile, or its sRGB-curve grey profile for greyscale output. GIF cannot carry one.
- `keep_exif` keeps the source's EXIF (camera, date, GPS, any embedded preview thumbnail) with its
  orientation rewritten from the pixels': 1 once auto-oriented. Only jpeg, png, webp and avif have EXIF
  in libvips.
- `bit_depth` 16 writes 16 bits per sample, for png and tiff only; unset or 8 writes 8 bits.

The optional fields default to None rather than False or 8 so a chain's JSON names only what was asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pyvips

from jobs.ops.base import OperationKind, ProcessingError, Stage, max_value
from jobs.params import Bounds, FieldError, Params

OutputFormat = Literal["jpeg", "png", "webp", "avif", "tiff", "gif"]

MIN_BYTE_BUDGET = 1024
MAX_BYTE_BUDGET = 50 * 1024 * 1024


@dataclass(frozen=True)
class Saver:
    """How libvips writes one format, and what the format can hold."""

    operation: str
    suffix: str
    name: str  # for people, in error messages
    # None: the format has no lossy quality, so neither `quality` nor `max_bytes` can act on it.
    default_quality: int | None
    lossless: Literal["never", "always", "optional"]
    has_alpha: bool
    has_grey: bool
    interlace: bool
    icc: bool
    exif: bool
    sixteen_bit: bool
    options: Mapping[str, Any]


SAVERS: dict[str, Saver] = {
    "jpeg": Saver(
        "jpegsave", ".jpg", "JPEG", 82, "never",
        has_alpha=False, has_grey=True, interlace=True, icc=True, exif=True, sixteen_bit=False,
        options={"optimize_coding": True},
    ),
    "png": Saver(
        "pngsave", ".png", "PNG", None, "always",
        has_alpha=True, has_grey=True, interlace=True, icc=True, exif=True, sixteen_bit=True,
        # Adaptive row filters make photos about a third smaller than libvips' default of none.
        options={"compression": 6, "filter": pyvips.enums.ForeignPngFilter.ALL},
    ),
    "webp": Saver(
        "webpsave", ".webp", "WebP", 80, "optional",
        has_alpha=True, has_grey=False, interlace=False, icc=True, exif=True, sixteen_bit=False,
        options={"effort": 4},
    ),
    "avif": Saver(
        "heifsave", ".avif", "AVIF", 55, "optional",
        has_alpha=True, has_grey=False, interlace=False, icc=True, exif=True, sixteen_bit=False,
        # Effort 2 encodes a megapixel in about 0.2 s; effort 4 takes over a second for ~7% fewer bytes.
        options={"compression": "av1", "effort": 2},
    ),
    "tiff": Saver(
        "tiffsave", ".tiff", "TIFF", None, "always",
        has_alpha=True, has_grey=True, interlace=False, icc=True, exif=False, sixteen_bit=True,
        options={"compression": "deflate", "predictor": "horizontal"},
    ),
    # libvips' quantiser defaults (effort 7, full dither): lower efforts are 5x faster but visibly
    # coarser, and GIF results are small pictures.
    "gif": Saver(
        "gifsave", ".gif", "GIF", None, "never",
        has_alpha=True, has_grey=True, interlace=True, icc=False, exif=False, sixteen_bit=False,
        options={},
    ),
}  # fmt: skip

ANIMATED_FORMATS = ("gif", "webp")

MEDIA_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
    "tiff": "image/tiff",
    "gif": "image/gif",
    "heif": "image/heic",
}


@dataclass(frozen=True)
class ConvertParams(Params):
    format: OutputFormat = "jpeg"
    quality: Annotated[int | None, Bounds(1, 100)] = None
    lossless: bool = False
    progressive: bool = False
    max_bytes: Annotated[int | None, Bounds(MIN_BYTE_BUDGET, MAX_BYTE_BUDGET)] = None
    bit_depth: Literal[8, 16] | None = None
    keep_icc: bool | None = None
    keep_exif: bool | None = None
    # Every frame of an animated GIF or WebP input, not only the first.
    animated: bool | None = None

    def problems(self) -> Iterator[FieldError]:
        saver = SAVERS[self.format]
        if self.animated and self.format not in ANIMATED_FORMATS:
            yield FieldError("animated", f"{saver.name} holds one frame; gif and webp hold animations")
        if self.lossless and saver.lossless == "never":
            yield FieldError(
                "lossless",
                f"{saver.name} cannot be lossless; {_formats_where(lambda s: s.lossless != 'never')} can",
            )
        if self.max_bytes is not None:
            lossy = _formats_where(lambda s: s.default_quality is not None)
            if saver.default_quality is None:
                yield FieldError(
                    "max_bytes", f"{saver.name} has no quality to lower; a byte budget needs {lossy}"
                )
            elif self.lossless:
                yield FieldError("max_bytes", "a byte budget lowers the lossy quality: not with lossless")
        if self.bit_depth == 16 and not saver.sixteen_bit:
            yield FieldError(
                "bit_depth",
                f"{saver.name} is written 8-bit; {_formats_where(lambda s: s.sixteen_bit)} take 16",
            )
        if self.keep_icc and not saver.icc:
            yield FieldError("keep_icc", f"{saver.name} cannot carry a colour profile")
        if self.keep_exif and not saver.exif:
            yield FieldError(
                "keep_exif", f"{saver.name} output carries no EXIF; {_formats_where(lambda s: s.exif)} do"
            )


def _formats_where(can: Callable[[Saver], bool]) -> str:
    return ", ".join(name for name, saver in SAVERS.items() if can(saver))


# Optimised Huffman tables (a few % smaller files) make libjpeg hold the whole image's coefficients in
# memory — about 4 bytes a pixel: over a gigabyte for a 280 MP scan that otherwise streams in tens of MB.
# (Progressive JPEG does the same; it is asked for explicitly.)
OPTIMIZED_JPEG_MAX_PIXELS = 16_000_000

# How a result is saved when its chain has no `convert` (its format then follows the input's).
_NO_OPTIONS = ConvertParams()


class EncodeFailed(ProcessingError):
    """The encoder could not produce what was asked (a byte budget no quality meets)."""


def output_format_for(input_format: str, convert: ConvertParams | None) -> str:
    """Without a `convert`, a result keeps its input's format where we can write it, else JPEG."""
    if convert is not None:
        return convert.format
    return input_format if input_format in SAVERS else "jpeg"


def prepare_for_save(image: pyvips.Image, output_format: str, convert: ConvertParams | None) -> pyvips.Image:
    """What the encoder needs of the pixels: the asked bit depth, alpha flattened where the format has
    none, grey made RGB where the format stores colour only."""
    saver = SAVERS[output_format]
    image = _with_depth(image, 16 if convert is not None and convert.bit_depth == 16 else 8)
    if image.hasalpha() and not saver.has_alpha:
        image = image.flatten(background=[max_value(image)] * (image.bands - 1))
    if image.bands <= 2 and not saver.has_grey:
        # libvips would do it while saving; done here, the bands say what the file holds, and so which
        # profile `keep_icc` embeds.
        image = image.colourspace("srgb")
    return image


def _with_depth(image: pyvips.Image, bits: int) -> pyvips.Image:
    """Rescale by 257 (0xff is 0xffff) so every 8-bit value keeps its exact meaning:
    `colourspace("rgb16")` goes through linear light and moves values by up to one 8-bit level."""
    if bits == 16 and image.format == "uchar":
        interpretation = "grey16" if image.bands <= 2 else "rgb16"
        return (image.cast("ushort") * 257).cast("ushort").copy(interpretation=interpretation)
    if bits == 8 and image.format == "ushort":
        interpretation = "b-w" if image.bands <= 2 else "srgb"
        return (image / 257).rint().cast("uchar").copy(interpretation=interpretation)
    return image


def save(
    image: pyvips.Image,
    destination: Path,
    output_format: str,
    convert: ConvertParams | None,
    *,
    watch: Callable[[pyvips.Image], None] | None = None,
) -> None:
    """Encode `image` (from `prepare_for_save`) into `destination`; this is where libvips runs.

    A byte budget encodes an in-memory copy of the pixels several times; `watch` (a kill switch's
    `arm`) is handed that copy, since stopping `image` no longer stops those encodes."""
    params = convert or _NO_OPTIONS
    if params.max_bytes is None:
        saver = SAVERS[output_format]
        getattr(image, saver.operation)(str(destination), **_save_options(image, output_format, params))
        return
    # Rendered once: every attempt re-encodes these pixels instead of re-running the chain from the
    # file. The copy holds width x height x bands bytes, bounded by the pipeline's max_pixels.
    pixels = image.copy_memory()
    if watch is not None:
        watch(pixels)
    destination.write_bytes(_encode_within(pixels, output_format, params, params.max_bytes))


def _encode_within(pixels: pyvips.Image, output_format: str, params: ConvertParams, budget: int) -> bytes:
    """The encoding at the highest quality that fits `budget`: the asked (or default) quality if it
    fits, else a binary search below it, so at most 8 encodes."""
    saver = SAVERS[output_format]
    highest = params.quality or saver.default_quality
    assert highest is not None  # ConvertParams.problems allows max_bytes for lossy formats only

    def encode(quality: int) -> bytes:
        options = _save_options(pixels, output_format, params, quality=quality)
        return bytes(pixels.write_to_buffer(saver.suffix, **options))

    data = encode(highest)
    if len(data) <= budget:
        return data
    smallest = (len(data), highest)
    fitting: bytes | None = None
    low, high = 0, highest - 1  # the answer lies in low..high; 0 stands for "nothing fits"
    while low < high:
        quality = (low + high + 1) // 2
        data = encode(quality)
        if len(data) <= budget:
            low, fitting = quality, data
        else:
            high = quality - 1
            smallest = min(smallest, (len(data), quality))
    if fitting is None:
        size, quality = smallest
        raise EncodeFailed(
            "max_bytes_unreachable",
            f"the smallest {saver.name} reached is {size:,} bytes (quality {quality}); "
            f"max_bytes is {budget:,}",
        )
    return fitting


def _save_options(
    image: pyvips.Image, output_format: str, params: ConvertParams, *, quality: int | None = None
) -> dict[str, Any]:
    saver = SAVERS[output_format]
    keep = pyvips.enums.ForeignKeep.EXIF if params.keep_exif else pyvips.enums.ForeignKeep.NONE
    options: dict[str, Any] = {"keep": keep, **saver.options}
    if params.keep_icc:
        # A profile named here replaces whatever the image carries, which may be the source's own when
        # its transform to sRGB failed and the pipeline fell back to a plain conversion.
        options["profile"] = "sgrey" if image.bands <= 2 else "srgb"
    if saver.lossless == "optional":
        options["lossless"] = params.lossless
    if saver.default_quality is not None and not params.lossless:
        options["Q"] = quality or params.quality or saver.default_quality
    if saver.interlace:
        options["interlace"] = params.progressive
    if output_format == "jpeg" and image.width * image.height > OPTIMIZED_JPEG_MAX_PIXELS:
        options["optimize_coding"] = False
    return options


KINDS = (
    OperationKind(
        "convert", "Choose the output format and its encoder options.", ConvertParams, Stage.SAVE, None
    ),
)
