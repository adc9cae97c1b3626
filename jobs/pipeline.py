"""Run a validated operation chain on one image file with libvips. Blocking: call it from a thread.

The file is a path, or its bytes when the worker holds them (an original fetched from S3 that fits a
part: writing it to scratch only for libvips to read it back cost CPU). It is opened for sequential
access and a leading resize shrinks on load, so a 24 MP JPEG never exists decoded at full size.
Operations see sRGB (or greyscale) pixels, 8-bit unless 16-bit output was asked for and the source has
16 bits; `jobs.ops.encode` decides what metadata the file keeps.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyvips

from jobs import heic
from jobs.formats import ImageFormat
from jobs.operations import Operation, Plan, plan
from jobs.ops import encode
from jobs.ops.base import ProcessingError, Stage
from jobs.ops.geometry import (
    ResizeParams,
    exif_orientation,
    finish_resize,
    reads_out_of_order,
    thumbnail_args,
)
from jobs.storage import StorageFull, is_full
from jobs.vips_errors import describe_vips_error, reports_storage_full

# Truncated or corrupt data is an error, not a grey half-picture.
FAIL_ON = "error"
# An image file: its path, or its bytes.
Source = Path | bytes
# Frames of an animation processed at most (each is a full picture in the strip libvips makes).
MAX_FRAMES = 300


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
    _limit_malloc_arenas()


# glibc gives each thread that allocates its own malloc arena, and libvips' worker threads churn through
# pixel buffers: the arenas keep freed memory mapped, so RSS climbs with the thread count. Two arenas
# are what libvips' and sharp's docs recommend for servers (as MALLOC_ARENA_MAX=2).
_MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def _limit_malloc_arenas() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, _MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to tune


def render(
    source: Source,
    destination_stem: Path,
    chain: Sequence[Operation],
    input_format: str,
    kill_switch: KillSwitch | None = None,
    *,
    max_pixels: int | None = None,
    max_memory: int | None = None,
) -> RenderedImage:
    """Process `source` into `destination_stem` + the output format's suffix. Raises ProcessingError
    for what is wrong with the image or chain, StorageFull when there is no room to write the result.

    `max_pixels` caps the result as the upload check caps the input, so an `upscale` or a big
    `resize` with `enlarge` fails cleanly instead of writing a gigapixel file. `max_memory` caps, in
    bytes, a picture the chain must decode whole (see `_check_held_bytes`)."""
    steps = plan(chain)
    output_format = encode.output_format_for(input_format, steps.convert)
    destination = destination_stem.with_suffix(encode.SAVERS[output_format].suffix)
    failure: ProcessingError | StorageFull | None
    try:
        width, height = _render_to(
            source, input_format, destination, steps, output_format, kill_switch, max_pixels, max_memory
        )
        failure = None
    except ProcessingError as exc:
        destination.unlink(missing_ok=True)
        failure = ProcessingError(exc.code, exc.message)  # without the traceback that holds the images
    except pyvips.Error as exc:
        # Some savers (tiffsave) leave what they wrote before the error; nobody would clean it up.
        destination.unlink(missing_ok=True)
        if kill_switch is not None and kill_switch.fired:
            failure = ProcessingError("timeout", "processing took longer than the job time limit")
        elif reports_storage_full(exc):
            failure = StorageFull("no space left on the storage for the result")
        else:
            failure = ProcessingError(_error_code(exc), describe_vips_error(exc))
    except OSError as exc:  # a size-capped encode is written by Python
        destination.unlink(missing_ok=True)
        if not is_full(exc):
            raise
        failure = StorageFull("no space left on the storage for the result")
    finally:
        if kill_switch is not None:
            kill_switch.disarm()
    if failure is None:
        return RenderedImage(destination, output_format, width, height, destination.stat().st_size)
    # Raised outside the handler, so the failure carries neither the libvips error nor its traceback,
    # whose frames hold the images: those are freed here and now, not by a garbage collection that
    # may run later in any thread (even inside a libvips callback) while the file stays open.
    raise failure


def _render_to(
    source: Source,
    input_format: str,
    destination: Path,
    steps: Plan,
    output_format: str,
    kill_switch: KillSwitch | None,
    max_pixels: int | None,
    max_memory: int | None,
) -> tuple[int, int]:
    """Build and save; the result's size. The images live in this frame only, so they are gone once it
    returns or raises."""
    watch = kill_switch.arm if kill_switch is not None else _unwatched
    image = _build(source, input_format, steps, output_format, max_pixels, max_memory, watch)
    watch(image)
    encode.save(image, destination, output_format, steps.convert, watch=watch)
    return image.width, image.height


def _unwatched(image: pyvips.Image) -> None:
    pass


def _check_size(image: pyvips.Image, max_pixels: int | None) -> None:
    width, height = image.width, image.height
    if max_pixels is not None and width * height > max_pixels:
        raise ProcessingError(
            "image_too_large",
            f"the result would be {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
        )


def _build(
    source: Source,
    input_format: str,
    steps: Plan,
    output_format: str,
    max_pixels: int | None,
    max_memory: int | None,
    watch: Callable[[pyvips.Image], None],
) -> pyvips.Image:
    """The lazy libvips graph of the whole chain: nothing is decoded until the save pulls pixels, except
    by steps that hold or measure their input first (enhance, out-of-order reads). `watch` is handed
    each image such a step may render, so a kill switch can stop that pass too."""
    image, remaining = _load(source, input_format, steps, max_pixels, max_memory, watch)
    _check_size(image, max_pixels)
    previous_stage = None
    for operation in remaining:
        apply = operation.kind.apply
        assert apply is not None  # plan() keeps only pixel operations in steps
        watch(image)
        if operation.kind.stage == previous_stage == Stage.AREA:
            # Each area filter asks its input for a margin around every tile, and nothing between two
            # of them keeps what was computed: stacked, the work and memory grow exponentially (two
            # blurs of sigma 100 on 8 MP took 5 s, three took 12 s). Held in memory, each runs once.
            image = image.copy_memory()
        previous_stage = operation.kind.stage
        image = apply(image, operation.params)
        # After every step, before the next can read an oversized picture's pixels.
        _check_size(image, max_pixels)
    return encode.prepare_for_save(image, output_format, steps.convert)


def _load(
    source: Source,
    input_format: str,
    steps: Plan,
    max_pixels: int | None,
    max_memory: int | None,
    watch: Callable[[pyvips.Image], None],
) -> tuple[pyvips.Image, Sequence[Operation]]:
    if input_format == ImageFormat.HEIF:
        header = _open(source, access="sequential", fail_on=FAIL_ON)
        if heic.is_hevc(header):
            return _load_hevc(source, header, steps, max_pixels, max_memory)
    # Every frame, as one strip of pages, or the first frame only (libvips' default). A still picture
    # asked for animated output is its one frame: the loaders of formats without pages (JPEG, PNG)
    # refuse the option that asks for every page.
    animated = steps.convert is not None and bool(steps.convert.animated) and _has_pages(source)
    params = _leading_shrink(steps)
    if params is not None:
        args = thumbnail_args(lambda: _stored_size(source, upright=steps.auto_orient), params)
        options: dict[str, Any] = {
            "height": args.height,
            "size": args.size,
            "fail_on": FAIL_ON,
            "no_rotate": not steps.auto_orient,
        }
        if args.crop is not None:
            options["crop"] = args.crop
        if animated or isinstance(source, bytes):
            # Loader options ride in a file name only as "[n=-1]", which any bracket in the path
            # would garble; a source takes them apart. A source's loader takes `fail_on` from them
            # only: as thumbnail's keyword it holds for files, and a truncated photo would pass.
            loaded = pyvips.Image.thumbnail_source(
                _vips_source(source),
                args.width,
                option_string=f"fail_on={FAIL_ON}" + (",n=-1" if animated else ""),
                **options,
            )
        else:
            loaded = pyvips.Image.thumbnail(str(source), args.width, **options)
        thumbnail = _frames_capped(loaded)
        image = finish_resize(_to_srgb(thumbnail, steps), params)
        rest = steps.steps[1:]
        if any(reads_out_of_order(operation.params) for operation in rest):
            # thumbnail streams from a sequential load, which cannot serve rows out of order: hold its
            # result, small by now, in memory (as libvips' thumbnail does before its own turns).
            watch(image)
            image = image.copy_memory()
        return image, rest
    pages: dict[str, Any] = {"n": -1} if animated else {}
    image = _frames_capped(_open(source, access="sequential", fail_on=FAIL_ON, **pages))
    upright_turn = steps.auto_orient and exif_orientation(image) != 1
    if upright_turn or any(reads_out_of_order(operation.params) for operation in steps.steps):
        # A sequential (streaming) load cannot serve rows out of order, as turns, vertical flips and
        # smart crops read them: a random-access load decodes the picture whole, when it is first read.
        _check_held_bytes(image, max_memory)
        image = _open(source, access="random", fail_on=FAIL_ON, **pages)
    if steps.auto_orient:
        image = image.autorot()
    return _to_srgb(image, steps), steps.steps


def _sixteen_bit(steps: Plan) -> bool:
    return steps.convert is not None and steps.convert.bit_depth == 16


def _leading_shrink(steps: Plan) -> ResizeParams | None:
    """The chain's first step when it is a resize libvips' thumbnail can do, shrinking on load.
    thumbnail always makes 8 bits: a 16-bit result resizes the decoded pixels instead."""
    first = steps.steps[0] if steps.steps else None
    if first is None or not isinstance(first.params, ResizeParams) or _sixteen_bit(steps):
        return None
    return first.params if first.params.shrinks_on_load else None


def _load_hevc(
    source: Source,
    header: pyvips.Image,
    steps: Plan,
    max_pixels: int | None,
    max_memory: int | None,
) -> tuple[pyvips.Image, Sequence[Operation]]:
    """An HEVC-coded HEIF, which libvips cannot decode: weighed against the limits from its header, then
    decoded whole (the decoder cannot stream) and upright, so orientation is never applied again here.
    Its primary picture only: never animated."""
    pixels = header.width * header.height
    if max_pixels is not None and pixels > max_pixels:
        raise ProcessingError(
            "image_too_large",
            f"the picture is {header.width}x{header.height} = {pixels:,} pixels; the limit is {max_pixels:,}",
        )
    sixteen_bit = _sixteen_bit(steps)
    held = heic.decoded_bytes(header, sixteen_bit=sixteen_bit)
    if max_memory is not None and held > max_memory:
        mib = 1024 * 1024
        raise ProcessingError(
            "image_too_large",
            f"decoding this {header.width}x{header.height} HEIC needs it whole in memory, about"
            f" {held // mib:,} MB; the limit is {max_memory // mib:,} MB",
        )
    image = heic.decode(source, sixteen_bit=sixteen_bit)
    params = _leading_shrink(steps)
    if params is None:
        return _to_srgb(image, steps), steps.steps
    # Resized before its colours are converted, as a thumbnail load is: converting an 8.5 MP iPhone
    # photo from Display P3 took 0.3 s, its 512 px thumbnail 5 ms.
    args = thumbnail_args(lambda: (image.width, image.height), params)
    options: dict[str, Any] = {"height": args.height, "size": args.size}
    if args.crop is not None:
        options["crop"] = args.crop
    thumbnail = image.thumbnail_image(args.width, **options)
    return finish_resize(_to_srgb(thumbnail, steps), params), steps.steps[1:]


# Bytes per sample of each libvips band format.
_SAMPLE_BYTES = {
    "uchar": 1, "char": 1, "ushort": 2, "short": 2, "uint": 4, "int": 4,
    "float": 4, "double": 8, "complex": 8, "dpcomplex": 16,
}  # fmt: skip
# libwebp decodes a whole picture into its own RGBA buffer, which libvips then copies: four bytes a pixel
# more than the copy (four 4 KB lossless WebPs of 100 MP, turned, took a worker to 2.9 GB).
_WEBP_DECODER_BYTES_PER_PIXEL = 4


def _check_held_bytes(image: pyvips.Image, max_memory: int | None) -> None:
    """Refuse, from the header of `image` (a sequential load, nothing decoded), a picture whose whole
    decoded copy would take more than `max_memory` bytes."""
    pixels = image.width * image.height
    held = pixels * image.bands * _SAMPLE_BYTES[image.format]
    if image.get("vips-loader") == "webpload":
        held += pixels * _WEBP_DECODER_BYTES_PER_PIXEL
    if max_memory is not None and held > max_memory:
        mib = 1024 * 1024
        raise ProcessingError(
            "image_too_large",
            f"turning, flipping or smart-cropping this {image.width}x{image.height} picture needs it whole"
            f" in memory, about {held // mib:,} MB; the limit is {max_memory // mib:,} MB"
            " (resize first: a leading resize shrinks it while decoding)",
        )


def _frames_capped(image: pyvips.Image) -> pyvips.Image:
    """An animation loaded whole is a strip of frames, one page-height each: at most MAX_FRAMES."""
    if image.get_typeof("page-height"):
        frames = image.height // max(image.get("page-height"), 1)
        if frames > MAX_FRAMES:
            raise ProcessingError(
                "too_many_frames", f"the animation has {frames} frames; at most {MAX_FRAMES}"
            )
    return image


def _open(source: Source, **options: Any) -> pyvips.Image:
    if isinstance(source, bytes):
        return pyvips.Image.new_from_buffer(source, "", **options)
    return pyvips.Image.new_from_file(str(source), **options)


def _vips_source(source: Source) -> pyvips.Source:
    if isinstance(source, bytes):
        return pyvips.Source.new_from_memory(source)
    return pyvips.Source.new_from_file(str(source))


def _has_pages(source: Source) -> bool:
    header = _open(source, access="sequential", fail_on=FAIL_ON)
    return bool(header.get_typeof("n-pages")) and header.get("n-pages") > 1


def _stored_size(source: Source, *, upright: bool) -> tuple[int, int]:
    image = _open(source, access="sequential", fail_on=FAIL_ON)
    orientation = exif_orientation(image) if upright else 1
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def _to_srgb(image: pyvips.Image, steps: Plan) -> pyvips.Image:
    """sRGB (or greyscale), 8-bit, unless 16-bit output was asked for and the source has 16 bits."""
    deep = image.format == "ushort" and steps.convert is not None and steps.convert.bit_depth == 16
    if image.get_typeof("icc-profile-data"):
        try:
            image = image.icc_transform("srgb", embedded=True, intent="perceptual", depth=16 if deep else 8)
        except pyvips.Error:
            # A broken embedded profile should not sink the photo; the generic conversion is close.
            image = image.colourspace("srgb")
    elif image.interpretation in ("b-w", "grey16"):
        image = image.colourspace("grey16" if deep else "b-w")
    elif deep:
        image = image.colourspace("rgb16")
    elif image.interpretation != "srgb" or image.format != "uchar":
        image = image.colourspace("srgb")
    if deep:
        return image if image.format == "ushort" else image.cast("ushort")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def _error_code(exc: pyvips.Error) -> str:
    text = f"{exc.message} {exc.detail}".lower()
    # A file "is not a known file format"; bytes, a buffer or a source, are "not in a known format".
    unknown = "not a known file format" in text or "not in a known format" in text
    if unknown or "compression format has not been built in" in text:
        return "unsupported_format"
    if "security limit" in text or "out of memory" in text:
        return "image_too_large"
    return "corrupt_image"
