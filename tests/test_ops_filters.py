"""Area filters (sharpen, blur, denoise): their parameters, their visible effect, every pixel layout."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import pyvips

from jobs.operations import parse_operations
from jobs.ops.filters import BlurParams, DenoiseParams, SharpenParams, blur, denoise, sharpen
from tests import imagegen
from tests.pixels import LAYOUTS, Layout, Renderer, colour_of, field_errors, identical, in_8_bit_levels

# --- generators and measures ------------------------------------------------------------------------


def scene(width: int = 64, height: int = 48) -> pyvips.Image:
    """The test picture with dark and light vertical bars (lightness edges) across its bottom half."""
    coordinates = pyvips.Image.xyz(width, height)
    bars = ((coordinates[0] // 6) % 2 == 0).ifthenelse([50, 50, 60], [200, 200, 190])
    lower = coordinates[1] >= height // 2
    return lower.ifthenelse(bars, imagegen.picture(width, height)).cast("uchar").copy(interpretation="srgb")


def with_noise(image: pyvips.Image, sigma: float, seed: int = 7) -> pyvips.Image:
    noise = pyvips.Image.gaussnoise(image.width, image.height, mean=0, sigma=sigma, seed=seed)
    noisy = (image.cast("float") + noise).cast(image.format)  # cast clips to the format's range
    return noisy.copy(interpretation=image.interpretation)


def grey_patch(value: float, width: int = 64, height: int = 64) -> pyvips.Image:
    return (pyvips.Image.black(width, height) + value).cast("uchar").copy(interpretation="b-w")


def hard_edge(dark: int = 60, light: int = 190, size: int = 64) -> pyvips.Image:
    """Left half `dark`, right half `light`: one vertical edge in the middle."""
    x = pyvips.Image.xyz(size, size)[0]
    return (x < size // 2).ifthenelse(dark, light).cast("uchar").copy(interpretation="b-w")


def edge_contrast(image: pyvips.Image) -> float:
    """Mean absolute difference between neighbouring pixels: rises when edges get crisper."""
    values = image.cast("float")
    width, height = values.width, values.height
    across = (values.crop(1, 0, width - 1, height) - values.crop(0, 0, width - 1, height)).abs().avg()
    down = (values.crop(0, 1, width, height - 1) - values.crop(0, 0, width, height - 1)).abs().avg()
    return float(across + down)


def high_frequency(image: pyvips.Image) -> float:
    """Mean absolute detail finer than a 1.5-pixel gaussian: what a blur takes away."""
    values = image.cast("float")
    return float((values - values.gaussblur(1.5, precision="float")).abs().avg())


def steepest_step(image: pyvips.Image) -> float:
    """The biggest jump between neighbouring columns of the column means: a hard edge's height."""
    columns: list[float] = [image.crop(x, 0, 1, image.height).avg() for x in range(image.width)]
    return max(abs(right - left) for left, right in itertools.pairwise(columns))


# --- parameters -------------------------------------------------------------------------------------


def test_defaults() -> None:
    sharpen_op, blur_op, denoise_op = parse_operations(
        [{"type": "sharpen"}, {"type": "blur"}, {"type": "denoise"}]
    )
    assert sharpen_op.params == SharpenParams(sigma=1.0, amount=1.0)
    assert blur_op.params == BlurParams(sigma=2.0)
    assert denoise_op.params == DenoiseParams(level=0.5)


@pytest.mark.parametrize(
    ("operation", "params", "field", "message"),
    [
        ("sharpen", {"sigma": 0.2}, "sigma", "must be between 0.3 and 10"),
        ("sharpen", {"sigma": 11}, "sigma", "must be between 0.3 and 10"),
        ("sharpen", {"amount": -0.5}, "amount", "must be between 0 and 10"),
        ("sharpen", {"amount": 10.5}, "amount", "must be between 0 and 10"),
        ("sharpen", {"amount": "strong"}, "amount", "must be a number"),
        ("sharpen", {"radius": 2}, "radius", "unknown parameter"),
        ("blur", {"sigma": 0}, "sigma", "must be between 0.3 and 100"),
        ("blur", {"sigma": 101}, "sigma", "must be between 0.3 and 100"),
        ("blur", {"sigma": None}, "sigma", "must not be null"),
        ("denoise", {"level": 1.01}, "level", "must be between 0 and 1"),
        ("denoise", {"level": -0.1}, "level", "must be between 0 and 1"),
        ("denoise", {"level": True}, "level", "must be a number"),
    ],
)
def test_bad_parameters_name_their_field(
    operation: str, params: dict[str, Any], field: str, message: str
) -> None:
    assert field_errors([{"type": operation, "params": params}]) == {f"operations[0].params.{field}": message}


