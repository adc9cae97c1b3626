"""Geometry: operations that move pixels (resize, crop, rotate…). They run first in a chain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pyvips

from jobs.ops.base import Colour, Dimension, OperationKind, Stage, background_for
from jobs.params import FieldError, Params

Fit = Literal["inside", "contain", "cover", "fill", "outside"]


@dataclass(frozen=True)
class ResizeParams(Params):
    """`inside` keeps the aspect ratio within the box; `cover` fills it and crops the overflow;
    `contain` fits inside and pads to the exact box; `fill` stretches; `outside` covers without cropping."""

    width: Dimension = None
    height: Dimension = None
    fit: Fit = "inside"
    enlarge: bool = False
    background: Colour = "#ffffff"

    def problems(self) -> Any:
        if self.width is None and self.height is None:
            yield FieldError("width", "give width, height or both")


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


def resize(image: pyvips.Image, params: ResizeParams) -> pyvips.Image:
    args = thumbnail_args(lambda: (image.width, image.height), params)
    options: dict[str, Any] = {"height": args.height, "size": args.size, "no_rotate": True}
    if args.crop is not None:
        options["crop"] = args.crop
    return finish_resize(image.thumbnail_image(args.width, **options), params)


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


KINDS = (
    OperationKind("resize", "Scale to a box with a fit mode.", ResizeParams, Stage.GEOMETRY, resize),
    OperationKind(
        "auto_orient",
        "Turn the photo upright from its EXIF orientation (on unless `enabled: false`).",
        AutoOrientParams,
        Stage.LOAD,
        None,
    ),
)
