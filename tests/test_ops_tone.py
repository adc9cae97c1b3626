"""Tone and colour (adjust, grayscale, background): parameters, visible effect, every pixel layout."""

from __future__ import annotations

from typing import Any

import pytest
import pyvips

from jobs.operations import parse_operations
from jobs.ops.tone import (
    AdjustParams,
    BackgroundParams,
    GrayscaleParams,
    adjust,
    background,
    grayscale,
)
from tests import imagegen
from tests.pixels import (
    LAYOUTS,
    Layout,
    Renderer,
    colour_of,
    field_errors,
    identical,
    in_8_bit_levels,
)


def patch(*values: float, width: int = 8, height: int = 8) -> pyvips.Image:
    """A flat patch: one value is b-w, three are sRGB."""
    image = (pyvips.Image.black(width, height) + list(values)).cast("uchar")
    return image.copy(interpretation="b-w" if len(values) == 1 else "srgb")


def lch_of(image: pyvips.Image) -> list[float]:
    """Mean L*, C and h of a flat sRGB patch."""
    lch = image.colourspace("lch")
    return [lch.extract_band(band).avg() for band in range(3)]


# --- parameters -------------------------------------------------------------------------------------


def test_defaults_change_nothing_by_construction() -> None:
    adjust_op, grayscale_op, background_op = parse_operations(
        [{"type": "adjust"}, {"type": "grayscale", "params": {}}, {"type": "background"}]
    )
    assert adjust_op.params == AdjustParams(brightness=1, contrast=1, saturation=1, gamma=1)
    assert grayscale_op.params == GrayscaleParams()
    assert background_op.params == BackgroundParams(color="#ffffff")


@pytest.mark.parametrize(
    ("operation", "params", "field", "message"),
    [
        ("adjust", {"brightness": -0.1}, "brightness", "must be between 0 and 3"),
        ("adjust", {"brightness": 3.5}, "brightness", "must be between 0 and 3"),
        ("adjust", {"contrast": 4}, "contrast", "must be between 0 and 3"),
        ("adjust", {"saturation": -1}, "saturation", "must be between 0 and 3"),
        ("adjust", {"saturation": "vivid"}, "saturation", "must be a number"),
        ("adjust", {"gamma": 0}, "gamma", "must be between 0.1 and 10"),
        ("adjust", {"gamma": 10.5}, "gamma", "must be between 0.1 and 10"),
        ("adjust", {"hue": 90}, "hue", "unknown parameter"),
        ("grayscale", {"amount": 1}, "amount", "unknown parameter"),
        ("background", {"color": "white"}, "color", "must be a colour like #ffffff"),
        ("background", {"color": "#12345"}, "color", "must be a colour like #ffffff"),
        ("background", {"color": None}, "color", "must not be null"),
    ],
)
def test_bad_parameters_name_their_field(
    operation: str, params: dict[str, Any], field: str, message: str
) -> None:
    assert field_errors([{"type": operation, "params": params}]) == {f"operations[0].params.{field}": message}


def test_short_colours_are_accepted() -> None:
    (operation,) = parse_operations([{"type": "background", "params": {"color": "#0f0"}}])
    assert operation.params == BackgroundParams(color="#0f0")


# --- adjust -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_neutral_adjust_is_the_identity(layout: Layout) -> None:
    image = layout.of(imagegen.picture())
    explicit = AdjustParams(brightness=1, contrast=1, saturation=1, gamma=1)
    result = adjust(image, explicit)
    assert (result.format, result.interpretation, result.bands) == (
        image.format,
        image.interpretation,
        image.bands,
    )
    assert identical(result, image)


def test_brightness_multiplies_every_value() -> None:
    grey = patch(100, 60, 200)
    assert adjust(grey, AdjustParams(brightness=1.5)).getpoint(0, 0) == [150, 90, 255]  # 300 clips to white
    assert adjust(grey, AdjustParams(brightness=0.5)).getpoint(0, 0) == [50, 30, 100]
    assert adjust(grey, AdjustParams(brightness=0)).max() == 0


