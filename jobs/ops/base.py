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


def background_for(image: pyvips.Image, colour: str) -> list[float]:
    """`colour` as pixel values for `image`'s bands: grey for one-band images, transparent alpha."""
    rgb = parse_colour(colour)
    colour_bands = image.bands - (1 if image.hasalpha() else 0)
    values = rgb if colour_bands >= 3 else [0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]]
    values = values[:colour_bands]
    return [*values, 0.0] if image.hasalpha() else values


def max_value(image: pyvips.Image) -> float:
    """White: images reach operations as 8-bit sRGB/b-w, or 16-bit (rgb16/grey16) when 16-bit output
    was asked for."""
    return 65535.0 if image.format == "ushort" else 255.0


def restore_format(result: pyvips.Image, like: pyvips.Image) -> pyvips.Image:
    """Arithmetic makes floats: clamp and cast back to `like`'s band format and interpretation."""
    if result.format == like.format:
        return result.copy(interpretation=like.interpretation)
    top = max_value(like)
    clamped = (result < 0).ifthenelse(0, (result > top).ifthenelse(top, result))
    return clamped.cast(like.format).copy(interpretation=like.interpretation)
