"""Variants of a finished result: smaller, re-encoded or preview copies of the stored output file.

A variant is rendered from the result already produced by the operation chain, never from the original,
so it costs one decode of a file no larger than the result and can only shrink it. Blocking: run it in a
thread.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import pyvips

from jobs.ops import encode
from jobs.ops.base import max_value, restore_format
from jobs.ops.encode import ConvertParams, OutputFormat
from jobs.pipeline import FAIL_ON, KillSwitch

# A preview is a low-resolution copy that is useless as a final image: longest side at most this.
PREVIEW_MAX_SIDE = 400
PREVIEW_TEXT = "PREVIEW"
# Bump when the pixels a spec renders to change (a new watermark design): cached variants and their
# ETags are keyed on it, so nobody is served the old rendering under the new one's name.
RENDERING_REVISION = 1

_MARK_ANGLE = -30.0
_INK_OPACITY = 0.45  # light letters show on dark pictures…
_SHADOW_OPACITY = 0.35  # …and their dark shadow on light ones


@dataclass(frozen=True)
class VariantSpec:
    """A variant resolved against its stored result: exact output size, format and encoder quality.

    Two requests that render the same pixels resolve to equal specs (`width=5000` and no width on an
    800 px result both give 800), so they share one cached file and one ETag."""

    format: OutputFormat
    width: int
    height: int
    quality: int | None = None
    preview: bool = False

    def canonical(self) -> str:
        """A stable text form for cache keys and ETags."""
        quality = "default" if self.quality is None else str(self.quality)
        return (
            f"r{RENDERING_REVISION};format={self.format};width={self.width};height={self.height};"
            f"quality={quality};preview={int(self.preview)}"
        )


def fit_inside(width: int, height: int, box_width: int, box_height: int) -> tuple[int, int]:
    """`width`x`height` scaled to fit inside the box, keeping its aspect ratio and never enlarging."""
    scale = min(box_width / width, box_height / height, 1.0)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_variant(
    source: Path, destination: Path, spec: VariantSpec, kill_switch: KillSwitch | None = None
) -> None:
    """Write the variant `spec` of the stored result `source` to `destination`.

    Raises pyvips.Error for a result that cannot be decoded, or whose render `kill_switch` stopped;
    nothing is left at `destination` then."""
    try:
        _save_variant(source, destination, spec, kill_switch)
    except pyvips.Error:
        destination.unlink(missing_ok=True)
        raise
    finally:
        if kill_switch is not None:
            kill_switch.disarm()


def _save_variant(source: Path, destination: Path, spec: VariantSpec, kill_switch: KillSwitch | None) -> None:
    # The images live in this frame only, so they are freed (and the file closed) when it returns or raises.
    # "force" lands on the exact size the spec was resolved to; its aspect ratio is the source's already.
    image = pyvips.Image.thumbnail(str(source), spec.width, height=spec.height, size="force", fail_on=FAIL_ON)
    if spec.preview:
        image = stamp_preview(image)
    convert = ConvertParams(format=spec.format, quality=spec.quality)
    image = encode.prepare_for_save(image, spec.format, convert)
    watch = kill_switch.arm if kill_switch is not None else None
    if watch is not None:
        watch(image)
    encode.save(image, destination, spec.format, convert, watch=watch)


def stamp_preview(image: pyvips.Image) -> pyvips.Image:
    """Tile a diagonal "PREVIEW" across the whole picture: light letters with a dark shadow, so the mark
    shows on any background. Transparent areas get the mark too, or a cut-out would hide it."""
    mark = _tiled_mark(image.width, image.height)
    offset = max(1, round(max(image.width, image.height) / 200))
    # Embedded into a canvas the offset larger, then cut: a picture no larger than the offset (a 1 px
    # result) would leave the shadow no room, which libvips refuses.
    shadow = mark.embed(offset, offset, image.width + offset, image.height + offset).crop(
        0, 0, image.width, image.height
    )
    ink = mark * _INK_OPACITY
    shade = shadow * _SHADOW_OPACITY
    top = max_value(image)
    has_alpha = image.hasalpha()
    colour = image.extract_band(0, n=image.bands - 1) if has_alpha else image
    colour = colour * (1 - shade)
    colour = colour * (1 - ink) + ink * top
    if has_alpha:
        coverage = (ink > shade).ifthenelse(ink, shade) * top
        alpha = image.extract_band(image.bands - 1)
        colour = colour.bandjoin((alpha > coverage).ifthenelse(alpha, coverage))
    return restore_format(colour, image)


def _tiled_mark(width: int, height: int) -> pyvips.Image:
    """A float mask in 0…1 of `width`x`height`: the rotated text repeated in a grid with gaps."""
    longest = max(width, height)
    text_width = max(24, longest // 3)
    text = pyvips.Image.text(
        f"<b>{html.escape(PREVIEW_TEXT)}</b>",
        font="sans",
        width=text_width,
        height=max(8, text_width // 4),
    )
    tile = text.rotate(_MARK_ANGLE)
    gap = max(4, longest // 12)
    tile = tile.embed(gap // 2, gap // 2, tile.width + gap, tile.height + gap)
    across, down = math.ceil(width / tile.width), math.ceil(height / tile.height)
    return tile.replicate(across, down).crop(0, 0, width, height) / 255.0
