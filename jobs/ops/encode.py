"""Encoding: the `convert` operation and how each output format is saved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pyvips

from jobs.ops.base import OperationKind, Stage
from jobs.params import Bounds, Params

OutputFormat = Literal["jpeg", "png", "webp", "avif", "tiff", "gif"]


@dataclass(frozen=True)
class ConvertParams(Params):
    format: OutputFormat = "jpeg"
    quality: Annotated[int | None, Bounds(1, 100)] = None
    lossless: bool = False
    progressive: bool = False


@dataclass(frozen=True)
class Saver:
    operation: str
    suffix: str
    default_quality: int | None
    has_alpha: bool


SAVERS: dict[str, Saver] = {
    "jpeg": Saver("jpegsave", ".jpg", 82, has_alpha=False),
    "png": Saver("pngsave", ".png", None, has_alpha=True),
    "webp": Saver("webpsave", ".webp", 80, has_alpha=True),
    "avif": Saver("heifsave", ".avif", 55, has_alpha=True),
    "tiff": Saver("tiffsave", ".tiff", None, has_alpha=True),
    "gif": Saver("gifsave", ".gif", None, has_alpha=True),
}

MEDIA_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
    "tiff": "image/tiff",
    "gif": "image/gif",
    "heif": "image/heif",
}


def output_format_for(input_format: str, convert: ConvertParams | None) -> str:
    """Without a `convert`, a result keeps its input's format where we can write it, else JPEG."""
    if convert is not None:
        return convert.format
    return input_format if input_format in SAVERS else "jpeg"


def prepare_for_save(image: pyvips.Image, output_format: str, convert: ConvertParams | None) -> pyvips.Image:
    """What the encoder needs of the pixels: alpha flattened where the format has none."""
    if image.hasalpha() and not SAVERS[output_format].has_alpha:
        image = image.flatten(background=[255] * (image.bands - 1))
    return image


def save(image: pyvips.Image, destination: Path, output_format: str, convert: ConvertParams | None) -> None:
    """Encode `image` (from `prepare_for_save`) into `destination`; this is where libvips runs."""
    saver = SAVERS[output_format]
    getattr(image, saver.operation)(str(destination), **_save_options(output_format, convert))


def _save_options(output_format: str, convert: ConvertParams | None) -> dict[str, Any]:
    saver = SAVERS[output_format]
    options: dict[str, Any] = {"keep": pyvips.enums.ForeignKeep.NONE}
    quality = convert.quality if convert and convert.quality else saver.default_quality
    if quality is not None and output_format != "png":
        options["Q"] = quality
    progressive = bool(convert and convert.progressive)
    lossless = bool(convert and convert.lossless)
    if output_format == "jpeg":
        options.update(optimize_coding=True, interlace=progressive)
    elif output_format == "png":
        options.update(interlace=progressive, compression=6)
    elif output_format == "webp":
        options.update(lossless=lossless, effort=4)
    elif output_format == "avif":
        options.update(compression="av1", lossless=lossless, effort=2)
    return options


KINDS = (
    OperationKind(
        "convert", "Choose the output format and its encoder options.", ConvertParams, Stage.SAVE, None
    ),
)
