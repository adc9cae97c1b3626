"""`watermark`: the text lands where asked, as strong as asked, fits any picture and is never markup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pyvips

from jobs.operations import CATALOGUE, parse_operations
from jobs.ops.base import max_value
from jobs.ops.overlay import MARGIN_FRACTION, WatermarkParams, watermark
from jobs.params import ValidationFailed
from jobs.pipeline import render
from tests import imagegen

POSITIONS = ["centre", "top-left", "top-right", "bottom-left", "bottom-right", "tile"]
CORNERS = ["top-left", "top-right", "bottom-left", "bottom-right"]
LONG_TEXT = ("Copyright Darkroom Estate Agents, all rights reserved. " * 4)[:200]


def grey(width: int = 200, height: int = 120, level: int = 90) -> pyvips.Image:
    return (pyvips.Image.black(width, height, bands=3) + level).cast("uchar").copy(interpretation="srgb")


def mark(image: pyvips.Image, text: str = "WM", **params: Any) -> pyvips.Image:
    return watermark(image, WatermarkParams(text=text, **params))


def changed(before: pyvips.Image, after: pyvips.Image) -> pyvips.Image:
    """255 where any band differs."""
    return ((after.cast("float") - before).abs() > 0).bandor()


def changed_box(before: pyvips.Image, after: pyvips.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels that differ, right and bottom exclusive."""
    columns, rows = changed(before, after).project()
    xs = [x for x, total in enumerate(columns.tolist()[0]) if total > 0]
    ys = [y for y, (total,) in enumerate(rows.tolist()) if total > 0]
    if not xs:
        return None
    return xs[0], ys[0], xs[-1] + 1, ys[-1] + 1


def total_change(before: pyvips.Image, after: pyvips.Image) -> float:
    return float((after.cast("float") - before).abs().avg())


@pytest.mark.parametrize("position", CORNERS)
def test_a_corner_watermark_stays_in_its_corner_off_the_edges(position: str) -> None:
    image = grey()
    margin = round(MARGIN_FRACTION * min(image.width, image.height))

    box = changed_box(image, mark(image, position=position, opacity=1, size=0.1))

    assert box is not None
    left, top, right, bottom = box
    vertical, horizontal = position.split("-")
    if horizontal == "left":
        assert margin <= left and right <= image.width // 2
    else:
        assert image.width // 2 <= left and right <= image.width - margin
    if vertical == "top":
        assert margin <= top and bottom <= image.height // 2
    else:
        assert image.height // 2 <= top and bottom <= image.height - margin


def test_a_centred_watermark_is_centred() -> None:
    image = grey()

    box = changed_box(image, mark(image, position="centre", opacity=1, size=0.2))

    assert box is not None
    left, top, right, bottom = box
    assert abs((left + right) / 2 - image.width / 2) < image.width * 0.05
    assert abs((top + bottom) / 2 - image.height / 2) < image.height * 0.1


def test_a_tiled_watermark_covers_the_whole_picture() -> None:
    image = grey(400, 300)

    marks = changed(image, mark(image, "Darkroom", position="tile", opacity=1))

    for quadrant in ((0, 0), (200, 0), (0, 150), (200, 150)):
        assert marks.crop(*quadrant, 200, 150).max() == 255, f"text in the quadrant at {quadrant}"
    assert marks.avg() / 255 > 0.05


def test_opacity_zero_changes_nothing_and_more_opacity_changes_more() -> None:
    image = imagegen.picture(200, 120).copy_memory()

    assert total_change(image, mark(image, opacity=0, position="tile")) == 0
    changes = [total_change(image, mark(image, opacity=opacity, size=0.2)) for opacity in (0.2, 0.5, 1.0)]
    assert 0 < changes[0] < changes[1] < changes[2]


def test_size_is_the_text_height_against_the_shorter_side() -> None:
    image = grey(400, 200)

    small = changed_box(image, mark(image, "Hg", position="centre", opacity=1, size=0.1))
    large = changed_box(image, mark(image, "Hg", position="centre", opacity=1, size=0.3))

    assert small is not None and large is not None
    small_height, large_height = small[3] - small[1], large[3] - large[1]
    assert small_height <= 0.1 * 200
    assert 2.5 * small_height <= large_height <= 0.3 * 200


def test_text_is_not_markup() -> None:
    image = grey()

    tags = changed_box(image, mark(image, "<b>x</b>", position="top-left", opacity=1, size=0.1))
    plain = changed_box(image, mark(image, "x", position="top-left", opacity=1, size=0.1))
    symbols = changed_box(image, mark(image, "<b>&", position="top-left", opacity=1, size=0.1))

    assert tags is not None and plain is not None and symbols is not None
    assert tags[2] - tags[0] > 4 * (plain[2] - plain[0]), "the tags are drawn as characters"


def test_a_second_line_makes_the_mark_taller() -> None:
    image = grey(300, 300)

    one = changed_box(image, mark(image, "AB", position="centre", opacity=1, size=0.1))
    two = changed_box(image, mark(image, "AB\nCD", position="centre", opacity=1, size=0.1))

    assert one is not None and two is not None
    assert (two[3] - two[1]) > 1.8 * (one[3] - one[1])


