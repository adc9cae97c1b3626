"""`enhance`: a dull, cast photo comes out with more contrast and less cast, a good one nearly as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pyvips

from jobs.operations import CATALOGUE, parse_operations
from jobs.ops.enhance import EnhanceParams, enhance
from jobs.params import ValidationFailed
from jobs.pipeline import render
from tests import imagegen
from tests.conftest import CORPUS

# A warm cast as an old tungsten-lit or yellowed scan has: more red and green, less blue.
YELLOW_CAST = (8, 6, -14)


def scene(width: int = 240, height: int = 160) -> pyvips.Image:
    """A plausible photo: a sky gradient over a checked wall, a red and a green object, a dark corner,
    and sensor noise. 8-bit sRGB, full range."""
    x, y = pyvips.Image.xyz(width, height)[0], pyvips.Image.xyz(width, height)[1]
    sky = (40 + y * (150 / height)).bandjoin([90 + y * (120 / height), 200 + x * 0])
    wall = ((x // 12 + y // 12) % 2 == 0).ifthenelse([200, 190, 170], [150, 140, 120])
    picture = (y < height * 0.4).ifthenelse(sky, wall)
    boxes = [
        ((0.1, 0.3, 0.5, 0.8), [200, 40, 40]),
        ((0.5, 0.7, 0.55, 0.9), [40, 160, 60]),
        ((0.8, 1.0, 0.6, 1.0), [20, 25, 30]),
    ]
    for (left, right, top, bottom), colour in boxes:
        inside = (x >= width * left) & (x < width * right) & (y >= height * top) & (y < height * bottom)
        picture = inside.ifthenelse(colour, picture)
    noisy = picture + pyvips.Image.gaussnoise(width, height, sigma=6)
    return noisy.clamp(min=0, max=255).cast("uchar").copy(interpretation="srgb").copy_memory()


def dull(picture: pyvips.Image) -> pyvips.Image:
    """`picture` squeezed into levels 90-160 with a yellow cast: a flat, hazy, badly balanced photo."""
    squeezed = picture * (70 / 255) + 90 + list(YELLOW_CAST)
    return squeezed.clamp(min=0, max=255).cast("uchar").copy(interpretation="srgb").copy_memory()


def luminance_spread(image: pyvips.Image) -> int:
    luminance = image[:3].colourspace("b-w")
    return int(luminance.percent(99) - luminance.percent(1))


def cast(image: pyvips.Image) -> float:
    """How far apart the channel means are: 0 for a grey-balanced picture."""
    means = [image[band].avg() for band in range(3)]
    return max(means) - min(means)


def clipped_fraction(image: pyvips.Image) -> float:
    colour = image[:3]
    at_limit = (colour == 0).bandor() | (colour == 255).bandor()
    return float(at_limit.avg() / 255)


def mean_difference(first: pyvips.Image, second: pyvips.Image) -> float:
    return float((first.cast("float") - second).abs().avg())


@pytest.fixture(scope="module")
def dull_photo() -> pyvips.Image:
    return dull(scene())


def test_a_dull_cast_photo_gets_more_contrast_and_less_cast(dull_photo: pyvips.Image) -> None:
    enhanced = enhance(dull_photo, EnhanceParams())

    assert luminance_spread(enhanced) >= 1.5 * luminance_spread(dull_photo)
    assert cast(enhanced) <= 0.5 * cast(dull_photo)
    assert clipped_fraction(enhanced) <= 0.02


def test_full_strength_does_more_than_the_default(dull_photo: pyvips.Image) -> None:
    default = enhance(dull_photo, EnhanceParams())
    full = enhance(dull_photo, EnhanceParams(strength=1))

    assert luminance_spread(full) > luminance_spread(default)
    assert cast(full) < cast(default)
    assert clipped_fraction(full) <= 0.02


def test_strength_blends_from_the_original(dull_photo: pyvips.Image) -> None:
    untouched = enhance(dull_photo, EnhanceParams(strength=0))
    assert mean_difference(untouched, dull_photo) == 0

    changes = [
        mean_difference(enhance(dull_photo, EnhanceParams(strength=strength)), dull_photo)
        for strength in (0.02, 0.3, 0.6, 1.0)
    ]
    assert changes[0] < 1, "a touch of strength is a touch of change"
    assert changes == sorted(changes) and changes[0] < changes[-1] / 10


def test_a_flat_grey_stays_grey() -> None:
    grey = (pyvips.Image.black(64, 64, bands=3) + 128).cast("uchar").copy(interpretation="srgb")

    enhanced = enhance(grey, EnhanceParams(strength=1))

    assert enhanced.min() >= 125 and enhanced.max() <= 131


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rgb", lambda picture: picture),
        ("rgba", lambda picture: picture.bandjoin(_alpha_ramp(picture))),
        ("b-w", lambda picture: picture.colourspace("b-w")),
        ("b-w with alpha", lambda picture: picture.colourspace("b-w").bandjoin(_alpha_ramp(picture))),
        ("rgb16", lambda picture: picture.colourspace("rgb16")),
        ("rgba16", lambda picture: _sixteen_bit_with_alpha(picture)),
        ("grey16", lambda picture: picture.colourspace("grey16")),
    ],
)
def test_keeps_format_interpretation_size_and_alpha(name: str, make: Any) -> None:
    original = make(dull(scene(96, 64))).copy_memory()

    enhanced = enhance(original, EnhanceParams())

    assert (enhanced.width, enhanced.height, enhanced.bands) == (
        original.width,
        original.height,
        original.bands,
    )
    assert (enhanced.format, enhanced.interpretation) == (original.format, original.interpretation)
    if original.hasalpha():
        alpha = original.bands - 1
        assert (enhanced[alpha] == original[alpha]).min() == 255
    colour = enhanced[:-1] if original.hasalpha() else enhanced
    before = original[:-1] if original.hasalpha() else original
    assert colour.deviate() > 1.3 * before.deviate(), f"{name}: contrast went up"


def test_hidden_colour_under_transparency_does_not_count() -> None:
    """A cut-out product on a transparent background whose hidden pixels are black: the product comes
    out as it would on its own. Were the hidden black measured, it would pass for the photo's shadows
    and drag the balance."""
    photo = dull(scene())
    hidden = pyvips.Image.xyz(photo.width, photo.height)[0] < photo.width // 3
    cut_out = hidden.ifthenelse([0, 0, 0, 0], photo.bandjoin(255)).copy(interpretation="srgb")

    enhanced = enhance(cut_out.copy_memory(), EnhanceParams())

    visible = (photo.width // 3, 0, photo.width - photo.width // 3, photo.height)
    on_its_own = enhance(photo, EnhanceParams()).crop(*visible)
    assert mean_difference(enhanced.crop(*visible)[:3], on_its_own) < 4
    assert (enhanced[3] == cut_out[3]).min() == 255


@pytest.mark.parametrize("size", [(1, 1), (3, 1), (2, 40), (15, 15), (16, 16)])
def test_tiny_pictures(size: tuple[int, int]) -> None:
    picture = imagegen.picture(*size).copy_memory()

    enhanced = enhance(picture, EnhanceParams())

    assert (enhanced.width, enhanced.height, enhanced.format) == (*size, "uchar")


def test_in_the_catalogue_with_bounded_strength() -> None:
    assert CATALOGUE["enhance"].params_model is EnhanceParams
    assert parse_operations([{"type": "enhance"}])[0].params == EnhanceParams(strength=0.6)
    with pytest.raises(ValidationFailed) as caught:
        parse_operations([{"type": "enhance", "params": {"strength": 1.5}}])
    assert [error.field for error in caught.value.errors] == ["operations[0].params.strength"]


# --- through the pipeline: sources open for sequential access can be read once only ----------------


@pytest.mark.parametrize(("suffix", "input_format"), [(".jpg", "jpeg"), (".png", "png")])
@pytest.mark.parametrize(
    "chain",
    [
        [{"type": "enhance"}],
        [{"type": "resize", "params": {"width": 120}}, {"type": "enhance"}],
        [{"type": "enhance", "params": {"strength": 1}}, {"type": "resize", "params": {"width": 120}}],
    ],
    ids=["alone", "after a shrink-on-load resize", "listed before the resize"],
)
def test_renders_from_a_file(
    tmp_path: Path, suffix: str, input_format: str, chain: list[dict[str, Any]]
) -> None:
    source = tmp_path / f"dull{suffix}"
    original = dull(scene())
    original.write_to_file(str(source))

    rendered = render(source, tmp_path / "out", parse_operations(chain), input_format)

    result = pyvips.Image.new_from_file(str(rendered.path))
    expected_width = 120 if len(chain) > 1 else original.width
    assert result.width == expected_width
    reference = original.resize(result.width / original.width)
    assert luminance_spread(result) >= 1.5 * luminance_spread(reference)


# --- real photos: a good photo is not damaged ----------------------------------------------------------

GOOD_PHOTOS = ["Landscape_2.jpg", "jolla.jpg"]


@pytest.mark.parametrize("name", GOOD_PHOTOS)
def test_a_good_photo_keeps_its_brightness(name: str) -> None:
    path = CORPUS / "good" / name
    if not path.is_file():
        pytest.skip(f"no corpus photo {path}")
    photo = pyvips.Image.thumbnail(str(path), 400).colourspace("srgb").copy_memory()

    enhanced = enhance(photo, EnhanceParams())

    assert (enhanced.width, enhanced.height, enhanced.bands) == (photo.width, photo.height, photo.bands)
    assert abs(enhanced.colourspace("b-w").avg() - photo.colourspace("b-w").avg()) < 6
    assert mean_difference(enhanced, photo) < 15, "an enhance, not a different picture"


def _alpha_ramp(picture: pyvips.Image) -> pyvips.Image:
    return (pyvips.Image.xyz(picture.width, picture.height)[0] * (255 / picture.width)).cast("uchar")


def _sixteen_bit_with_alpha(picture: pyvips.Image) -> pyvips.Image:
    alpha = (_alpha_ramp(picture).cast("ushort") * 257).cast("ushort")
    return picture.colourspace("rgb16").bandjoin(alpha).copy(interpretation="rgb16")