def test_integers_are_accepted_for_numbers() -> None:
    (operation,) = parse_operations([{"type": "sharpen", "params": {"sigma": 2, "amount": 3}}])
    assert operation.params == SharpenParams(sigma=2.0, amount=3.0)


# --- sharpen ----------------------------------------------------------------------------------------


def test_sharpen_makes_soft_edges_crisper_and_more_amount_more_so() -> None:
    soft = scene().gaussblur(1.2)
    gentle = sharpen(soft, SharpenParams(amount=1))
    strong = sharpen(soft, SharpenParams(amount=3))
    assert edge_contrast(gentle) > edge_contrast(soft) * 1.05
    assert edge_contrast(strong) > edge_contrast(gentle) * 1.1
    assert high_frequency(gentle) > high_frequency(soft) * 1.1
    assert high_frequency(strong) > high_frequency(gentle) * 1.2


@pytest.mark.parametrize("amount", [1.0, 5.0])
def test_sharpen_keeps_the_overall_brightness(amount: float) -> None:
    soft = scene().gaussblur(1.2)
    sharpened = sharpen(soft, SharpenParams(amount=amount))
    assert abs(sharpened.avg() - soft.avg()) < amount * 0.5


def test_sharpen_gives_a_blurred_edge_back_some_of_its_steepness() -> None:
    crisp = hard_edge(60, 190)
    soft = crisp.gaussblur(1.5)
    deblurred = sharpen(soft, SharpenParams(sigma=1.5, amount=2))
    assert steepest_step(deblurred) > steepest_step(soft) * 1.3
    assert steepest_step(deblurred) < steepest_step(crisp)


def test_sharpen_amount_zero_is_the_identity() -> None:
    image = scene()
    assert sharpen(image, SharpenParams(amount=0)) is image


# --- blur -------------------------------------------------------------------------------------------


def test_blur_removes_fine_detail_more_with_a_bigger_sigma() -> None:
    image = scene()
    light = blur(image, BlurParams(sigma=1))
    heavy = blur(image, BlurParams(sigma=4))
    assert high_frequency(light) < high_frequency(image) * 0.6
    assert high_frequency(heavy) < high_frequency(light) * 0.5
    assert abs(heavy.avg() - image.avg()) < 2


def test_blur_does_not_bleed_the_colour_under_transparent_pixels() -> None:
    # An opaque red square on fully transparent black, as cut-out product photos often are.
    coordinates = pyvips.Image.xyz(32, 32)
    inside = (coordinates[0] >= 8) & (coordinates[0] < 24) & (coordinates[1] >= 8) & (coordinates[1] < 24)
    cutout = inside.ifthenelse([220, 30, 30, 255], [0, 0, 0, 0]).cast("uchar").copy(interpretation="srgb")
    blurred = blur(cutout, BlurParams(sigma=3))
    assert identical(blurred.extract_band(3), cutout.extract_band(3))  # alpha as it was
    edge_pixel = blurred.getpoint(8, 16)
    assert edge_pixel[0] > 210, edge_pixel  # still red, not darkened towards the black underneath
    assert cutout.gaussblur(3).getpoint(8, 16)[0] < 180  # what a plain blur would have shown


# --- denoise ----------------------------------------------------------------------------------------


def test_denoise_smooths_grain_and_keeps_edges_sharper_than_an_equally_smoothing_blur() -> None:
    flat = with_noise(grey_patch(128), sigma=12)
    denoised_flat = denoise(flat, DenoiseParams())
    assert denoised_flat.deviate() < flat.deviate() * 0.25

    # The gaussian that smooths the flat patch just as much (bisection on its sigma)...
    low, high = 0.3, 10.0
    for _ in range(20):
        sigma = (low + high) / 2
        if flat.gaussblur(sigma, precision="float").deviate() > denoised_flat.deviate():
            low = sigma
        else:
            high = sigma
    noisy_edge = with_noise(hard_edge(60, 190), sigma=12)
    # ...smears the edge over several pixels; denoise keeps most of its 130-level step between two columns.
    assert steepest_step(denoise(noisy_edge, DenoiseParams())) > 100
    assert steepest_step(noisy_edge.gaussblur(sigma, precision="float")) < 50


