"""Geometry (resize kernels, crop, smart_crop, rotate, flip, upscale, auto_orient): parameters, visible
effect on marker pixels, every pixel layout, and chains through the real pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pyvips

from jobs.operations import CATALOGUE, parse_operations
from jobs.ops.base import ProcessingError, Stage
from jobs.ops.geometry import (
    CropParams,
    FlipParams,
    ResizeParams,
    RotateParams,
    SmartCropParams,
    UpscaleParams,
    crop,
    flip,
    resize,
    rotate,
    smart_crop,
    upscale,
)
from jobs.params import ValidationFailed
from tests import imagegen
from tests.pixels import Renderer, record_held_pictures

GREY = 100
RED = [220.0, 30.0, 30.0]


def field_errors(raw: object) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        parse_operations(raw)
    return {error.field: error.message for error in caught.value.errors}


def marked(width: int = 40, height: int = 30, at: tuple[int, int] = (10, 5), size: int = 1) -> pyvips.Image:
    """Flat grey sRGB with a red pixel (or square) at `at`: where an operation moves it is easy to find."""
    flat = (pyvips.Image.black(width, height, bands=3) + GREY).cast("uchar")
    return flat.draw_rect(RED, at[0], at[1], size, size).copy(interpretation="srgb")


def marker_at(image: pyvips.Image) -> tuple[int, int]:
    """Where the reddest pixel is."""
    redness = image.extract_band(0).cast("int") - image.extract_band(1).cast("int")
    _, x, y = redness.maxpos()
    return int(x), int(y)


def identical(a: pyvips.Image, b: pyvips.Image) -> bool:
    same_shape = (a.width, a.height, a.bands, a.format) == (b.width, b.height, b.bands, b.format)
    return same_shape and (a.cast("int") - b.cast("int")).abs().max() == 0


def mean_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    return float((a.cast("float") - b.cast("float")).abs().avg())


def checkerboard(width: int = 16, height: int = 16) -> pyvips.Image:
    """One-pixel black and white squares: any averaging of neighbours shows up as grey."""
    coordinates = pyvips.Image.xyz(width, height)
    squares = ((coordinates[0] + coordinates[1]) % 2) * 255
    return squares.cast("uchar").bandjoin([squares, squares]).cast("uchar").copy(interpretation="srgb")


def with_patch(
    width: int = 120, height: int = 80, at: tuple[int, int] = (96, 56), size: int = 12
) -> pyvips.Image:
    """Flat mid-grey with one busy black-and-white patch: the only interesting region."""
    coordinates = pyvips.Image.xyz(width, height)
    x, y = coordinates[0], coordinates[1]
    inside = (x >= at[0]) & (x < at[0] + size) & (y >= at[1]) & (y < at[1] + size)
    busy = (((x // 2) + (y // 2)) % 2) * 255
    grey = inside.ifthenelse(busy, 128).cast("uchar")
    return grey.bandjoin([grey, grey]).copy(interpretation="srgb")


def patch_pixels(image: pyvips.Image) -> int:
    """How many pixels of the busy patch (pure black or white) an image holds."""
    band = image.extract_band(0)
    return int(((band < 20) | (band > 235)).avg() / 255 * image.width * image.height + 0.5)


# The pixel layouts operations receive: colour and b-w, with and without alpha, 8 and 16 bits.
LAYOUTS: dict[str, Callable[[pyvips.Image], pyvips.Image]] = {
    "srgb": lambda image: image,
    "srgb+alpha": lambda image: image.bandjoin(255).copy(interpretation="srgb"),
    "b-w": lambda image: image.colourspace("b-w"),
    "b-w+alpha": lambda image: image.colourspace("b-w").bandjoin(255).copy(interpretation="b-w"),
    "rgb16": lambda image: image.colourspace("rgb16"),
    "rgb16+alpha": lambda image: image.colourspace("rgb16").bandjoin(65535).copy(interpretation="rgb16"),
    "grey16": lambda image: image.colourspace("grey16"),
}

OPERATIONS: dict[str, Callable[[pyvips.Image], pyvips.Image]] = {
    "resize-lanczos3": lambda image: resize(image, ResizeParams(width=20)),
    "resize-nearest": lambda image: resize(image, ResizeParams(width=20, kernel="nearest")),
    "resize-linear-cover": lambda image: resize(
        image, ResizeParams(width=20, height=20, fit="cover", kernel="linear")
    ),
    "resize-contain": lambda image: resize(image, ResizeParams(width=20, height=20, fit="contain")),
    "crop": lambda image: crop(image, CropParams(x=4, y=4, width=20, height=10)),
    "crop-percent": lambda image: crop(image, CropParams(x=10, y=10, width=50, height=50, unit="percent")),
    "smart_crop": lambda image: smart_crop(image, SmartCropParams(width=16, height=16)),
    "smart_crop-ratio": lambda image: smart_crop(
        image, SmartCropParams(aspect_ratio="1:1", strategy="entropy")
    ),
    "rotate-90": lambda image: rotate(image, RotateParams(angle=90)),
    "rotate-30": lambda image: rotate(image, RotateParams(angle=30)),
    "flip": lambda image: flip(image, FlipParams(direction="vertical")),
    "upscale": lambda image: upscale(image, UpscaleParams(scale=2)),
}


def png(image: pyvips.Image) -> bytes:
    return bytes(image.write_to_buffer(".png"))


# --- parameters -------------------------------------------------------------------------------------


def test_geometry_kinds_are_in_the_catalogue() -> None:
    for name in ("resize", "crop", "smart_crop", "rotate", "flip", "upscale"):
        assert CATALOGUE[name].stage is Stage.GEOMETRY, name
    assert CATALOGUE["auto_orient"].stage is Stage.LOAD


def test_defaults_fill_in() -> None:
    chain = parse_operations(
        [
            {"type": "crop", "params": {"width": 10, "height": 20}},
            {"type": "smart_crop", "params": {"aspect_ratio": "16:9"}},
            {"type": "rotate", "params": {"angle": 45}},
            {"type": "flip", "params": {"direction": "both"}},
            {"type": "upscale"},
            {"type": "resize", "params": {"width": 10, "kernel": "mitchell"}},
        ]
    )
    assert [operation.params for operation in chain] == [
        CropParams(width=10, height=20, x=0, y=0, unit="px"),
        SmartCropParams(aspect_ratio="16:9", strategy="attention"),
        RotateParams(angle=45, background="#ffffff"),
        FlipParams(direction="both"),
        UpscaleParams(scale=2),
        ResizeParams(width=10, kernel="mitchell"),
    ]
    again = parse_operations([operation.to_json() for operation in chain])
    assert again == chain


@pytest.mark.parametrize(
    ("operation", "params", "field", "message"),
    [
        ("resize", {"width": 10, "kernel": "bicubic"}, "kernel", "must be one of: nearest, linear, cubic"),
        ("crop", {"height": 10}, "width", "is required"),
        ("crop", {"width": 0, "height": 10}, "width", "must be more than 0"),
        ("crop", {"width": 10, "height": -1}, "height", "must be at least 0"),
        ("crop", {"width": 10, "height": 10, "x": -1}, "x", "must be at least 0"),
        ("crop", {"width": 10, "height": 10, "y": 2.5}, "y", "must be a whole number of pixels"),
        ("crop", {"width": 10, "height": 10, "x": 100, "unit": "percent"}, "x", "must be under 100 percent"),
        ("crop", {"width": 101, "height": 10, "unit": "percent"}, "width", "must be at most 100 percent"),
        ("crop", {"width": 10, "height": 10, "unit": "mm"}, "unit", "must be one of: px, percent"),
        ("crop", {"width": 10, "height": 10, "left": 3}, "left", "unknown parameter"),
        ("smart_crop", {}, "width", "give width and height, or aspect_ratio"),
        ("smart_crop", {"width": 10}, "height", "give height with width"),
        ("smart_crop", {"height": 10}, "width", "give width with height"),
        ("smart_crop", {"width": 10, "height": 10, "aspect_ratio": "1:1"}, "aspect_ratio", "not both"),
        ("smart_crop", {"aspect_ratio": "5:4"}, "aspect_ratio", "must be one of: 1:1, 4:3"),
        ("smart_crop", {"aspect_ratio": "1:1", "strategy": "center"}, "strategy", "must be one of"),
        ("smart_crop", {"width": 0, "height": 10}, "width", "must be between 1 and 16384"),
        ("rotate", {}, "angle", "is required"),
        ("rotate", {"angle": "90"}, "angle", "must be a number"),
        ("rotate", {"angle": 90, "background": "red"}, "background", "must be a colour like #ffffff"),
        ("flip", {}, "direction", "is required"),
        ("flip", {"direction": "diagonal"}, "direction", "must be one of: horizontal, vertical, both"),
        ("upscale", {"scale": 3}, "scale", "must be one of: 2, 4, 8"),
        ("upscale", {"scale": "2"}, "scale", "must be one of: 2, 4, 8"),
        ("upscale", {"scale": 2.0}, "scale", "must be one of: 2, 4, 8"),
        ("auto_orient", {"enabled": "no"}, "enabled", "must be true or false"),
    ],
)
def test_bad_parameters_name_their_field(
    operation: str, params: dict[str, Any], field: str, message: str
) -> None:
    errors = field_errors(
        [{"type": "flip", "params": {"direction": "vertical"}}, {"type": operation, "params": params}]
    )
    assert list(errors) == [f"operations[1].params.{field}"]
    assert message in errors[f"operations[1].params.{field}"]


def test_json_nan_is_not_an_angle() -> None:
    assert list(field_errors([{"type": "rotate", "params": {"angle": float("nan")}}])) == [
        "operations[0].params.angle"
    ]


def test_schemas_list_the_choices() -> None:
    assert ResizeParams.json_schema()["properties"]["kernel"]["enum"] == [
        "nearest", "linear", "cubic", "mitchell", "lanczos2", "lanczos3", None,
    ]  # fmt: skip
    assert UpscaleParams.json_schema()["properties"]["scale"] == {
        "type": "integer",
        "enum": [2, 4, 8],
        "default": 2,
    }
    assert RotateParams.json_schema()["required"] == ["angle"]
    assert CropParams.json_schema()["required"] == ["width", "height"]
    assert "3:4" in SmartCropParams.json_schema()["properties"]["aspect_ratio"]["enum"]


# --- resize kernels ---------------------------------------------------------------------------------


def test_nearest_keeps_hard_pixels_where_lanczos3_averages() -> None:
    board = checkerboard(16, 16)
    nearest = resize(board, ResizeParams(width=6, kernel="nearest"))
    smooth = resize(board, ResizeParams(width=6))
    assert (nearest.width, nearest.height) == (smooth.width, smooth.height) == (6, 6)
    # Nearest picks source pixels: only black and white. Lanczos3 averages them to greys.
    assert ((nearest == 0) | (nearest == 255)).min() == 255
    assert ((smooth > 60) & (smooth < 195)).max() == 255


def test_nearest_enlarges_into_exact_blocks() -> None:
    board = checkerboard(3, 3)
    enlarged = resize(board, ResizeParams(width=6, enlarge=True, kernel="nearest"))
    assert identical(enlarged, board.zoom(2, 2))


@pytest.mark.parametrize("kernel", ["nearest", "linear", "cubic", "mitchell", "lanczos2", "lanczos3"])
@pytest.mark.parametrize(
    ("box", "fit", "enlarge"),
    [
        ((33, 33), "inside", False),
        ((33, 33), "cover", False),
        ((33, 33), "contain", False),
        ((33, 40), "fill", False),
        ((33, 33), "outside", False),
        ((300, 300), "inside", True),
        ((300, 130), "cover", True),
        ((21, None), "inside", False),
    ],
)
def test_every_kernel_gives_the_size_shrink_on_load_gives(
    renderer: Renderer, kernel: str, box: tuple[int, int | None], fit: str, enlarge: bool
) -> None:
    """A leading resize with the default kernel goes through libvips' thumbnail on the file; any other
    kernel resamples decoded pixels. Both come out the same size."""
    params: dict[str, Any] = {"width": box[0], "height": box[1], "fit": fit, "enlarge": enlarge}
    source = imagegen.jpeg(131, 77)
    on_load = renderer.run(source, [{"type": "resize", "params": params}], "jpeg")
    with_kernel = renderer.run(source, [{"type": "resize", "params": {**params, "kernel": kernel}}], "jpeg")
    assert (with_kernel.width, with_kernel.height) == (on_load.width, on_load.height)
    assert mean_difference(with_kernel, on_load) < 12


def test_leading_resize_with_another_kernel_resamples_with_it(renderer: Renderer) -> None:
    """Not shrunk on load (thumbnail would resample with lanczos3): the pixels stay black and white."""
    output = renderer.run(
        png(checkerboard(64, 64)), [{"type": "resize", "params": {"width": 20, "kernel": "nearest"}}], "png"
    )
    assert (output.width, output.height) == (20, 20)
    assert ((output == 0) | (output == 255)).min() == 255


def test_resizing_alpha_weighs_colour_by_alpha() -> None:
    """Transparent pixels here are black: averaged in as they are, they would darken the visible edge."""
    coordinates = pyvips.Image.xyz(16, 8)
    opaque = coordinates[0] < 7
    rgb = opaque.ifthenelse([255, 255, 255], [0, 0, 0])
    image = rgb.bandjoin(opaque.ifthenelse(255, 0)).cast("uchar").copy(interpretation="srgb")
    for kernel in ("linear", "lanczos3"):
        smaller = resize(image, ResizeParams(width=8, kernel=kernel))
        visible = smaller.extract_band(3) > 0
        colour = smaller.extract_band(0)
        assert (visible.ifthenelse(colour, 255)).min() > 245, kernel
        assert smaller.extract_band(3).min() == 0 and smaller.extract_band(3).max() == 255


# --- crop -------------------------------------------------------------------------------------------


def test_crop_in_pixels_moves_the_marker() -> None:
    cropped = crop(marked(40, 30, at=(10, 5)), CropParams(x=8, y=4, width=5, height=3))
    assert (cropped.width, cropped.height) == (5, 3)
    assert marker_at(cropped) == (2, 1)
    assert cropped(2, 1) == RED


def test_crop_in_percent_scales_with_the_image() -> None:
    for width, height in ((48, 32), (400, 300)):
        at = (width // 2 + 1, height // 2 + 1)  # just inside the box that starts at 50%
        cropped = crop(
            marked(width, height, at=at), CropParams(x=50, y=50, width=25, height=25, unit="percent")
        )
        assert (cropped.width, cropped.height) == (width // 4, height // 4)
        assert marker_at(cropped) == (1, 1)


def test_a_box_over_the_edge_is_cut_at_the_edge() -> None:
    cropped = crop(marked(40, 30, at=(38, 28)), CropParams(x=35, y=20, width=100, height=100))
    assert (cropped.width, cropped.height) == (5, 10)
    assert marker_at(cropped) == (3, 8)
    in_percent = crop(marked(40, 30), CropParams(x=75, y=0, width=50, height=100, unit="percent"))
    assert (in_percent.width, in_percent.height) == (10, 30)


@pytest.mark.parametrize(("x", "y"), [(40, 0), (0, 30), (500, 500)])
def test_a_box_that_starts_outside_fails(x: int, y: int) -> None:
    with pytest.raises(ProcessingError) as caught:
        crop(marked(40, 30), CropParams(x=x, y=y, width=5, height=5))
    assert caught.value.code == "crop_out_of_bounds"
    assert "40x30" in caught.value.message


def test_an_out_of_bounds_crop_fails_the_render(renderer: Renderer, tmp_path: Path) -> None:
    with pytest.raises(ProcessingError) as caught:
        renderer.run(
            png(marked(40, 30)), [{"type": "crop", "params": {"x": 50, "width": 5, "height": 5}}], "png"
        )
    assert caught.value.code == "crop_out_of_bounds"
    assert not list(tmp_path.glob("out-*"))


# --- smart_crop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["attention", "entropy"])
def test_smart_crop_finds_the_busy_patch(strategy: str) -> None:
    image = with_patch()
    patch = patch_pixels(image)
    assert patch == 144
    box = smart_crop(image, SmartCropParams(width=40, height=40, strategy=strategy))
    assert (box.width, box.height) == (40, 40)
    assert patch_pixels(box) >= 0.9 * patch
    square = smart_crop(image, SmartCropParams(aspect_ratio="1:1", strategy=strategy))
    assert (square.width, square.height) == (80, 80)
    assert patch_pixels(square) == patch


def test_centre_strategy_takes_the_middle() -> None:
    box = smart_crop(with_patch(), SmartCropParams(width=40, height=40, strategy="centre"))
    assert patch_pixels(box) == 0
    assert box.avg() == 128


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [("1:1", (48, 48)), ("4:3", (64, 48)), ("3:4", (36, 48)), ("16:9", (64, 36)), ("9:16", (27, 48)),
     ("3:2", (64, 43)), ("2:3", (32, 48))],
)  # fmt: skip
def test_aspect_ratio_takes_the_largest_box_that_fits(ratio: str, expected: tuple[int, int]) -> None:
    box = smart_crop(imagegen.picture(64, 48), SmartCropParams(aspect_ratio=ratio))
    assert (box.width, box.height) == expected


def test_a_smart_crop_bigger_than_the_image_is_cut_to_it() -> None:
    box = smart_crop(imagegen.picture(64, 48), SmartCropParams(width=100, height=20))
    assert (box.width, box.height) == (64, 20)


def test_smart_crop_is_at_the_images_own_scale() -> None:
    """No resampling: the patch's pixels come out as they were, only fewer of the flat ones."""
    box = smart_crop(with_patch(), SmartCropParams(width=40, height=40))
    band = box.extract_band(0)
    assert ((band == 0) | (band == 128) | (band == 255)).min() == 255


