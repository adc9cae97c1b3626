"""jobs.ops.encode: every format saved and decoded, quality and byte budgets, kept metadata, bit depth."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pyvips
from PIL import Image as PillowImage

from jobs.operations import parse_operations
from jobs.ops import encode
from jobs.ops.base import ProcessingError
from jobs.ops.encode import SAVERS, ConvertParams, EncodeFailed
from jobs.params import ValidationFailed
from jobs.pipeline import render
from tests import imagegen

_names = itertools.count()

ORIENTATION_TAG = 0x0112
ARTIST_TAG = 0x013B


def skip_without_avif(output_format: str) -> None:
    if output_format == "avif" and not imagegen.can_save_avif():
        pytest.skip("this libvips build has no AV1 encoder")


def textured(width: int = 128, height: int = 96, *, sigma: float = 12.0) -> pyvips.Image:
    """imagegen's picture with seeded noise: detail like a photo's, so quality changes the size."""
    noise = pyvips.Image.gaussnoise(width, height, sigma=sigma, mean=0, seed=7)
    return (imagegen.picture(width, height) + noise).cast("uchar").copy(interpretation="srgb").copy_memory()


def with_transparent_corner(image: pyvips.Image) -> pyvips.Image:
    """`image` with an alpha band: the bottom-right quarter fully transparent."""
    x, y = pyvips.Image.xyz(image.width, image.height).bandsplit()
    transparent = (x >= image.width // 2) & (y >= image.height // 2)
    return image.bandjoin(transparent.ifthenelse(0, 255).cast("uchar"))


def convert(**params: Any) -> ConvertParams:
    return ConvertParams.parse(params, "params")


def encoded(
    directory: Path, image: pyvips.Image, watch: Callable[[pyvips.Image], None] | None = None, **params: Any
) -> bytes:
    """What `convert` with `params` writes for `image`, through prepare_for_save and save."""
    options = convert(**params)
    output_format = encode.output_format_for("jpeg", options)
    destination = directory / f"out-{next(_names)}{SAVERS[output_format].suffix}"
    prepared = encode.prepare_for_save(image, output_format, options)
    encode.save(prepared, destination, output_format, options, watch=watch)
    return destination.read_bytes()


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "", fail_on="error").copy_memory()


def mean_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    return float((a.cast("float") - b.cast("float")).abs().avg())


def profile_colour_space(image: pyvips.Image) -> bytes:
    """The ICC header's data colour space: b"RGB " or b"GRAY"."""
    return bytes(image.get("icc-profile-data"))[16:20]


def exif_tags(image: pyvips.Image) -> dict[int, Any]:
    blob = bytes(image.get("exif-data"))
    exif = PillowImage.Exif()
    exif.load(blob.removeprefix(b"Exif\x00\x00"))
    return dict(exif)