def test_contrast_stretches_away_from_mid_grey() -> None:
    image = patch(100, 160, 128)
    # (v - 127.5) * 1.5 + 127.5, rounded: darks darker, lights lighter.
    assert adjust(image, AdjustParams(contrast=1.5)).getpoint(0, 0) == [86, 176, 128]
    assert adjust(image, AdjustParams(contrast=0)).getpoint(0, 0) == [128, 128, 128]  # flat grey


def test_gamma_above_one_lightens_mid_tones_and_keeps_black_and_white() -> None:
    x = pyvips.Image.xyz(256, 1)[0]
    ramp = x.bandjoin([x, x]).cast("uchar").copy(interpretation="srgb")
    lighter = adjust(ramp, AdjustParams(gamma=2))
    darker = adjust(ramp, AdjustParams(gamma=0.5))
    assert lighter.getpoint(128, 0)[0] == round(255 * (128 / 255) ** 0.5)
    assert darker.getpoint(128, 0)[0] == round(255 * (128 / 255) ** 2)
    for result in (lighter, darker):
        assert result.getpoint(0, 0) == [0, 0, 0]
        assert result.getpoint(255, 0) == [255, 255, 255]


def test_saturation_scales_chroma_and_keeps_lightness_and_hue() -> None:
    muted = patch(150, 120, 100)  # a skin tone, well inside the gamut
    lightness, chroma, hue = lch_of(muted)
    for factor in (0.5, 1.8):
        new_lightness, new_chroma, new_hue = lch_of(adjust(muted, AdjustParams(saturation=factor)))
        assert new_chroma == pytest.approx(chroma * factor, rel=0.05)
        assert new_lightness == pytest.approx(lightness, abs=0.6)
        assert new_hue == pytest.approx(hue, abs=1)


def test_saturation_zero_greys_out_at_the_same_lightness() -> None:
    blue = patch(40, 60, 200)
    grey = adjust(blue, AdjustParams(saturation=0))
    red, green, blue_band = grey.getpoint(0, 0)
    assert max(red, green, blue_band) - min(red, green, blue_band) <= 1
    # A naive mean of R, G and B would give 100: far lighter than this blue looks.
    assert lch_of(grey)[0] == pytest.approx(lch_of(blue)[0], abs=0.6)


def test_saturation_is_a_no_op_on_greyscale() -> None:
    image = Layout(grey=True, alpha=True).of(imagegen.picture())
    assert identical(adjust(image, AdjustParams(saturation=2.5)), image)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_adjust_is_the_same_in_every_layout_and_keeps_alpha(layout: Layout) -> None:
    params = AdjustParams(brightness=1.1, contrast=1.3, saturation=1.4, gamma=1.2)
    image = layout.of(imagegen.picture())
    result = adjust(image, params)
    assert (result.format, result.interpretation, result.bands) == (
        image.format,
        image.interpretation,
        image.bands,
    )
    if layout.alpha:
        assert identical(result.extract_band(result.bands - 1), image.extract_band(image.bands - 1))
    eight_bit = colour_of(adjust(Layout(layout.grey, layout.alpha).of(imagegen.picture()), params))
    # To within the rounding the 8-bit path does twice (after saturation and after the tone curve).
    difference = (in_8_bit_levels(colour_of(result)) - eight_bit).abs()
    assert difference.avg() < 0.5
    assert difference.max() <= 2.5
    assert (eight_bit.cast("float") - colour_of(Layout(layout.grey).of(imagegen.picture()))).abs().avg() > 5


# --- grayscale --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_grayscale_gives_one_colour_band_of_the_same_depth_and_keeps_alpha(layout: Layout) -> None:
    image = layout.of(imagegen.picture())
    result = grayscale(image, GrayscaleParams())
    assert result.bands == (2 if layout.alpha else 1)
    assert result.format == image.format
    assert result.interpretation == ("grey16" if layout.sixteen_bit else "b-w")
    if layout.alpha:
        assert identical(result.extract_band(1), image.extract_band(image.bands - 1))
    if layout.grey:
        assert identical(result, image)


