"""Run a validated operation chain on one image file with libvips. Blocking: call it from a thread.

The file is opened for sequential access and a leading resize shrinks on load, so a 24 MP JPEG never
exists decoded at full size. Output is always 8-bit sRGB with metadata stripped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyvips

from jobs.operations import (
    CATALOGUE,
    ConvertParams,
    Operation,
    ResizeParams,
    finish_resize,
    output_options,
    thumbnail_args,
)
from jobs.vips_errors import describe_vips_error

# Truncated or corrupt data is an error, not a grey half-picture.
FAIL_ON = "error"


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


class ProcessingError(Exception):
    """The image cannot be processed; `code` is the stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RenderedImage:
    path: Path
    format: str
    width: int
    height: int
    bytes: int


class KillSwitch:
    """Lets another thread abort a running libvips evaluation (the job's wall-clock limit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._image: pyvips.Image | None = None
        self.fired = False

    def arm(self, image: pyvips.Image) -> None:
        with self._lock:
            self._image = image
            if self.fired:
                image.set_kill(True)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._image is not None:
                self._image.set_kill(True)

    def disarm(self) -> None:
        """The render is over: let go of its image (a later `fire` has nothing left to stop)."""
        with self._lock:
            self._image = None


def configure_libvips() -> None:
    """Process-wide libvips set-up, once at start-up of the web and worker processes."""
    # pyvips routes libvips' log through a Python callback. A warning raised while that callback runs
    # (a garbage-collected TIFF loader reporting "read gave 100 warnings") is a recursive g_log, which
    # GLib treats as fatal: the process aborts. libvips' own stderr logging has no such re-entry.
    pyvips._remove_log_handler()
    # Every job reads a different file: the operation cache would only hold memory.
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)


def default_output_format(input_format: str) -> str:
    return input_format if input_format in SAVERS else "jpeg"


def render(
    source: Path,
    destination_stem: Path,
    chain: Sequence[Operation],
    input_format: str,
    kill_switch: KillSwitch | None = None,
) -> RenderedImage:
    """Process `source` into `destination_stem` + the output format's suffix."""
    convert = output_options(chain)
    output_format = convert.format if convert else default_output_format(input_format)
    saver = SAVERS[output_format]
    destination = destination_stem.with_suffix(saver.suffix)
    try:
        width, height = _render_to(source, destination, chain, saver, output_format, convert, kill_switch)
    except pyvips.Error as exc:
        # Some savers (tiffsave) leave what they wrote before the error; nobody would clean it up.
        destination.unlink(missing_ok=True)
        if kill_switch is not None and kill_switch.fired:
            failure = ProcessingError("timeout", "processing took longer than the job time limit")
        else:
            failure = ProcessingError(_error_code(exc), describe_vips_error(exc))
    else:
        return RenderedImage(destination, output_format, width, height, destination.stat().st_size)
    finally:
        if kill_switch is not None:
            kill_switch.disarm()
    # Raised outside the handler, so the failure carries neither the libvips error nor its traceback,
    # whose frames hold the images: those are freed here and now, not by a garbage collection that
    # may run later in any thread (even inside a libvips callback) while the file stays open.
    raise failure


def _render_to(
    source: Path,
    destination: Path,
    chain: Sequence[Operation],
    saver: Saver,
    output_format: str,
    convert: ConvertParams | None,
    kill_switch: KillSwitch | None,
) -> tuple[int, int]:
    image, remaining = _load(source, chain)
    for operation in remaining:
        apply = CATALOGUE[operation.type].apply
        if apply is not None:
            image = apply(image, operation.params)
    image = _prepare_for_save(image, saver)
    if kill_switch is not None:
        kill_switch.arm(image)
    getattr(image, saver.operation)(str(destination), **_save_options(output_format, saver, convert))
    return image.width, image.height


def _load(source: Path, chain: Sequence[Operation]) -> tuple[pyvips.Image, Sequence[Operation]]:
    first = chain[0] if chain else None
    if first is not None and isinstance(first.params, ResizeParams):
        args = thumbnail_args(lambda: _upright_size(source), first.params)
        options: dict[str, Any] = {"height": args.height, "size": args.size, "fail_on": FAIL_ON}
        if args.crop is not None:
            options["crop"] = args.crop
        image = pyvips.Image.thumbnail(str(source), args.width, **options)
        return finish_resize(_to_srgb(image), first.params), chain[1:]
    image = pyvips.Image.new_from_file(str(source), access="sequential", fail_on=FAIL_ON)
    return _to_srgb(image.autorot()), chain


def _upright_size(source: Path) -> tuple[int, int]:
    image = pyvips.Image.new_from_file(str(source), access="sequential", fail_on=FAIL_ON)
    orientation = image.get("orientation") if image.get_typeof("orientation") else 1
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    if image.get_typeof("icc-profile-data"):
        try:
            image = image.icc_transform("srgb", embedded=True, intent="perceptual")
        except pyvips.Error:
            # A broken embedded profile should not sink the photo; the generic conversion is close.
            image = image.colourspace("srgb")
    elif image.interpretation in ("b-w", "grey16"):
        image = image.colourspace("b-w")
    elif image.interpretation != "srgb" or image.format != "uchar":
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def _prepare_for_save(image: pyvips.Image, saver: Saver) -> pyvips.Image:
    if image.hasalpha() and not saver.has_alpha:
        image = image.flatten(background=[255] * (image.bands - 1))
    return image


def _save_options(output_format: str, saver: Saver, convert: ConvertParams | None) -> dict[str, Any]:
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


def _error_code(exc: pyvips.Error) -> str:
    text = f"{exc.message} {exc.detail}".lower()
    if "not a known file format" in text or "compression format has not been built in" in text:
        return "unsupported_format"
    if "security limit" in text or "out of memory" in text:
        return "image_too_large"
    return "corrupt_image"
