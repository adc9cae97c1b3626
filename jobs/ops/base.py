"""What every operation family shares: the kind record, the pipeline stages and colour parameters."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pyvips

from jobs.params import Bounds, Params, Pattern

MAX_DIMENSION = 16_384

Dimension = Annotated[int | None, Bounds(1, MAX_DIMENSION)]
Colour = Annotated[str, Pattern("#?(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})", "a colour like #ffffff")]


class ProcessingError(Exception):
    """The image cannot be processed; `code` is the stable machine-readable reason. Operations raise it
    for what only the image itself reveals (a crop box outside it, a byte budget no quality meets)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Stage(enum.IntEnum):
    """Where an operation runs in the pipeline; a chain is run stage by stage, in the partner's order
    within a stage. Geometry first, so area filters work on the (usually much smaller) final pixels;
    point operations commute with both, so they go last, before anything drawn on top."""

    LOAD = 0  # options of the decoder (auto_orient): no pixels of their own
    GEOMETRY = 1
    AREA = 2
    POINT = 3
    OVERLAY = 4
    SAVE = 5  # options of the encoder (convert)


@dataclass(frozen=True)
class OperationKind:
    name: str
    summary: str
    params_model: type[Params]
    stage: Stage
    # None for LOAD and SAVE kinds: they shape the decoding or the saved file, not the pixels.
    apply: Callable[[pyvips.Image, Any], pyvips.Image] | None


def parse_colour(value: str) -> list[float]:
    """`#rgb` or `#rrggbb` → [r, g, b]."""
    digits = value.removeprefix("#")
    if len(digits) == 3:
        digits = "".join(ch * 2 for ch in digits)
    if len(digits) != 6:
        raise ValueError("must be a colour like #ffffff")
    try:
        return [float(int(digits[i : i + 2], 16)) for i in (0, 2, 4)]
    except ValueError:
        raise ValueError("must be a colour like #ffffff") from None


def colour_values(image: pyvips.Image, colour: str) -> list[float]:
    """`colour` as values of `image`'s colour bands, in its range: its grey for greyscale images."""
    scale = max_value(image) / 255
    red, green, blue = parse_colour(colour)
    if image.bands - (1 if image.hasalpha() else 0) >= 3:
        return [red * scale, green * scale, blue * scale]
    return [(0.2126 * red + 0.7152 * green + 0.0722 * blue) * scale]


def background_for(image: pyvips.Image, colour: str) -> list[float]:
    """A fill for new pixels of `image` (padding, exposed corners): `colour`, transparent with alpha."""
    values = colour_values(image, colour)
    return [*values, 0.0] if image.hasalpha() else values


def on_colour_bands(image: pyvips.Image, process: Callable[[pyvips.Image], pyvips.Image]) -> pyvips.Image:
    """Run `process` on the colour bands only and re-attach the alpha band untouched. The result takes
    the processed bands' interpretation (and so may turn from colour to greyscale)."""
    if not image.hasalpha():
        return process(image)
    colour_bands = image.bands - 1
    processed = process(image.extract_band(0, n=colour_bands))
    return processed.bandjoin(image.extract_band(colour_bands))


def max_value(image: pyvips.Image) -> float:
    """White: images reach operations as 8-bit sRGB/b-w, or 16-bit (rgb16/grey16) when 16-bit output
    was asked for."""
    return 65535.0 if image.format == "ushort" else 255.0


def restore_format(result: pyvips.Image, like: pyvips.Image) -> pyvips.Image:
    """Arithmetic makes floats: round and cast back to `like`'s band format and interpretation. (libvips'
    cast clips to the format's range but truncates, which would darken every result by up to a level.)"""
    if result.format in ("float", "double"):
        result = result.rint()
    if result.format != like.format:
        result = result.cast(like.format)
    return result.copy(interpretation=like.interpretation)