# --- rotate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("angle", "expected"),
    [
        (90, lambda image: image.rot90()),
        (-270, lambda image: image.rot90()),
        (450, lambda image: image.rot90()),
        (180, lambda image: image.rot180()),
        (-90, lambda image: image.rot270()),
        (270.0, lambda image: image.rot270()),
        (0, lambda image: image),
        (720, lambda image: image),
    ],
)
def test_right_angles_turn_pixels_exactly(
    angle: float, expected: Callable[[pyvips.Image], pyvips.Image]
) -> None:
    for layout in LAYOUTS.values():
        image = layout(imagegen.picture(40, 30))
        assert identical(rotate(image, RotateParams(angle=angle)), expected(image)), (
            angle,
            image.interpretation,
        )


def test_rotate_90_is_clockwise() -> None:
    turned = rotate(marked(40, 30, at=(0, 0)), RotateParams(angle=90))
    assert (turned.width, turned.height) == (30, 40)
    assert marker_at(turned) == (29, 0)  # the top-left corner goes to the top right


def test_any_angle_grows_the_canvas_and_fills_the_corners() -> None:
    image = imagegen.picture(40, 40)
    turned = rotate(image, RotateParams(angle=45, background="#00ff00"))
    assert turned.width > 55 and turned.height > 55
    assert turned.format == "uchar" and turned.bands == 3
    for x, y in (
        (0, 0),
        (turned.width - 1, 0),
        (0, turned.height - 1),
        (turned.width - 1, turned.height - 1),
    ):
        assert turned(x, y) == [0.0, 255.0, 0.0], (x, y)
    centre = turned(turned.width // 2, turned.height // 2)
    assert centre[2] == pytest.approx(170, abs=3)  # the picture's blue, not the background


@pytest.mark.parametrize("layout", ["srgb+alpha", "rgb16+alpha"])
def test_alpha_images_get_transparent_corners_and_clean_edges(layout: str) -> None:
    image = LAYOUTS[layout](pyvips.Image.black(40, 40, bands=3).new_from_image([50, 130, 200]).cast("uchar"))
    top = 65535 if image.format == "ushort" else 255
    turned = rotate(image, RotateParams(angle=30, background="#00ff00"))
    assert (turned.bands, turned.format) == (4, image.format)
    assert turned(0, 0)[3] == 0
    assert turned(turned.width // 2, turned.height // 2)[3] == top
    # Weighted by alpha, the pixels fading out along the edges keep the picture's colour: no dark rim
    # and no green from the corners.
    alpha = turned.extract_band(3)
    fading = (alpha > 0.05 * top) & (alpha < 0.95 * top)
    assert fading.max() == 255
    for band, value in enumerate([50, 130, 200]):
        colour = turned.extract_band(band)
        expected = value * top / 255
        assert fading.ifthenelse(colour, expected).min() > expected - 0.02 * top, band
        assert fading.ifthenelse(colour, expected).max() < expected + 0.02 * top, band


def test_sixteen_bit_corners_are_sixteen_bit_white() -> None:
    turned = rotate(imagegen.picture(40, 30).colourspace("rgb16"), RotateParams(angle=30))
    assert (turned.format, turned.interpretation) == ("ushort", "rgb16")
    assert turned(0, 0) == [65535.0, 65535.0, 65535.0]


def test_b_w_corners_are_the_grey_of_the_background() -> None:
    turned = rotate(imagegen.picture(40, 30).colourspace("b-w"), RotateParams(angle=30, background="#00ff00"))
    assert turned.bands == 1
    assert turned(0, 0)[0] == pytest.approx(0.7152 * 255, abs=1)


# --- flip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "expected"), [("horizontal", (29, 5)), ("vertical", (10, 24)), ("both", (29, 24))]
)
def test_flip_mirrors_the_marker(direction: str, expected: tuple[int, int]) -> None:
    flipped = flip(marked(40, 30, at=(10, 5)), FlipParams(direction=direction))  # type: ignore[arg-type]
    assert (flipped.width, flipped.height) == (40, 30)
    assert marker_at(flipped) == expected


# --- upscale ----------------------------------------------------------------------------------------


def edge_image() -> pyvips.Image:
    """A vertical edge between two mid greys, with room for overshoot either side."""
    left = pyvips.Image.xyz(32, 16)[0] < 16
    grey = left.ifthenelse(64, 192).cast("uchar")
    return grey.bandjoin([grey, grey]).copy(interpretation="srgb")


def steepest_step(image: pyvips.Image) -> float:
    row = image.extract_band(0).crop(0, image.height // 2, image.width, 1).cast("int")
    return float((row.crop(1, 0, row.width - 1, 1) - row.crop(0, 0, row.width - 1, 1)).abs().max())


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_upscale_enlarges_and_sharpens_gently(scale: int) -> None:
    image = edge_image()
    enlarged = upscale(image, UpscaleParams(scale=scale))  # type: ignore[arg-type]
    plain = resize(image, ResizeParams(width=32 * scale, enlarge=True))
    assert (enlarged.width, enlarged.height) == (32 * scale, 16 * scale)
    assert steepest_step(enlarged) > 1.1 * steepest_step(plain)
    # Gently: the overshoot beside the edge stays a small part of the edge's height (128).
    assert enlarged.max() - 192 < 32 and 64 - enlarged.min() < 32


def test_upscale_past_the_pixel_limit_is_image_too_large(renderer: Renderer, tmp_path: Path) -> None:
    source = png(imagegen.picture(64, 48))
    allowed = renderer.run(
        source, [{"type": "upscale", "params": {"scale": 4}}], "png", max_pixels=64 * 48 * 16
    )
    assert (allowed.width, allowed.height) == (256, 192)
    with pytest.raises(ProcessingError) as caught:
        renderer.run(source, [{"type": "upscale", "params": {"scale": 8}}], "png", max_pixels=64 * 48 * 16)
    assert caught.value.code == "image_too_large"
    assert len(list(tmp_path.glob("out-*"))) == 1


def test_an_oversized_step_fails_before_the_next_step_reads_its_pixels(
    renderer: Renderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """enhance measures its input in memory: an upscale past the limit must stop the chain first."""
    copies = record_held_pictures(monkeypatch)
    chain = [{"type": "upscale", "params": {"scale": 8}}, {"type": "enhance"}]
    with pytest.raises(ProcessingError) as caught:
        renderer.run(png(imagegen.picture(64, 48)), chain, "png", max_pixels=64 * 48 * 16)
    assert caught.value.code == "image_too_large"
    assert copies == []


# --- every layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_layout_keeps_its_bands_format_and_alpha(layout: str, operation: str) -> None:
    image = LAYOUTS[layout](imagegen.picture(40, 30))
    result = OPERATIONS[operation](image)
    assert (result.bands, result.format, result.interpretation) == (
        image.bands,
        image.format,
        image.interpretation,
    )
    result.copy_memory()  # evaluates: libvips accepts this layout all the way through
    if image.hasalpha() and not operation.startswith(("rotate-30", "resize-contain")):
        assert result.extract_band(image.bands - 1).min() == result.extract_band(image.bands - 1).max()


def test_sixteen_bit_keeps_its_levels() -> None:
    """Not squeezed into 8 bits on the way: a 16-bit picture crops and turns to the same picture."""
    eight = imagegen.picture(40, 30)
    sixteen = eight.colourspace("rgb16")
    for operation in ("crop", "flip", "rotate-90", "resize-nearest"):
        result = OPERATIONS[operation](sixteen)
        assert result.max() > 255, operation
        assert mean_difference(result.colourspace("srgb"), OPERATIONS[operation](eight)) < 1, operation


# --- chains through the pipeline --------------------------------------------------------------------


def test_crop_then_resize(renderer: Renderer) -> None:
    output = renderer.run(
        png(marked(200, 100, at=(150, 60), size=2)),
        [
            {"type": "crop", "params": {"x": 100, "y": 50, "width": 100, "height": 50}},
            {"type": "resize", "params": {"width": 50, "kernel": "nearest"}},
        ],
        "png",
    )
    assert (output.width, output.height) == (50, 25)
    assert marker_at(output) == (25, 5)


def test_crop_coordinates_are_on_the_turned_picture(renderer: Renderer) -> None:
    output = renderer.run(
        png(marked(40, 30, at=(0, 0))),
        [
            {"type": "rotate", "params": {"angle": 90}},
            {"type": "crop", "params": {"x": 20, "y": 0, "width": 10, "height": 10}},
        ],
        "png",
    )
    assert (output.width, output.height) == (10, 10)
    assert marker_at(output) == (9, 0)


def test_smart_crop_through_the_pipeline_finds_the_patch(renderer: Renderer) -> None:
    # 600 px: bigger than libvips keeps of a streaming load, so this needs the random-access load.
    image = with_patch(600, 400, at=(480, 300), size=40)
    output = renderer.run(png(image), [{"type": "smart_crop", "params": {"aspect_ratio": "1:1"}}], "png")
    assert (output.width, output.height) == (400, 400)
    assert patch_pixels(output) == patch_pixels(image)


@pytest.mark.parametrize(
    "operations",
    [
        [{"type": "rotate", "params": {"angle": 90}}],
        [{"type": "rotate", "params": {"angle": 10}}],
        [{"type": "flip", "params": {"direction": "vertical"}}],
        [{"type": "smart_crop", "params": {"width": 300, "height": 300, "strategy": "entropy"}}],
        [{"type": "resize", "params": {"width": 500}}, {"type": "rotate", "params": {"angle": 270}}],
        [
            {"type": "resize", "params": {"width": 500, "kernel": "linear"}},
            {"type": "flip", "params": {"direction": "both"}},
        ],
    ],
    ids=[
        "rotate-90",
        "rotate-10",
        "flip-vertical",
        "smart_crop",
        "shrink-on-load-then-turn",
        "kernel-then-flip",
    ],
)
def test_out_of_order_steps_work_on_photo_sized_jpegs(
    renderer: Renderer, operations: list[dict[str, Any]]
) -> None:
    """A streaming (sequential) load cannot serve turns, vertical flips or smart crops of a big image."""
    output = renderer.run(imagegen.jpeg(900, 640), operations, "jpeg")
    assert output.width > 100 and output.height > 100


# --- auto_orient ------------------------------------------------------------------------------------

ORIENT_CHAINS: dict[str, list[dict[str, Any]]] = {
    "no-resize": [],
    "shrink-on-load": [{"type": "resize", "params": {"width": 300}}],
    "resize-with-kernel": [{"type": "resize", "params": {"width": 300, "kernel": "linear"}}],
    "crop-first": [{"type": "crop", "params": {"x": 0, "y": 0, "width": 300, "height": 225}}],
}


@pytest.mark.parametrize("chain", list(ORIENT_CHAINS))
def test_every_orientation_comes_out_upright(renderer: Renderer, chain: str) -> None:
    """600x450, big enough that turning it upright needs more than a streaming load gives."""
    outputs = [
        renderer.run(imagegen.jpeg(600, 450, orientation=orientation), ORIENT_CHAINS[chain], "jpeg")
        for orientation in range(1, 9)
    ]
    expected = imagegen.picture(600, 450)
    if chain == "crop-first":
        expected = expected.crop(0, 0, 300, 225)
    elif chain != "no-resize":
        expected = expected.resize(0.5, kernel="linear")
    for orientation, output in enumerate(outputs, start=1):
        assert (output.width, output.height) == (expected.width, expected.height), orientation
        assert mean_difference(output, expected) < 4, orientation
        assert output(2, 2)[0] > 180 and output(2, 2)[1] < 80, orientation  # the red block, top left


@pytest.mark.parametrize("chain", ["no-resize", "shrink-on-load", "resize-with-kernel"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_auto_orient_off_keeps_the_stored_pixels(renderer: Renderer, chain: str, orientation: int) -> None:
    """The chains' width (300) is more than the picture's: the resizes leave its size alone."""
    data = imagegen.jpeg(64, 48, orientation=orientation)
    stored = pyvips.Image.new_from_buffer(data, "").copy_memory()
    operations = [{"type": "auto_orient", "params": {"enabled": False}}, *ORIENT_CHAINS[chain]]
    output = renderer.run(data, operations, "jpeg")
    assert (output.width, output.height) == (stored.width, stored.height)
    assert mean_difference(output, stored) < 3
    upright = renderer.run(data, ORIENT_CHAINS[chain], "jpeg")
    if orientation == 3:
        assert mean_difference(upright, stored) > 10
    else:
        assert (upright.width, upright.height) == (stored.height, stored.width)