@pytest.mark.parametrize("position", ["bottom-left", "top-right", "centre"])
def test_a_long_text_is_scaled_down_to_fit_inside_the_margins(position: str) -> None:
    image = grey(300, 100)
    margin = round(MARGIN_FRACTION * 100)

    box = changed_box(image, mark(image, LONG_TEXT, position=position, opacity=1, size=0.3))

    assert box is not None
    left, _, right, _ = box
    assert margin <= left and right <= image.width - margin


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("size", [(1, 1), (16, 16), (3, 200), (200, 3)])
def test_never_fails_on_a_tiny_picture(position: str, size: tuple[int, int]) -> None:
    image = imagegen.picture(*size).copy_memory()

    marked = mark(image, LONG_TEXT, position=position, opacity=1, size=0.5)

    assert (marked.width, marked.height, marked.bands) == (image.width, image.height, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda picture: picture,
        lambda picture: picture.bandjoin(255),
        lambda picture: picture.colourspace("b-w"),
        lambda picture: picture.colourspace("b-w").bandjoin(255),
        lambda picture: picture.colourspace("rgb16"),
        lambda picture: picture.colourspace("grey16"),
    ],
    ids=["rgb", "rgba", "b-w", "b-w with alpha", "rgb16", "grey16"],
)
def test_keeps_format_and_interpretation_and_draws_full_white(make: Any) -> None:
    image = make(imagegen.picture(120, 80)).copy_memory()

    marked = mark(image, "Hello", position="centre", opacity=1, size=0.3)

    assert (marked.format, marked.interpretation, marked.bands) == (
        image.format,
        image.interpretation,
        image.bands,
    )
    assert (marked.width, marked.height) == (image.width, image.height)
    colour = marked[0]
    assert colour.max() == max_value(image), "solid text at full opacity is white at any depth"


def test_shows_over_transparent_pixels_and_leaves_the_rest_of_the_alpha() -> None:
    """Drawn over the picture: a cut-out's transparent background cannot hide the mark."""
    clear = pyvips.Image.black(200, 120, bands=4).linear(1, [10, 20, 30, 0]).cast("uchar")
    clear = clear.copy(interpretation="srgb")

    marked = mark(clear, position="bottom-right", opacity=0.5, size=0.2)

    text = changed(clear, marked)
    alpha = marked[3]
    assert (text == 0).ifthenelse(alpha, 0).max() == 0, "no alpha away from the text"
    assert 100 <= alpha.max() <= 130, "half opacity gives half alpha where the text is solid"
    assert (text == 0).ifthenelse((marked[:3] - clear[:3]).abs(), 0).max() == 0


def test_draws_in_the_asked_colour() -> None:
    image = grey(level=128)

    marked = mark(image, position="centre", opacity=1, size=0.3, color="#f00")

    text = changed(image, marked)
    red, green = (text == 255).ifthenelse(marked[0], 0), (text == 255).ifthenelse(marked[1], 255)
    assert red.max() == 255 and green.min() == 0


# --- the catalogue's validation ------------------------------------------------------------------------


def watermark_errors(params: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        parse_operations([{"type": "watermark", "params": params}])
    return {error.field.removeprefix("operations[0].params."): error.message for error in caught.value.errors}


def test_in_the_catalogue_with_its_defaults() -> None:
    assert CATALOGUE["watermark"].params_model is WatermarkParams
    (operation,) = parse_operations([{"type": "watermark", "params": {"text": "© Darkroom\nEstate"}}])
    assert operation.to_json() == {
        "type": "watermark",
        "params": {
            "text": "© Darkroom\nEstate",
            "position": "bottom-right",
            "opacity": 0.5,
            "size": 0.05,
            "color": "#ffffff",
        },
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "text"),
        ({"text": ""}, "text"),
        ({"text": "x" * 201}, "text"),
        ({"text": "   \n "}, "text"),
        ({"text": "\u200b\u00a0"}, "text"),
        ({"text": "tab\tseparated"}, "text"),
        ({"text": "half a pair \ud800"}, "text"),
        ({"text": "ok", "position": "middle"}, "position"),
        ({"text": "ok", "opacity": 1.5}, "opacity"),
        ({"text": "ok", "size": 0.6}, "size"),
        ({"text": "ok", "size": 0}, "size"),
        ({"text": "ok", "color": "white"}, "color"),
    ],
)
def test_bad_params_are_refused(params: dict[str, Any], field: str) -> None:
    assert list(watermark_errors(params)) == [field]


# --- through the pipeline --------------------------------------------------------------------------------


def test_renders_from_a_file_after_a_resize(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(grey(800, 480).write_to_buffer(".png"))
    resize = {"type": "resize", "params": {"width": 400}}
    stamp = {"type": "watermark", "params": {"text": "Darkroom", "position": "bottom-right", "opacity": 1}}

    plain = render(source, tmp_path / "plain", parse_operations([resize]), "png")
    marked = render(source, tmp_path / "marked", parse_operations([stamp, resize]), "png")

    before, after = (pyvips.Image.new_from_file(str(result.path)) for result in (plain, marked))
    assert (after.width, after.height) == (400, 240)
    box = changed_box(before, after)
    assert box is not None
    assert box[0] >= 200 and box[1] >= 120, "drawn on the resized picture's bottom-right corner"
