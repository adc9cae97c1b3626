"""Overlays: what is drawn on top of the finished picture (watermark)."""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import pyvips

from jobs.ops.base import Colour, OperationKind, Stage, background_for, max_value, restore_format
from jobs.params import Bounds, FieldError, Params, Pattern

Position = Literal["centre", "top-left", "top-right", "bottom-left", "bottom-right", "tile"]

# Line breaks are allowed (a two-line credit); other control characters are not text.
WatermarkText = Annotated[
    str, Pattern("[^\\x00-\\x09\\x0b-\\x1f\\x7f]{1,200}", "1 to 200 characters (line breaks allowed)")
]

FONT = "sans"
# The gap between the text and the picture's edges, as a fraction of the shorter side.
MARGIN_FRACTION = 0.03
# Tiles: the gap between repeats, in text heights.
TILE_GAP = 1.5

_ALIGN = {"centre": "centre", "tile": "centre", "top-left": "low", "bottom-left": "low"}


@dataclass(frozen=True)
class WatermarkParams(Params):
    """`size` is the height of one line of text as a fraction of the picture's shorter side; a text too
    long for the width is made smaller until it fits. `tile` repeats the text over the whole picture."""

    text: WatermarkText
    position: Position = "bottom-right"
    opacity: Annotated[float, Bounds(0, 1)] = 0.5
    size: Annotated[float, Bounds(0.01, 0.5)] = 0.05
    color: Colour = "#ffffff"

    def problems(self) -> Iterator[FieldError]:
        categories = [unicodedata.category(character) for character in self.text]
        if "Cs" in categories:
            # JSON lets a lone half of a surrogate pair through; it cannot be encoded for the renderer.
            yield FieldError("text", "must be valid Unicode text")
        elif all(category[0] in "ZC" for category in categories):
            yield FieldError("text", "must contain a visible character")


def watermark(image: pyvips.Image, params: WatermarkParams) -> pyvips.Image:
    if params.opacity == 0:
        return image
    shorter_side = min(image.width, image.height)
    lines = params.text.count("\n") + 1
    line_height = max(1, round(params.size * shorter_side))
    if params.position == "tile":
        mask = _render(params, image.width, line_height * lines)
        return _composite(image, _tiled(mask, image.width, image.height, line_height), 0, 0, params)
    margin = round(MARGIN_FRACTION * shorter_side)
    room_width, room_height = image.width - 2 * margin, image.height - 2 * margin
    mask = _render(params, room_width, min(line_height * lines, room_height))
    if params.position == "centre":
        x, y = (image.width - mask.width) // 2, (image.height - mask.height) // 2
    else:
        vertical, horizontal = params.position.split("-")
        x = margin if horizontal == "left" else image.width - margin - mask.width
        y = margin if vertical == "top" else image.height - margin - mask.height
    return _composite(image, mask, x, y, params)


def _render(params: WatermarkParams, width: int, height: int) -> pyvips.Image:
    """The text as an 8-bit coverage mask, as large as fits in `width` x `height` (at least 1 x 1)."""
    width, height = max(width, 1), max(height, 1)
    mask = pyvips.Image.text(
        # libvips reads Pango markup: `<` and `&` in a partner's text are characters, not tags.
        html.escape(params.text, quote=False),
        font=FONT,
        width=width,
        height=height,
        wrap="none",
        align=_ALIGN.get(params.position, "high"),
    )
    # At a few pixels the fitted font can come out a pixel over the box.
    return mask.crop(0, 0, min(mask.width, width), min(mask.height, height))


def _tiled(mask: pyvips.Image, width: int, height: int, line_height: int) -> pyvips.Image:
    """Rows of the text over a `width` x `height` picture, every other row shifted by half a repeat."""
    gap = math.ceil(TILE_GAP * line_height)
    step_x, step_y = mask.width + gap, mask.height + gap
    # Half a gap in from the cell's edges, so the first row and column do not touch the picture's edges.
    inset = gap // 2
    cell = (
        pyvips.Image.black(step_x, 2 * step_y)
        .insert(mask, inset, inset)
        .insert(mask, inset + step_x // 2, inset + step_y)
        .insert(mask, inset + step_x // 2 - step_x, inset + step_y)
    )
    across, down = width // cell.width + 1, height // cell.height + 1
    return cell.replicate(across, down).crop(0, 0, width, height)


def _composite(
    image: pyvips.Image, mask: pyvips.Image, x: int, y: int, params: WatermarkParams
) -> pyvips.Image:
    top = max_value(image)
    colour_bands = image.bands - 1 if image.hasalpha() else image.bands
    # background_for gives the colour as the picture's bands (grey for b-w), plus a transparent alpha.
    ink = [value * top / 255 for value in background_for(image, params.color)[:colour_bands]]
    alpha = mask * (params.opacity * top / 255)
    # Made from the float alpha, the constant colour is float too: 16-bit white does not fit in uchar.
    overlay = alpha.new_from_image(ink).bandjoin(alpha).cast(image.format)
    overlay = overlay.copy(interpretation=image.interpretation)
    # Over: where the picture is transparent the text still shows, so transparency cannot hide it.
    result = image.composite2(overlay, "over", x=x, y=y)
    if not image.hasalpha():
        result = result[:colour_bands]
    return restore_format(result, image)


KINDS = (
    OperationKind(
        "watermark",
        "Draw a text watermark in a corner, the centre or tiled over the picture.",
        WatermarkParams,
        Stage.OVERLAY,
        watermark,
    ),
)
