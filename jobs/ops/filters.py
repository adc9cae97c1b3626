"""Area filters: operations that read a neighbourhood of pixels (denoise, sharpen, blur)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pyvips

from jobs.ops.base import OperationKind, Stage, max_value, on_colour_bands, restore_format
from jobs.params import Bounds, Params

# Sharpening overshoot is capped at this fraction of the range either side of the original value: a strong
# `amount` brings out fine detail without hard edges growing glaring halos. Symmetric, so sharpening
# brightens as much as it darkens and the picture's overall brightness stays put.
HALO_LIMIT = 0.2

# Up to this sigma a float gaussian blur is as quick as libvips' approximate one (see `_gaussblur`).
_EXACT_SIGMA = 5.0


@dataclass(frozen=True)
class SharpenParams(Params):
    """An unsharp mask: each pixel moves `amount` times its difference from a gaussian blur of standard
    deviation `sigma` pixels. A larger `sigma` sharpens coarser detail and undoes more blur (deblur); the
    overshoot is capped at a fifth of the range (51 levels of 255) either way."""

    sigma: Annotated[float, Bounds(0.3, 10)] = 1.0
    amount: Annotated[float, Bounds(0, 10)] = 1.0


@dataclass(frozen=True)
class BlurParams(Params):
    """A gaussian blur; `sigma` is its standard deviation in pixels."""

    sigma: Annotated[float, Bounds(0.3, 100)] = 2.0


@dataclass(frozen=True)
class DenoiseParams(Params):
    """Edge-preserving noise reduction. `level` sets how much local variation counts as grain to smooth
    away (a standard deviation of about 25 levels of 255 at the default, 50 at 1); 0 changes nothing."""

    level: Annotated[float, Bounds(0, 1)] = 0.5


def sharpen(image: pyvips.Image, params: SharpenParams) -> pyvips.Image:
    if params.amount == 0:
        return image

    # On each colour band, as Pillow's and Photoshop's unsharp masks work: libvips' own sharpen works on
    # L* and so avoids faint colour fringes, but its LabS round trip costs four times as much as the
    # whole rest of a resize-sharpen-save chain.
    def unsharp(colour: pyvips.Image) -> pyvips.Image:
        halo = HALO_LIMIT * max_value(colour)
        detail = (colour - _gaussblur(colour, params.sigma)) * params.amount
        return restore_format(colour + detail.clamp(min=-halo, max=halo), colour)

    return on_colour_bands(image, unsharp)


def blur(image: pyvips.Image, params: BlurParams) -> pyvips.Image:
    if not image.hasalpha():
        return restore_format(_gaussblur(image, params.sigma), image)
    # The colour under transparent pixels is arbitrary (often black): blurring it as it is would leave a
    # dark fringe around a cut-out. Weighting every neighbour by its alpha (premultiply, blur, divide by
    # the blurred alpha) averages visible colours only; the alpha itself stays as it was.
    top = max_value(image)
    weighted = _gaussblur(image.premultiply(max_alpha=top), params.sigma)
    colour = weighted.unpremultiply(max_alpha=top).extract_band(0, n=image.bands - 1)
    alpha = image.extract_band(image.bands - 1)
    return restore_format(colour, image).bandjoin(alpha)


def _gaussblur(image: pyvips.Image, sigma: float) -> pyvips.Image:
    """libvips blurs 8-bit images with vectorised integer arithmetic, cheap at any sigma. Other formats
    convolve in float, at a cost that grows with the mask: a sigma of 100 takes seconds per megapixel.
    Past a few pixels the box-sum approximation costs the same at any sigma and stays within ~2 levels."""
    if image.format == "uchar":
        return image.gaussblur(sigma)
    return image.gaussblur(sigma, precision="approximate" if sigma > _EXACT_SIGMA else "float")


def denoise(image: pyvips.Image, params: DenoiseParams) -> pyvips.Image:
    if params.level == 0:
        return image
    return on_colour_bands(image, lambda colour: _denoise(colour, params.level))


def _denoise(image: pyvips.Image, level: float) -> pyvips.Image:
    """Two stages with small fixed windows, so the cost per pixel does not grow with the image.

    1. Impulses (hot pixels, salt and pepper) are clamped into the range of their 8 neighbours. A pixel
       of a line, an edge or a corner has neighbours like itself and keeps its value, as it would not
       under a median.
    2. Edge-aware smoothing after the guided filter (He et al.), with the picture as its own guide: in
       each gaussian window, where the local variation is within what `level` allows for noise, pixels
       take the local mean; where it is well beyond (edges, texture) they keep their value.
    """
    top = max_value(image)
    low, high = _neighbour_range(image)
    values = (image < low).ifthenelse(low, (image > high).ifthenelse(high, image)) / top
    sigma = 1 + 1.5 * level

    def local_mean(band: pyvips.Image) -> pyvips.Image:
        return band.gaussblur(sigma, precision="float")

    mean = local_mean(values)
    variance = local_mean(values * values) - mean * mean
    # Half-way between smoothing and keeping where the local standard deviation is `level` x 20% of the
    # range (25 levels of 255 at the default 0.5). Squared, for a steeper switch than the guided
    # filter's variance / (variance + allowance): flat areas come out smoother, edges crisper.
    allowance = (0.2 * level) ** 2
    keep = (variance * variance) / (variance * variance + allowance**2)
    smoothed = local_mean(keep) * values + local_mean((1 - keep) * mean)
    return restore_format(smoothed * top, image)


def _neighbour_range(image: pyvips.Image) -> tuple[pyvips.Image, pyvips.Image]:
    """The lowest and highest value among each pixel's 8 neighbours, band by band."""
    width, height = image.width, image.height
    padded = image.embed(1, 1, width + 2, height + 2, extend="copy")
    first, *others = [
        padded.crop(1 + dx, 1 + dy, width, height) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dx or dy
    ]
    return first.bandrank(others, index=0), first.bandrank(others, index=len(others))


KINDS = (
    OperationKind(
        "sharpen",
        "Unsharp mask on lightness (also covers deblur): `sigma` is the detail size, `amount` the strength.",
        SharpenParams,
        Stage.AREA,
        sharpen,
    ),
    OperationKind(
        "blur", "Gaussian blur of standard deviation `sigma` pixels.", BlurParams, Stage.AREA, blur
    ),
    OperationKind(
        "denoise",
        "Edge-preserving noise reduction (hot pixels and grain) of strength `level` 0 to 1.",
        DenoiseParams,
        Stage.AREA,
        denoise,
    ),
)