def test_grayscale_keeps_lightness() -> None:
    for colour in ((220, 30, 30), (40, 60, 200), (128, 128, 128), (250, 240, 90)):
        (grey,) = grayscale(patch(*colour), GrayscaleParams()).getpoint(0, 0)
        assert lch_of(patch(grey, grey, grey))[0] == pytest.approx(lch_of(patch(*colour))[0], abs=0.6), colour


# --- background -------------------------------------------------------------------------------------


def test_background_flattens_transparency_onto_the_colour() -> None:
    image = Layout(alpha=True).of(imagegen.picture(64, 48))  # alpha 0 at the left edge, 255 at the right
    flat = background(image, BackgroundParams(color="#ff0000"))
    assert (flat.bands, flat.format, flat.interpretation) == (3, "uchar", "srgb")
    assert flat.getpoint(0, 30) == [255, 0, 0]
    assert flat.getpoint(63, 30) == image.getpoint(63, 30)[:3]
    half = flat.getpoint(32, 30)
    assert half[0] > image.getpoint(32, 30)[0] and half[2] < image.getpoint(32, 30)[2]


def test_background_on_greyscale_is_the_colours_grey() -> None:
    image = Layout(grey=True, alpha=True).of(imagegen.picture(64, 48))
    flat = background(image, BackgroundParams(color="#00ff00"))
    assert (flat.bands, flat.interpretation) == (1, "b-w")
    assert flat.getpoint(0, 30) == [round(0.7152 * 255)]


def test_background_on_sixteen_bits_uses_sixteen_bit_colour() -> None:
    image = Layout(alpha=True, sixteen_bit=True).of(imagegen.picture(64, 48))
    flat = background(image, BackgroundParams())
    assert (flat.bands, flat.format, flat.interpretation) == (3, "ushort", "rgb16")
    assert flat.getpoint(0, 30) == [65535, 65535, 65535]
    assert flat.getpoint(63, 30) == image.getpoint(63, 30)[:3]


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if not layout.alpha], ids=str)
def test_background_leaves_images_without_alpha_alone(layout: Layout) -> None:
    image = layout.of(imagegen.picture())
    assert background(image, BackgroundParams(color="#123456")) is image


# --- in the pipeline --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["jpeg", "png", "webp"])
def test_grayscale_output_is_a_one_band_file(renderer: Renderer, target: str) -> None:
    operations = [
        {"type": "resize", "params": {"width": 32}},
        {"type": "grayscale"},
        {"type": "convert", "params": {"format": target, "lossless": target == "webp"}},
    ]
    output = renderer.run(imagegen.jpeg(64, 48), operations, "jpeg")
    assert (output.width, output.height) == (32, 24)
    # WebP stores no greyscale: its decoder hands back three equal bands.
    assert output.bands == (3 if target == "webp" else 1)
    if target == "webp":
        red, green, blue = output.getpoint(4, 4)
        assert red == green == blue


def test_background_decides_what_jpeg_shows_through_transparency(renderer: Renderer) -> None:
    operations = [{"type": "background", "params": {"color": "#000080"}}, {"type": "convert"}]
    output = renderer.run(imagegen.png(64, 48, alpha=True), operations, "png")
    assert output.get("vips-loader") == "jpegload_buffer"
    red, green, blue = output.getpoint(60, 44)  # in the transparent quarter: navy, not the default white
    assert red < 10 and green < 10 and 118 < blue < 138


def test_background_then_png_has_no_alpha(renderer: Renderer) -> None:
    operations = [{"type": "background"}, {"type": "convert", "params": {"format": "png"}}]
    output = renderer.run(imagegen.png(64, 48, alpha=True), operations, "png")
    assert output.bands == 3
    assert output.getpoint(60, 44) == [255, 255, 255]


def test_adjust_in_a_chain_brightens_the_output(renderer: Renderer) -> None:
    photo = imagegen.jpeg(64, 48)
    convert = {"type": "convert", "params": {"format": "png"}}
    plain = renderer.run(photo, [convert], "jpeg")
    brighter = renderer.run(photo, [{"type": "adjust", "params": {"brightness": 1.3}}, convert], "jpeg")
    assert brighter.avg() > plain.avg() * 1.2  # x1.3, less what clips at white