def test_denoise_removes_hot_and_dead_pixels() -> None:
    grain = with_noise(grey_patch(128), sigma=3)
    coordinates = pyvips.Image.xyz(grain.width, grain.height)
    x, y = coordinates[0], coordinates[1]
    # Isolated impulses, as a sensor's hot and dead pixels: white ones and black ones on a 9-pixel grid.
    on_grid = ((x % 9) == 4) & ((y % 9) == 4)
    speckled = on_grid.ifthenelse(((x // 9) % 2 == 0).ifthenelse(255, 0), grain).cast("uchar")
    speckled = speckled.copy(interpretation="b-w")
    cleaned = denoise(speckled, DenoiseParams(level=0.2))
    assert (cleaned.cast("float") - 128).abs().max() < 15, "an impulse (or a smear of one) is left"


def test_denoise_keeps_a_one_pixel_line() -> None:
    # A wire against the sky: a median would erase it, a strong blur would smear it into the sky.
    x = pyvips.Image.xyz(64, 64)[0]
    wire = (x == 32).ifthenelse(40, 160).cast("uchar").copy(interpretation="b-w")
    noisy = with_noise(wire, sigma=5)
    denoised = denoise(noisy, DenoiseParams())
    assert denoised.crop(28, 0, 1, 64).avg() - denoised.crop(32, 0, 1, 64).avg() > 100
    assert denoised.crop(0, 0, 20, 64).deviate() < noisy.crop(0, 0, 20, 64).deviate() * 0.5


def test_denoise_level_sets_the_strength() -> None:
    flat = with_noise(grey_patch(128), sigma=12)
    deviations = [denoise(flat, DenoiseParams(level)).deviate() for level in (0.1, 0.3, 0.6, 1.0)]
    assert deviations == sorted(deviations, reverse=True)
    assert deviations[0] > flat.deviate() * 0.7  # a touch stays a touch
    assert denoise(flat, DenoiseParams(0)) is flat


def test_denoise_leaves_a_clean_picture_nearly_alone() -> None:
    image = imagegen.picture()
    changed = (denoise(image, DenoiseParams()).cast("float") - image).abs()
    assert changed.avg() < 0.5


# --- layouts: 8 and 16 bits, b-w, alpha -------------------------------------------------------------

OPERATIONS = {
    "sharpen": lambda image: sharpen(image, SharpenParams(amount=2)),
    "blur": lambda image: blur(image, BlurParams(sigma=2)),
    "wide blur": lambda image: blur(image, BlurParams(sigma=8)),  # approximated beyond 8 bits
    "denoise": lambda image: denoise(image, DenoiseParams(level=0.7)),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_layout_keeps_format_bands_and_alpha(name: str, layout: Layout) -> None:
    source = layout.of(with_noise(scene(), sigma=6))
    result = OPERATIONS[name](source)
    assert (result.bands, result.format, result.interpretation) == (
        source.bands,
        source.format,
        source.interpretation,
    )
    if layout.alpha:
        assert identical(result.extract_band(result.bands - 1), source.extract_band(source.bands - 1))
    # The same visible effect as on the 8-bit image, to within rounding.
    eight_bit = Layout(layout.grey, layout.alpha).of(with_noise(scene(), sigma=6))
    expected = colour_of(OPERATIONS[name](eight_bit))
    assert (in_8_bit_levels(colour_of(result)) - expected).abs().avg() < 1
    assert (in_8_bit_levels(colour_of(result)) - in_8_bit_levels(colour_of(source))).abs().avg() > 1


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 3)])
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_images_smaller_than_the_windows_still_work(name: str, size: tuple[int, int]) -> None:
    # A `resize` to a width of 1 is a valid chain; the filter must not fail on what it leaves.
    source = Layout(alpha=True).of(imagegen.picture(*size))
    result = OPERATIONS[name](source).copy_memory()
    assert (result.width, result.height, result.bands) == (*size, 4)


# --- in the pipeline --------------------------------------------------------------------------------


def test_resize_sharpen_convert_makes_a_crisper_jpeg_of_the_right_size(renderer: Renderer) -> None:
    photo = bytes(scene(256, 192).write_to_buffer(".png"))
    resize = {"type": "resize", "params": {"width": 128}}
    convert = {"type": "convert", "params": {"format": "jpeg", "quality": 80}}
    plain = renderer.run(photo, [resize, convert], "png")
    sharpened = renderer.run(photo, [resize, {"type": "sharpen"}, convert], "png")
    assert sharpened.get("vips-loader") == "jpegload_buffer"
    assert (sharpened.width, sharpened.height) == (128, 96)
    assert edge_contrast(sharpened) > edge_contrast(plain) * 1.05


def test_area_filters_chain_on_an_alpha_png(renderer: Renderer) -> None:
    operations = [{"type": "denoise"}, {"type": "blur", "params": {"sigma": 1.5}}, {"type": "sharpen"}]
    output = renderer.run(imagegen.png(64, 48, alpha=True), operations, "png")
    assert (output.get("vips-loader"), output.width, output.height, output.bands) == (
        "pngload_buffer",
        64,
        48,
        4,
    )
    assert output.getpoint(63, 47)[3] == 0  # the transparent quarter stays transparent
    assert output.getpoint(1, 1)[3] == 255
