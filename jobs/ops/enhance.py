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
# Grey world: a gamma per channel brings the channel means together (a gamma keeps black and white where
# they are, so the balance clips nothing); its strength is capped for genuinely colourful scenes.
BALANCE_MAX_GAMMA = 1.3
# CLAHE on lightness: the window is this fraction of the shorter side; a small slope limit keeps it from
# turning flat walls into noise and halos.
LOCAL_WINDOW_FRACTION = 1 / 8
LOCAL_MAX_SLOPE = 2.0
LOCAL_AMOUNT = 0.6
CHROMA_GAIN = 1.12
SHARPEN_SIGMA = 0.8
SHARPEN_AMOUNT = 1.2


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
    channels = _measure(colour, alpha)
    lab = _levels_and_balance(colour, channels).colourspace("lab")
    lightness = _local_contrast(lab[0], window=max(8, round(min(image.width, image.height) * LOCAL_WINDOW_FRACTION)))
    lab = lightness.bandjoin(lab[1:3] * CHROMA_GAIN).copy(interpretation="lab")
    lab = lab.sharpen(sigma=SHARPEN_SIGMA, m2=SHARPEN_AMOUNT * 3)
    enhanced = lab.colourspace(colour.interpretation)
    blended = (colour + (enhanced - colour) * params.strength).rint()
    if alpha is not None:
        blended = blended.bandjoin(alpha)
    return restore_format(blended, image)


def _measure(colour: pyvips.Image, alpha: pyvips.Image | None) -> list[_Channel]:
    """Percentiles and mean of each channel over the visible pixels (a transparent background's hidden
    colour says nothing about the photo)."""
    eight_bit = colour if colour.format == "uchar" else (colour / 257).cast("uchar")
    weight = (alpha > 0) if alpha is not None else colour[0].new_from_image(1)
    channels = []
    for band in range(colour.bands):
        counts = weight.hist_find_indexed(eight_bit[band]).tolist()[0]
        channels.append(_describe(counts))
    return channels


def _describe(counts: list[float]) -> _Channel:
    total = sum(counts)
    if total == 0:
        return _Channel(0.0, 1.0, 0.5)
    shadow_at, highlight_at = total * SHADOW_PERCENTILE / 100, total * HIGHLIGHT_PERCENTILE / 100
    shadow = highlight = None
    running = 0.0
    for level, count in enumerate(counts):
        running += count
        if shadow is None and running > shadow_at:
            shadow = level
        if highlight is None and running >= highlight_at:
            highlight = level
            break
    mean = sum(level * count for level, count in enumerate(counts)) / total
    return _Channel((shadow or 0) / 255, (highlight if highlight is not None else 255) / 255, mean / 255)


def _levels_and_balance(colour: pyvips.Image, channels: list[_Channel]) -> pyvips.Image:
    """Stretch each channel to full range within limits, then balance the means: a float image on the
    0..255 scale of 8-bit sRGB (or b-w), whatever the input depth."""
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
    target = sum(means) / len(means)
    gammas = [
        min(max(math.log(target) / math.log(mean), 1 / BALANCE_MAX_GAMMA), BALANCE_MAX_GAMMA)
        for mean in means
    ]
    top = max_value(colour)
    normalised = colour.linear([scale / top for scale in scales], offsets).clamp(min=0, max=1)
    interpretation = "b-w" if colour.bands == 1 else "srgb"
    return ((normalised**gammas) * 255).copy(interpretation=interpretation)


def _local_contrast(lightness: pyvips.Image, window: int) -> pyvips.Image:
    """CLAHE on Lab lightness (0..100). libvips' `hist_local` takes 8-bit input, so only its change is
    applied to the float lightness, which keeps 16-bit pictures free of 8-bit steps in smooth areas."""
    eight_bit = (lightness * 2.55).cast("uchar")
    equalised = eight_bit.hist_local(window, window, max_slope=LOCAL_MAX_SLOPE)
    return lightness + (equalised - eight_bit) * (LOCAL_AMOUNT / 2.55)


KINDS = (
    OperationKind(
        "enhance",
        "Auto-enhance a dull photo: levels, white balance, local contrast, colour and sharpness.",
        EnhanceParams,
        Stage.AREA,
        enhance,
    ),
)
