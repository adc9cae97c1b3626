"""Auto-enhance: a classical one-step lift for dull real-estate and product photos.

Per-channel levels and a grey-world white balance, both measured on the picture and both limited, then
in Lab: local contrast (CLAHE on lightness), a little more chroma and a gentle sharpen. `strength` blends
the result with the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import pyvips

from jobs.ops.base import OperationKind, Stage, max_value, restore_format
from jobs.params import Bounds, Params

# Levels: each channel's 0.5th and 99.5th percentiles become black and white...
SHADOW_PERCENTILE = 0.5
HIGHLIGHT_PERCENTILE = 99.5
# ...but no channel is stretched more than this, so a flat or nearly empty picture is not torn apart,
LEVELS_MAX_GAIN = 2.5
# and a channel's black or white point may differ from the others' by this much of full range at most:
# a red sunset keeps its red instead of being "corrected" to grey.
LEVELS_MAX_CHANNEL_SHIFT = 0.08
# Grey world: a gamma per channel brings each channel's mean to the picture's original mean brightness,
# which both balances the colour and keeps a stretch from darkening or brightening the picture as a whole.
# A gamma keeps black and white where they are, so it clips nothing; its strength is capped for
# genuinely colourful scenes.
BALANCE_MAX_GAMMA = 1.3
# CLAHE on lightness, measured on a copy of this shorter side: libvips' `hist_local` costs time in
# proportion to pixels times window, and local contrast is about areas (fine detail is the sharpen's job).
LOCAL_WORKING_SIZE = 400
# The window is this fraction of the shorter side; a small slope limit keeps it from turning flat walls
# into noise and halos.
LOCAL_WINDOW_FRACTION = 1 / 8
# In a smaller window the slope limit is below one pixel per level and even a flat grey is remapped, so
# a picture smaller than this gets no local contrast.
LOCAL_MIN_WINDOW = 16
LOCAL_MAX_SLOPE = 3.0
LOCAL_AMOUNT = 1.0
# Vibrance: dull colours get up to this much more chroma, colours already at SATURATED_CHROMA none, so a
# blue sky or a red sofa is not pushed out of gamut.
CHROMA_BOOST = 0.2
SATURATED_CHROMA = 60.0
# Unsharp mask on lightness.
SHARPEN_SIGMA = 1.0
SHARPEN_AMOUNT = 0.6


@dataclass(frozen=True)
class EnhanceParams(Params):
    """`strength` 0 leaves the picture as it is, 1 applies the full auto-enhance."""

    strength: Annotated[float, Bounds(0, 1)] = 0.6


@dataclass(frozen=True)
class _Channel:
    shadow: float  # percentiles and mean on a 0..1 scale
    highlight: float
    mean: float


def enhance(image: pyvips.Image, params: EnhanceParams) -> pyvips.Image:
    if params.strength == 0:
        return image
    # The levels need statistics, a pass over the pixels before the real one, and the source may be a
    # sequential-access file that cannot be read twice. Geometry ran first, so this holds the picture at
    # its final (usually reduced) size.
    image = image.copy_memory()
    alpha = image[image.bands - 1] if image.hasalpha() else None
    colour = image[: image.bands - 1] if alpha is not None else image
    lab = _levels_and_balance(colour, _measure(colour, alpha)).colourspace("lab")
    lightness = _sharpen(_local_contrast(lab[0]))
    enhanced = lightness.bandjoin(_vibrance(lab[1:3])).copy(interpretation="lab")
    enhanced = enhanced.colourspace(colour.interpretation)
    blended = (colour + (enhanced - colour) * params.strength).rint()
    if alpha is not None:
        blended = blended.bandjoin(alpha)
    return restore_format(blended, image)


def _measure(colour: pyvips.Image, alpha: pyvips.Image | None) -> list[_Channel]:
    """Percentiles and mean of each channel over the visible pixels (a transparent background's hidden
    colour says nothing about the photo)."""
    eight_bit = colour if colour.format == "uchar" else (colour / 257).cast("uchar")
    weight = (alpha > 0) if alpha is not None else colour[0].new_from_image(1)
    return [_describe(weight.hist_find_indexed(eight_bit[band]).tolist()[0]) for band in range(colour.bands)]


def _describe(counts: list[float]) -> _Channel:
    """A channel from its 256-level histogram; a picture with no visible pixel is left as it is."""
    total = sum(counts)
    if total == 0:
        return _Channel(shadow=0.0, highlight=1.0, mean=0.5)
    mean = sum(level * count for level, count in enumerate(counts)) / total
    return _Channel(
        shadow=_level_below(counts, total * SHADOW_PERCENTILE / 100) / 255,
        highlight=_level_below(counts, total * HIGHLIGHT_PERCENTILE / 100) / 255,
        mean=mean / 255,
    )


def _level_below(counts: list[float], wanted: float) -> int:
    """The lowest level with at least `wanted` pixels at or below it."""
    running = 0.0
    for level, count in enumerate(counts):
        running += count
        if running >= wanted:
            return level
    return len(counts) - 1


def _levels_and_balance(colour: pyvips.Image, channels: list[_Channel]) -> pyvips.Image:
    """Stretch each channel to full range within limits, then balance the means. One lookup table per
    channel does both; its 16-bit output keeps the stretch of an 8-bit picture free of gaps."""
    common_shadow = min(channel.shadow for channel in channels)
    common_highlight = max(channel.highlight for channel in channels)
    scales, offsets, means = [], [], []
    for channel in channels:
        shadow = min(channel.shadow, common_shadow + LEVELS_MAX_CHANNEL_SHIFT)
        highlight = max(channel.highlight, common_highlight - LEVELS_MAX_CHANNEL_SHIFT)
        span = max(highlight - shadow, 1 / LEVELS_MAX_GAIN)
        # A span widened by the gain limit stays centred on the channel's own range.
        shadow = (shadow + highlight - span) / 2
        scales.append(1 / span)
        offsets.append(-shadow / span)
        means.append(min(max((channel.mean - shadow) / span, 0.02), 0.98))
    target = min(max(sum(channel.mean for channel in channels) / len(channels), 0.02), 0.98)
    gammas = [
        min(max(math.log(target) / math.log(mean), 1 / BALANCE_MAX_GAMMA), BALANCE_MAX_GAMMA)
        for mean in means
    ]
    top = max_value(colour)
    entries = pyvips.Image.identity(bands=colour.bands, ushort=colour.format == "ushort")
    normalised = entries.linear([scale / top for scale in scales], offsets).clamp(min=0, max=1)
    table = ((normalised**gammas) * 65535).cast("ushort")
    return colour.maplut(table).copy(interpretation="grey16" if colour.bands == 1 else "rgb16")


def _local_contrast(lightness: pyvips.Image) -> pyvips.Image:
    """CLAHE on Lab lightness (0..100), measured on a reduced copy. Only its change is scaled up and
    added, so the picture keeps its own detail and 16-bit pictures get no 8-bit steps."""
    scale = min(1.0, LOCAL_WORKING_SIZE / min(lightness.width, lightness.height))
    reduced = lightness.resize(scale) if scale < 1 else lightness
    shorter_side = min(reduced.width, reduced.height)
    if shorter_side < LOCAL_MIN_WINDOW:
        return lightness
    window = max(LOCAL_MIN_WINDOW, round(shorter_side * LOCAL_WINDOW_FRACTION))
    eight_bit = (reduced * 2.55).cast("uchar")
    equalised = eight_bit.hist_local(window, window, max_slope=LOCAL_MAX_SLOPE)
    # Small: made once, rather than once for every tile of the full-size picture that reads it.
    change = ((equalised - eight_bit) * (LOCAL_AMOUNT / 2.55)).copy_memory()
    if scale < 1:
        change = change.resize(
            lightness.width / change.width, vscale=lightness.height / change.height, kernel="linear"
        )
    return lightness + change


def _vibrance(chroma_ab: pyvips.Image) -> pyvips.Image:
    chroma = (chroma_ab[0] ** 2 + chroma_ab[1] ** 2) ** 0.5
    boost = (1 - chroma / SATURATED_CHROMA).clamp(min=0, max=1) * CHROMA_BOOST + 1
    return chroma_ab * boost


def _sharpen(lightness: pyvips.Image) -> pyvips.Image:
    return lightness + (lightness - lightness.gaussblur(SHARPEN_SIGMA)) * SHARPEN_AMOUNT


KINDS = (
    OperationKind(
        "enhance",
        "Auto-enhance a dull photo: levels, white balance, local contrast, colour and sharpness.",
        EnhanceParams,
        Stage.AREA,
        enhance,
    ),
)
