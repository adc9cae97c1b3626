"""Tone and colour: point operations (adjust, grayscale, background)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pyvips

from jobs.ops.base import (
    Colour,
    OperationKind,
    Stage,
    colour_values,
    max_value,
    on_colour_bands,
    restore_format,
)
from jobs.params import Bounds, Params

Factor = Annotated[float, Bounds(0, 3)]


@dataclass(frozen=True)
class AdjustParams(Params):
    """Multipliers where 1 changes nothing, as CSS `brightness()`, `contrast()` and `saturate()`:
    `brightness` scales every value (0 is black, 2 twice as bright); `contrast` stretches values away
    from mid-grey (0 is flat grey); `saturation` scales chroma (0 is greyscale). `gamma` bends the
    mid-tones as value^(1/gamma) on a 0 to 1 scale: above 1 lightens them, below 1 darkens them, and black
    and white stay. Applied in that order: saturation, gamma, contrast, brightness."""

    brightness: Factor = 1.0
    contrast: Factor = 1.0
    saturation: Factor = 1.0
    gamma: Annotated[float, Bounds(0.1, 10)] = 1.0


@dataclass(frozen=True)
class GrayscaleParams(Params):
    """No parameters."""


@dataclass(frozen=True)
class BackgroundParams(Params):
    """The colour that shows through transparent and translucent pixels."""

    color: Colour = "#ffffff"


def adjust(image: pyvips.Image, params: AdjustParams) -> pyvips.Image:
    return on_colour_bands(image, lambda colour: _tone_curve(_saturate(colour, params.saturation), params))


def _saturate(image: pyvips.Image, factor: float) -> pyvips.Image:
    # Chroma in LCh, not a stretch of R, G and B away from their mean: hue and lightness stay, so
    # skin does not turn orange and a saturated blue does not go dark.
    if factor == 1 or image.bands < 3:
        return image
    lch = image.colourspace("lch").linear([1, factor, 1], [0, 0, 0])
    return lch.colourspace(image.interpretation)


def _tone_curve(image: pyvips.Image, params: AdjustParams) -> pyvips.Image:
    if params.gamma == params.contrast == params.brightness == 1:
        return image
    top = max_value(image)
    values = image.cast("float")
    if params.gamma != 1:
        values = (values / top) ** (1 / params.gamma) * top
    # brightness * ((v - 1/2) * contrast + 1/2), in pixel values: one multiply-add.
    scale = params.brightness * params.contrast
    offset = params.brightness * (1 - params.contrast) * top / 2
    return restore_format(values.linear(scale, offset), image)


def grayscale(image: pyvips.Image, params: GrayscaleParams) -> pyvips.Image:
    # One band (two with alpha), as libvips converts: a third of the bytes to encode, and JPEG and PNG
    # store greyscale. 16-bit stays 16-bit; greyscale input is returned as it is. Alpha is kept out of
    # the conversion, which would round a 16-bit alpha through floats.
    if image.interpretation in ("b-w", "grey16"):
        return image
    target = "grey16" if image.format == "ushort" else "b-w"
    return on_colour_bands(image, lambda colour: colour.colourspace(target))


def background(image: pyvips.Image, params: BackgroundParams) -> pyvips.Image:
    if not image.hasalpha():
        return image
    flat = image.flatten(background=colour_values(image, params.color), max_alpha=max_value(image))
    return restore_format(flat, image)


KINDS = (
    OperationKind(
        "adjust",
        "Brightness, contrast, saturation (chroma) and gamma; each 1 leaves the picture as it is.",
        AdjustParams,
        Stage.POINT,
        adjust,
    ),
    OperationKind(
        "grayscale",
        "Greyscale by lightness; the result has one colour band (16-bit stays 16-bit).",
        GrayscaleParams,
        Stage.POINT,
        grayscale,
    ),
    OperationKind(
        "background",
        "Flatten transparency onto `color` (default white) and drop the alpha band.",
        BackgroundParams,
        Stage.POINT,
        background,
    ),
)