# --- every format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", list(SAVERS))
def test_every_format_round_trips_colour(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    picture = imagegen.picture(64, 48)
    decoded = decode(encoded(tmp_path, picture, format=output_format))
    assert decoded.get("vips-loader") == imagegen.LOADER_OF_FORMAT[output_format]
    assert (decoded.width, decoded.height, decoded.bands) == (64, 48, 3)
    # GIF quantises to a palette and AVIF is lossy at a low default quality: looser, but the same picture.
    assert mean_difference(decoded, picture) < {"gif": 10, "avif": 10}.get(output_format, 5)


@pytest.mark.parametrize("output_format", ["png", "webp", "avif", "tiff", "gif"])
def test_alpha_survives_where_the_format_has_it(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    decoded = decode(
        encoded(tmp_path, with_transparent_corner(imagegen.picture(64, 48)), format=output_format)
    )
    assert decoded.bands == 4
    assert decoded(60, 44)[3] == 0, "the transparent corner became opaque"
    assert decoded(4, 4)[3] == 255


def test_jpeg_flattens_alpha_onto_white(tmp_path: Path) -> None:
    decoded = decode(encoded(tmp_path, with_transparent_corner(imagegen.picture(64, 48)), format="jpeg"))
    assert decoded.bands == 3
    assert min(decoded(60, 44)) > 245, f"the transparent corner is {decoded(60, 44)}, not white"
    assert decoded(4, 4)[0] > 180 and decoded(4, 4)[1] < 80, "the red block is gone"


@pytest.mark.parametrize("output_format", list(SAVERS))
def test_greyscale_stays_grey(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    grey = imagegen.picture(64, 48).colourspace("b-w")
    decoded = decode(encoded(tmp_path, grey, format=output_format))
    if SAVERS[output_format].has_grey and output_format != "gif":  # libvips reads every GIF as RGB(A)
        assert decoded.bands == 1
    assert mean_difference(decoded.colourspace("b-w")[0], grey) < 5


# --- quality and lossless ---------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_higher_quality_makes_a_bigger_file(tmp_path: Path, output_format: str) -> None:
    image = textured()
    sizes = [len(encoded(tmp_path, image, format=output_format, quality=q)) for q in (5, 30, 60, 95)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes


@pytest.mark.parametrize("output_format", ["png", "tiff", "gif"])
def test_quality_is_ignored_where_the_format_has_none(tmp_path: Path, output_format: str) -> None:
    image = textured()
    low = encoded(tmp_path, image, format=output_format, quality=5)
    assert low == encoded(tmp_path, image, format=output_format, quality=100)


@pytest.mark.parametrize("output_format", ["webp", "avif"])
def test_lossless_keeps_every_pixel(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    image = textured()
    assert mean_difference(decode(encoded(tmp_path, image, format=output_format)), image) > 0.5
    assert mean_difference(decode(encoded(tmp_path, image, format=output_format, lossless=True)), image) == 0


def test_progressive_jpeg_is_interlaced(tmp_path: Path) -> None:
    progressive = encoded(tmp_path, textured(), progressive=True)
    baseline = encoded(tmp_path, textured())
    assert b"\xff\xc2" in progressive, "no SOF2 (progressive DCT) marker"
    assert b"\xff\xc2" not in baseline
    assert decode(progressive).get("interlaced") == 1


def test_progressive_is_a_hint_formats_without_it_ignore(tmp_path: Path) -> None:
    image = textured()
    assert encoded(tmp_path, image, format="webp", progressive=True) == encoded(
        tmp_path, image, format="webp"
    )


# --- max_bytes --------------------------------------------------------------------------------------


def test_byte_budget_picks_the_highest_quality_that_fits(tmp_path: Path) -> None:
    image = textured()
    by_quality = {q: encoded(tmp_path, image, quality=q) for q in range(1, 83)}  # 82: the JPEG default
    budget = len(by_quality[55])
    assert budget >= encode.MIN_BYTE_BUDGET
    within = encoded(tmp_path, image, max_bytes=budget)
    assert len(within) <= budget
    chosen = next(q for q, data in by_quality.items() if data == within)
    assert len(by_quality[chosen + 1]) > budget, f"quality {chosen + 1} also fits {budget} bytes"


def test_a_budget_the_quality_already_meets_changes_nothing(tmp_path: Path) -> None:
    image = textured()
    assert encoded(tmp_path, image, max_bytes=encode.MAX_BYTE_BUDGET) == encoded(tmp_path, image)
    capped = encoded(tmp_path, image, quality=40, max_bytes=encode.MAX_BYTE_BUDGET)
    assert capped == encoded(tmp_path, image, quality=40), "quality is the highest a budget may try"


@pytest.mark.parametrize("output_format", ["jpeg", "webp", "avif"])
def test_a_looser_budget_never_gives_fewer_bytes(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    image = textured(256, 192)
    sizes = [len(encoded(tmp_path, image, format=output_format, quality=q)) for q in (20, 50, 75)]
    budgets = [max(size, encode.MIN_BYTE_BUDGET) for size in sizes]
    results = [len(encoded(tmp_path, image, format=output_format, max_bytes=b)) for b in budgets]
    assert all(result <= budget for result, budget in zip(results, budgets, strict=True)), (results, budgets)
    assert results == sorted(results), (results, budgets)


def test_budget_search_renders_once_and_encodes_at_most_eight_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sequential JPEG source can be read once only: a second render of it would fail outright.
    source = pyvips.Image.new_from_buffer(
        bytes(textured(512, 512, sigma=80).write_to_buffer(".jpg", Q=95)), "", access="sequential"
    )
    renders: list[int] = []
    source.set_progress(True)
    source.signal_connect("preeval", lambda _image, _progress: renders.append(1))
    encodes: list[int] = []
    write_to_buffer = pyvips.Image.write_to_buffer

    def counting(image: pyvips.Image, *args: Any, **kwargs: Any) -> Any:
        encodes.append(1)
        return write_to_buffer(image, *args, **kwargs)

    monkeypatch.setattr(pyvips.Image, "write_to_buffer", counting)
    with pytest.raises(EncodeFailed):  # the worst case: the search goes all the way down
        encoded(tmp_path, source, max_bytes=encode.MIN_BYTE_BUDGET)
    assert len(renders) == 1
    assert 1 < len(encodes) <= 8


def test_unreachable_budget_fails_naming_the_smallest_size(tmp_path: Path) -> None:
    noise = textured(512, 512, sigma=80)
    with pytest.raises(EncodeFailed) as caught:
        encoded(tmp_path, noise, max_bytes=2000)
    assert isinstance(caught.value, ProcessingError), "the pipeline turns ProcessingErrors into failed images"
    assert caught.value.code == "max_bytes_unreachable"
    assert not list(tmp_path.glob("out-*")), "the failed encode wrote a file"
    smallest = len(encoded(tmp_path, noise, quality=1))
    assert f"{smallest:,} bytes" in caught.value.message
    assert "2,000" in caught.value.message


def test_watch_gets_the_pixels_the_search_encodes(tmp_path: Path) -> None:
    """The pipeline's kill switch arms what `watch` receives: killing it stops the search."""
    with pytest.raises(pyvips.Error):
        encoded(tmp_path, textured(), watch=lambda pixels: pixels.set_kill(True), max_bytes=2000)


# --- metadata ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["jpeg", "png", "webp", "avif", "tiff"])
def test_keep_icc_embeds_srgb_and_the_default_embeds_nothing(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    picture = imagegen.picture(64, 48)
    kept = decode(encoded(tmp_path, picture, format=output_format, keep_icc=True))
    assert profile_colour_space(kept) == b"RGB "
    assert not decode(encoded(tmp_path, picture, format=output_format)).get_typeof("icc-profile-data")


@pytest.mark.parametrize(
    ("output_format", "bands", "colour_space"),
    [("jpeg", 1, b"GRAY"), ("png", 1, b"GRAY"), ("tiff", 1, b"GRAY"), ("webp", 3, b"RGB ")],
)
def test_keep_icc_embeds_the_profile_of_the_bands_written(
    tmp_path: Path, output_format: str, bands: int, colour_space: bytes
) -> None:
    grey = imagegen.picture(64, 48).colourspace("b-w")
    kept = decode(encoded(tmp_path, grey, format=output_format, keep_icc=True))
    assert kept.bands == bands
    assert profile_colour_space(kept) == colour_space


def test_keep_icc_replaces_a_profile_the_pixels_are_no_longer_in(tmp_path: Path) -> None:
    """When an embedded profile cannot be applied the pipeline converts without it, and the pixels are
    then sRGB whatever profile the image still carries."""
    picture = imagegen.picture(64, 48).copy()
    picture.set_type(pyvips.GValue.blob_type, "icc-profile-data", pyvips.Image.profile_load("cmyk"))
    assert profile_colour_space(decode(encoded(tmp_path, picture, keep_icc=True))) == b"RGB "


def jpeg_from_a_camera() -> bytes:
    """A JPEG stored on its side, with EXIF orientation 6 and an artist."""
    stored = imagegen.picture(64, 48).rot270().copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", 6)
    stored.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Artist", "Ansel")
    return bytes(stored.write_to_buffer(".jpg", keep="exif"))


@pytest.mark.parametrize("output_format", ["jpeg", "png", "webp", "avif"])
def test_keep_exif_keeps_it_without_a_stale_orientation(tmp_path: Path, output_format: str) -> None:
    skip_without_avif(output_format)
    upright = pyvips.Image.new_from_buffer(jpeg_from_a_camera(), "").autorot()
    kept = decode(encoded(tmp_path, upright, format=output_format, keep_exif=True))
    assert (kept.width, kept.height) == (64, 48)
    tags = exif_tags(kept)
    assert tags[ARTIST_TAG] == "Ansel"
    assert tags.get(ORIENTATION_TAG, 1) == 1, "a viewer would turn the upright pixels again"
    assert not decode(encoded(tmp_path, upright, format=output_format)).get_typeof("exif-data")


# --- bit depth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["png", "tiff"])
def test_sixteen_bits_scale_every_value_exactly(tmp_path: Path, output_format: str) -> None:
    image = with_transparent_corner(imagegen.picture(64, 48))
    decoded = decode(encoded(tmp_path, image, format=output_format, bit_depth=16))
    assert (decoded.format, decoded.interpretation, decoded.bands) == ("ushort", "rgb16", 4)
    assert decoded(4, 4) == [value * 257 for value in image(4, 4)]
    assert decoded(60, 44)[3] == 0 and decoded(4, 4)[3] == 65535


def test_sixteen_bit_grey_png(tmp_path: Path) -> None:
    grey = imagegen.picture(64, 48).colourspace("b-w")
    decoded = decode(encoded(tmp_path, grey, format="png", bit_depth=16))
    assert (decoded.format, decoded.interpretation, decoded.bands) == ("ushort", "grey16", 1)
    assert decoded(30, 30)[0] == grey(30, 30)[0] * 257


@pytest.mark.parametrize("bit_depth", [None, 8])
def test_sixteen_bit_pixels_are_written_8_bit_unless_asked(tmp_path: Path, bit_depth: int | None) -> None:
    picture = imagegen.picture(64, 48)
    deep = (picture.cast("ushort") * 257).cast("ushort").copy(interpretation="rgb16")
    decoded = decode(encoded(tmp_path, deep, format="png", bit_depth=bit_depth))
    assert decoded.format == "uchar"
    assert mean_difference(decoded, picture) == 0


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "jpeg", "lossless": True}, "lossless"),
        ({"format": "gif", "lossless": True}, "lossless"),
        ({"format": "png", "max_bytes": 50_000}, "max_bytes"),
        ({"format": "tiff", "max_bytes": 50_000}, "max_bytes"),
        ({"format": "gif", "max_bytes": 50_000}, "max_bytes"),
        ({"format": "webp", "lossless": True, "max_bytes": 50_000}, "max_bytes"),
        ({"max_bytes": 1023}, "max_bytes"),
        ({"max_bytes": 50 * 1024 * 1024 + 1}, "max_bytes"),
        ({"max_bytes": "1MB"}, "max_bytes"),
        ({"format": "jpeg", "bit_depth": 16}, "bit_depth"),
        ({"format": "webp", "bit_depth": 16}, "bit_depth"),
        ({"format": "png", "bit_depth": 12}, "bit_depth"),
        ({"format": "gif", "keep_icc": True}, "keep_icc"),
        ({"format": "gif", "keep_exif": True}, "keep_exif"),
        ({"format": "tiff", "keep_exif": True}, "keep_exif"),
        ({"keep_exif": "yes"}, "keep_exif"),
    ],
)
def test_invalid_options_name_their_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_operations([{"type": "convert", "params": params}])
    assert [error.field for error in caught.value.errors] == [f"operations[0].params.{field}"]
    assert caught.value.errors[0].message


@pytest.mark.parametrize(
    "params",
    [
        {"format": "png", "lossless": True, "quality": 100, "progressive": True, "bit_depth": 16},
        {"format": "tiff", "bit_depth": 16, "keep_icc": True},
        {"format": "webp", "lossless": True, "keep_icc": True, "keep_exif": True},
        {"format": "avif", "max_bytes": 1024, "quality": 70},
        {"format": "jpeg", "max_bytes": 50 * 1024 * 1024, "bit_depth": 8, "keep_exif": False},
    ],
)
def test_valid_combinations_parse(params: dict[str, Any]) -> None:
    (operation,) = parse_operations([{"type": "convert", "params": params}])
    assert operation.params == ConvertParams(**params)


def test_unset_options_stay_out_of_the_chain_json() -> None:
    (operation,) = parse_operations([{"type": "convert", "params": {"format": "png"}}])
    assert set(operation.to_json()["params"]) == {"format", "lossless", "progressive"}


# --- through the pipeline ---------------------------------------------------------------------------


def render_jpeg(directory: Path, data: bytes, operations: list[dict[str, Any]]) -> Path:
    source = directory / f"in-{next(_names)}"
    source.write_bytes(data)
    return render(source, directory / f"out-{next(_names)}", parse_operations(operations), "jpeg").path


def test_render_meets_a_byte_budget(tmp_path: Path) -> None:
    photo = bytes(textured(512, 384).write_to_buffer(".jpg", Q=95))
    unbounded = render_jpeg(tmp_path, photo, [{"type": "convert", "params": {"format": "webp"}}])
    budget = unbounded.stat().st_size // 2
    bounded = render_jpeg(
        tmp_path, photo, [{"type": "convert", "params": {"format": "webp", "max_bytes": budget}}]
    )
    assert bounded.stat().st_size <= budget
    assert decode(bounded.read_bytes()).width == 512


def test_render_fails_an_unreachable_budget_without_output(tmp_path: Path) -> None:
    noise = bytes(textured(512, 512, sigma=80).write_to_buffer(".jpg", Q=95))
    with pytest.raises(ProcessingError) as caught:
        render_jpeg(tmp_path, noise, [{"type": "convert", "params": {"max_bytes": 1024}}])
    assert caught.value.code == "max_bytes_unreachable"
    assert not list(tmp_path.glob("out-*"))


def test_render_keeps_an_srgb_profile_only_when_asked(tmp_path: Path) -> None:
    # A CMYK source: the pipeline transforms it to sRGB through its profile, which it then must not keep.
    cmyk = imagegen.cmyk_jpeg(64, 48)
    kept = decode(
        render_jpeg(tmp_path, cmyk, [{"type": "convert", "params": {"keep_icc": True}}]).read_bytes()
    )
    assert (kept.bands, profile_colour_space(kept)) == (3, b"RGB ")
    stripped = decode(render_jpeg(tmp_path, cmyk, [{"type": "convert"}]).read_bytes())
    assert not stripped.get_typeof("icc-profile-data")


def test_render_keeps_the_orientation_of_pixels_left_unturned(tmp_path: Path) -> None:
    """With auto_orient off the pixels stay as stored, so the kept EXIF must still say how to turn them."""
    data = jpeg_from_a_camera()
    chain: list[dict[str, Any]] = [{"type": "convert", "params": {"keep_exif": True}}]
    upright = decode(render_jpeg(tmp_path, data, chain).read_bytes())
    assert (upright.width, exif_tags(upright).get(ORIENTATION_TAG, 1)) == (64, 1)
    unturned = decode(
        render_jpeg(
            tmp_path, data, [{"type": "auto_orient", "params": {"enabled": False}}, *chain]
        ).read_bytes()
    )
    assert (unturned.width, exif_tags(unturned)[ORIENTATION_TAG]) == (48, 6)
