"""Geometry: operations that move pixels (resize, crop, rotate…). They run first in a chain.

Every function returns the band format and interpretation it was given (8-bit or 16-bit, colour or
b-w) and keeps alpha; where pixels are resampled, colour is weighed by alpha, so transparent pixels
lend none of theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pyvips

from jobs.ops.base import (
    Colour,
    Dimension,
    OperationKind,
    ProcessingError,
    Stage,
    background_for,
    max_value,
    restore_format,
)
from jobs.ops.filters import SharpenParams, sharpen
from jobs.params import Bounds, FieldError, Params

Fit = Literal["inside", "contain", "cover", "fill", "outside"]
Kernel = Literal["nearest", "linear", "cubic", "mitchell", "lanczos2", "lanczos3"]
Strategy = Literal["attention", "entropy", "centre"]
AspectRatio = Literal["1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3"]


@dataclass(frozen=True)
class ResizeParams(Params):
    """`inside` keeps the aspect ratio within the box; `cover` fills it and crops the overflow;
    `contain` fits inside and pads to the exact box; `fill` stretches; `outside` covers without cropping.

    `kernel` is the resampling filter; unset means `lanczos3`. With `lanczos3` a leading resize shrinks
    JPEGs on load (libvips' thumbnail); the other kernels resample the decoded pixels, so `nearest`
    stays blocky and `linear` stays soft however much the picture shrinks."""

    width: Dimension = None
    height: Dimension = None
    fit: Fit = "inside"
    enlarge: bool = False
    background: Colour = "#ffffff"
    kernel: Kernel | None = None

    def problems(self) -> Any:
        if self.width is None and self.height is None:
            yield FieldError("width", "give width, height or both")

    @property
    def shrinks_on_load(self) -> bool:
        """libvips' thumbnail resamples with lanczos3 only."""
        return self.kernel in (None, "lanczos3")


# Crop coordinates: pixels, or percent of the image's width and height.
Extent = Annotated[float, Bounds(0, None)]


@dataclass(frozen=True)
class CropParams(Params):
    """Cut out the box `width` x `height` whose top-left corner is (`x`, `y`), measured on the picture as
    it is at this step (upright, after any earlier geometry). With `unit: "px"` the four are whole
    pixels; with `unit: "percent"` they are percent of the picture's width (`x`, `width`) and height
    (`y`, `height`), so one chain fits every size. A box that runs over the right or bottom edge is cut
    at the edge; a pixel box that starts outside the picture fails the image with `crop_out_of_bounds`."""

    width: Extent
    height: Extent
    x: Extent = 0.0
    y: Extent = 0.0
    unit: Literal["px", "percent"] = "px"

    def problems(self) -> Any:
        for name in ("width", "height"):
            if getattr(self, name) == 0:
                yield FieldError(name, "must be more than 0")
        if self.unit == "px":
            for name in ("x", "y", "width", "height"):
                if not float(getattr(self, name)).is_integer():
                    yield FieldError(name, 'must be a whole number of pixels (or use unit "percent")')
            return
        for name in ("x", "y"):
            if getattr(self, name) >= 100:
                yield FieldError(name, "must be under 100 percent: the box would start outside the image")
        for name in ("width", "height"):
            if getattr(self, name) > 100:
                yield FieldError(name, "must be at most 100 percent")


@dataclass(frozen=True)
class SmartCropParams(Params):
    """Cut out the most interesting region at the picture's own scale (no resampling): a `width` x
    `height` box, or the largest box of `aspect_ratio` that fits. `strategy` finds the region:
    `attention` looks for skin tones, saturated colour and edges, `entropy` for the busiest detail,
    `centre` takes the middle. A box bigger than the picture is cut to it. For a thumbnail of an exact
    size, chain `smart_crop` with `aspect_ratio` and a `resize`."""

    width: Dimension = None
    height: Dimension = None
    aspect_ratio: AspectRatio | None = None
    strategy: Strategy = "attention"

    def problems(self) -> Any:
        has_box = self.width is not None or self.height is not None
        if self.aspect_ratio is not None:
            if has_box:
                yield FieldError("aspect_ratio", "give width and height, or aspect_ratio, not both")
        elif not has_box:
            yield FieldError("width", "give width and height, or aspect_ratio")
        elif self.width is None:
            yield FieldError("width", "give width with height")
        elif self.height is None:
            yield FieldError("height", "give height with width")


@dataclass(frozen=True)
class RotateParams(Params):
    """Turn clockwise by `angle` degrees (negative: anticlockwise). Multiples of 90 move pixels exactly,
    with no resampling. Other angles resample (bicubic) onto a canvas that holds the whole turned
    picture; its exposed corners are `background`, or transparent when the image has alpha."""

    angle: float
    background: Colour = "#ffffff"


@dataclass(frozen=True)
class FlipParams(Params):
    """Mirror left-right (`horizontal`), top-bottom (`vertical`) or both (the same as a 180° turn)."""

    direction: Literal["horizontal", "vertical", "both"]


@dataclass(frozen=True)
class UpscaleParams(Params):
    """Enlarge `scale` times with lanczos3, then sharpen gently to offset the softness enlarging brings.
    Results over the service's pixel limit fail with `image_too_large`."""

    scale: Literal[2, 4, 8] = 2


@dataclass(frozen=True)
class AutoOrientParams(Params):
    """Every chain turns the photo upright from its EXIF orientation unless this says `false`."""

    enabled: bool = True


# Coordinates no image reaches: "unbounded" along an axis for libvips' thumbnail.
_UNBOUNDED = 10_000_000


@dataclass(frozen=True)
class ThumbnailArgs:
    """What libvips' `thumbnail` needs; the same for shrink-on-load from a file and for an image."""

    width: int
    height: int
    size: str
    crop: str | None


def thumbnail_args(source_size: Callable[[], tuple[int, int]], params: ResizeParams) -> ThumbnailArgs:
    """Translate a fit mode into thumbnail arguments for an (upright) source.

    `source_size` is asked only by the fit modes that depend on it, so a shrink-on-load resize by
    width or into a box does not open the file an extra time to read its header."""
    size = "both" if params.enlarge else "down"
    width, height = params.width, params.height
    if width is None or height is None or params.fit in ("inside", "contain"):
        return ThumbnailArgs(width or _UNBOUNDED, height or _UNBOUNDED, size, None)
    if params.fit == "cover":
        return ThumbnailArgs(width, height, size, "centre")
    source_width, source_height = source_size()
    if params.fit == "fill":
        if not params.enlarge:
            # Each axis on its own: shrink where the source is bigger than the box, never stretch.
            width, height = min(width, source_width), min(height, source_height)
        return ThumbnailArgs(width, height, "force", None)
    # `outside`: scale by the axis that needs the bigger scale and leave the other unbounded, so that
    # axis lands exactly on the box. (Rounding the other axis to a width first can leave it short.)
    if height * source_width >= width * source_height:
        return ThumbnailArgs(_UNBOUNDED, height, size, None)
    return ThumbnailArgs(width, _UNBOUNDED, size, None)


def scaled_size(source_width: int, source_height: int, args: ThumbnailArgs) -> tuple[int, int]:
    """The size libvips' thumbnail scales a source to before it crops, so that a resize later in a chain,
    whatever its kernel, comes out the size a shrink-on-load one does. libvips is asked, on a stand-in of
    the source's size: its rounding depends on how it splits a shrink, and only the sizes are read, so
    no pixel is made."""
    width, height = args.width, args.height
    if args.crop is not None:
        # Covering the box, the axis that needs less shrinking decides, as in libvips; the other one is
        # left unbounded so that thumbnail does not crop (which would make pixels).
        if source_width * height < source_height * width:
            height = _UNBOUNDED
        else:
            width = _UNBOUNDED
    stand_in = pyvips.Image.black(source_width, source_height)
    scaled = stand_in.thumbnail_image(width, height=height, size=args.size, no_rotate=True)
    return scaled.width, scaled.height


def resize(image: pyvips.Image, params: ResizeParams) -> pyvips.Image:
    args = thumbnail_args(lambda: (image.width, image.height), params)
    width, height = scaled_size(image.width, image.height, args)
    resized = resample(image, width, height, params.kernel or "lanczos3")
    if args.crop is not None:
        resized = resized.smartcrop(
            min(args.width, resized.width), min(args.height, resized.height), interesting=args.crop
        )
    return finish_resize(resized, params)


def resample(image: pyvips.Image, width: int, height: int, kernel: Kernel) -> pyvips.Image:
    """Scale to exactly `width` x `height` (libvips' resize gives exactly that size for a scale of
    target / source, whatever the kernel)."""
    if (width, height) == (image.width, image.height):
        return image
    horizontal, vertical = width / image.width, height / image.height
    # Nearest neighbour never mixes pixels, so there is no colour to weigh by alpha.
    if not image.hasalpha() or kernel == "nearest":
        return image.resize(horizontal, vscale=vertical, kernel=kernel)
    top = max_value(image)
    resized = image.premultiply(max_alpha=top).resize(horizontal, vscale=vertical, kernel=kernel)
    return restore_format(resized.unpremultiply(max_alpha=top), image)


def finish_resize(image: pyvips.Image, params: ResizeParams) -> pyvips.Image:
    """`contain` pads the fitted image to the exact box."""
    if params.fit != "contain" or params.width is None or params.height is None:
        return image
    if image.width == params.width and image.height == params.height:
        return image
    return image.gravity(
        "centre",
        max(image.width, params.width),
        max(image.height, params.height),
        extend="background",
        background=background_for(image, params.background),
    )


def crop(image: pyvips.Image, params: CropParams) -> pyvips.Image:
    if params.unit == "percent":
        left, width = _percent_span(params.x, params.width, image.width)
        top, height = _percent_span(params.y, params.height, image.height)
    else:
        left, top, width, height = int(params.x), int(params.y), int(params.width), int(params.height)
        if left >= image.width or top >= image.height:
            raise ProcessingError(
                "crop_out_of_bounds",
                f"the crop box starts at ({left}, {top}), outside the {image.width}x{image.height} image",
            )
    width, height = min(width, image.width - left), min(height, image.height - top)
    if (width, height) == (image.width, image.height):
        return image
    return image.crop(left, top, width, height)


def _percent_span(start: float, length: float, size: int) -> tuple[int, int]:
    """A percent span as the nearest pixels: starting inside the image (`start` is under 100), at least
    one pixel long."""
    return min(_nearest(start * size / 100), size - 1), max(1, _nearest(length * size / 100))


def _nearest(value: float) -> int:
    return math.floor(value + 0.5)  # half up, as libvips rounds; Python's round() goes to even


def smart_crop(image: pyvips.Image, params: SmartCropParams) -> pyvips.Image:
    width, height = _smart_crop_box(image.width, image.height, params)
    if (width, height) == (image.width, image.height):
        return image
    return image.smartcrop(width, height, interesting=params.strategy)


def _smart_crop_box(image_width: int, image_height: int, params: SmartCropParams) -> tuple[int, int]:
    if params.aspect_ratio is None:
        assert params.width is not None and params.height is not None  # problems() sees to it
        return min(params.width, image_width), min(params.height, image_height)
    across, down = (int(part) for part in params.aspect_ratio.split(":"))
    if image_width * down >= image_height * across:  # wider than the ratio: full height
        return max(1, min(image_width, _nearest(image_height * across / down))), image_height
    return image_width, max(1, min(image_height, _nearest(image_width * down / across)))


_EXACT_TURNS: dict[float, Callable[[pyvips.Image], pyvips.Image]] = {
    90: lambda image: image.rot90(),
    180: lambda image: image.rot180(),
    270: lambda image: image.rot270(),
}


def rotate(image: pyvips.Image, params: RotateParams) -> pyvips.Image:
    angle = params.angle % 360
    if angle == 0:
        return image
    if angle in _EXACT_TURNS:
        return _EXACT_TURNS[angle](image)
    # libvips weighs colour by alpha as it resamples (and turns a transparent background all zeros).
    bicubic = pyvips.Interpolate.new("bicubic")
    return image.rotate(angle, interpolate=bicubic, background=background_for(image, params.background))


def flip(image: pyvips.Image, params: FlipParams) -> pyvips.Image:
    if params.direction == "horizontal":
        return image.fliphor()
    if params.direction == "vertical":
        return image.flipver()
    return image.rot180()


# Enlarging n times spreads an edge over about n pixels: an unsharp mask of about half that radius
# pulls it back together without the halos a full-strength one would draw.
_UPSCALE_SHARPEN_AMOUNT = 0.6


def upscale(image: pyvips.Image, params: UpscaleParams) -> pyvips.Image:
    enlarged = resample(image, image.width * params.scale, image.height * params.scale, "lanczos3")
    return sharpen(enlarged, SharpenParams(sigma=params.scale / 2, amount=_UPSCALE_SHARPEN_AMOUNT))


def exif_orientation(image: pyvips.Image) -> int:
    """The EXIF orientation libvips read from a file's header; 1 (upright as stored) without one."""
    return int(image.get("orientation")) if image.get_typeof("orientation") else 1


def reads_out_of_order(params: Params) -> bool:
    """Whether libvips reads this step's input out of top-to-bottom order: turns, vertical flips and the
    whole-image analysis of a smart crop. A sequential (streaming) load cannot serve those."""
    if isinstance(params, RotateParams):
        return params.angle % 360 != 0
    if isinstance(params, FlipParams):
        return params.direction != "horizontal"
    if isinstance(params, SmartCropParams):
        return params.strategy != "centre"
    return False


KINDS = (
    OperationKind("resize", "Scale to a box with a fit mode.", ResizeParams, Stage.GEOMETRY, resize),
    OperationKind("crop", "Cut out a box given in pixels or in percent.", CropParams, Stage.GEOMETRY, crop),
    OperationKind(
        "smart_crop",
        "Cut out the most interesting region of a size or an aspect ratio.",
        SmartCropParams,
        Stage.GEOMETRY,
        smart_crop,
    ),
    OperationKind(
        "rotate",
        "Turn clockwise by any angle; multiples of 90° are exact.",
        RotateParams,
        Stage.GEOMETRY,
        rotate,
    ),
    OperationKind("flip", "Mirror horizontally, vertically or both.", FlipParams, Stage.GEOMETRY, flip),
    OperationKind(
        "upscale",
        "Enlarge 2, 4 or 8 times with lanczos3 and a gentle sharpen.",
        UpscaleParams,
        Stage.GEOMETRY,
        upscale,
    ),
    OperationKind(
        "auto_orient",
        "Turn the photo upright from its EXIF orientation (on unless `enabled: false`).",
        AutoOrientParams,
        Stage.LOAD,
        None,
    ),
)
