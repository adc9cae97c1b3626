"""HEVC-coded HEIC (phone photos), which libvips cannot decode here, through pillow-heif into the pipeline.

The fixtures are real HEICs encoded by pillow-heif's x265 (see `imagegen.heic`): orientation as iPhones
write it (HEIF transform and EXIF tag both), Display P3, alpha, 10 bits, bursts. The corpus photo is
tested in test_corpus.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pillow_heif
import pytest
import pyvips
from PIL import Image as PillowImage
from PIL import ImageCms

from jobs.operations import parse_operations
from jobs.ops.base import ProcessingError
from jobs.pipeline import configure_libvips, render
from jobs.settings import Settings
from tests import imagegen
from tests.conftest import CORPUS, Partner, run_burst
from tests.pixels import Renderer
from tests.test_pipeline import RESIZE_FIRST, RESIZE_LATER
from tests.test_spine import upload

CHAINS: dict[str, list[dict[str, Any]]] = {
    "no-resize": [],
    "resize": RESIZE_FIRST,
    "resize-later": RESIZE_LATER,
}
PNG = [{"type": "convert", "params": {"format": "png"}}]
IPHONE_PHOTO = CORPUS / "good" / "IMG_5195.HEIC"


@pytest.fixture(autouse=True, scope="module")
def libvips_as_in_the_worker() -> None:
    configure_libvips()


def reference_thumbnail(path: Path, box: int, *, convert_colours: bool = True) -> pyvips.Image:
    """The photo as another stack shows it, without Darkroom's code or libvips' decoding: pillow-heif's
    decode (HEIF transforms applied), LittleCMS from its embedded profile to sRGB, Pillow's Lanczos into
    `box` x `box`. As float pixels, for comparing."""
    heif_file = pillow_heif.open_heif(path)
    picture = heif_file[heif_file.primary_index]
    decoded = picture.to_pillow()
    if convert_colours:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(picture.info["icc_profile"]))
        converted = ImageCms.profileToProfile(decoded, profile, ImageCms.createProfile("sRGB"))
        assert converted is not None
        decoded = converted
    scale = box / max(decoded.size)
    resized = decoded.resize(
        (round(decoded.width * scale), round(decoded.height * scale)), PillowImage.Resampling.LANCZOS
    )
    return pyvips.Image.new_from_memory(resized.tobytes(), *resized.size, 3, "uchar").cast("float")


def mean_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    return float((a.cast("float") - b.cast("float")).abs().avg())


def claiming_size(width: int, height: int) -> bytes:
    """A 64x64 HEIC whose `ispe` box (the size libheif reports before decoding) claims another size.
    Square, and a whole number of coding blocks: no clean-aperture box then crops the claim back."""
    data = imagegen.heic(64, 64)
    at = data.index(b"ispe") + 8  # past the box type and its version and flags
    return data[:at] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[at + 8 :]


def truncated(data: bytes) -> bytes:
    """The HEIC cut halfway through its coded picture (the `mdat` box comes last): its header reads."""
    coded = data.index(b"mdat") + 4
    return data[: (coded + len(data)) // 2]


@pytest.mark.parametrize("chain", list(CHAINS), ids=str)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_iphone_orientation_is_applied_exactly_once(renderer: Renderer, orientation: int, chain: str) -> None:
    operations = CHAINS[chain]
    output = renderer.run(imagegen.heic(64, 48, orientation=orientation), operations, "heif")
    width = 32 if operations else 64
    assert (output.width, output.height) == (width, width * 3 // 4)
    expected = imagegen.picture(64, 48)
    if operations:
        expected = expected.resize(0.5, kernel="linear")
    difference = mean_difference(output, expected)
    assert difference < 6, f"off the upright picture by {difference:.1f}"
    # The red block stays in the top-left corner.
    assert output(1, 1)[0] > 180 and output(1, 1)[1] < 80, output(1, 1)


def test_display_p3_is_converted_to_srgb(renderer: Renderer) -> None:
    output = renderer.run(imagegen.heic(64, 48, display_p3=True), [], "heif")
    assert mean_difference(output, imagegen.picture(64, 48)) < 4
    block = output(4, 4)
    # The block is (220, 30, 30) in sRGB, (202, 54, 43) in P3's numbers: read as sRGB it would be dull.
    assert block[0] > 210 and block[1] < 42, block
    assert not set(output.get_fields()) & {"icc-profile-data", "exif-data"}


@pytest.mark.skipif(not IPHONE_PHOTO.is_file(), reason=f"no {IPHONE_PHOTO}")
def test_iphone_photo_matches_a_reference_decode(renderer: Renderer) -> None:
    """The corpus's iPhone photo (Display P3, tiled) rendered losslessly: 1.1 levels from another stack's
    decode (libvips' thumbnail against Pillow's Lanczos), where unconverted colours are 3.0 off and
    upside down 70."""
    chain = [
        {"type": "resize", "params": {"width": 256, "height": 256}},
        {"type": "convert", "params": {"format": "png"}},
    ]
    output = renderer.run(IPHONE_PHOTO.read_bytes(), chain, "heif").cast("float")
    reference = reference_thumbnail(IPHONE_PHOTO, 256)
    assert (output.width, output.height) == (198, 256)
    assert mean_difference(output, reference) < 1.5
    assert mean_difference(output, reference_thumbnail(IPHONE_PHOTO, 256, convert_colours=False)) > 2.5


def test_alpha_is_kept(renderer: Renderer) -> None:
    output = renderer.run(imagegen.heic(64, 48, alpha=True), PNG, "heif")
    assert output.bands == 4
    assert output(1, 20)[3] < 10 and output(62, 20)[3] > 240


@pytest.mark.parametrize(
    ("bit_depth", "levels"), [(None, "uchar"), (16, "ushort")], ids=["8-bit-out", "16-bit-out"]
)
def test_ten_bit_heic_is_reduced_or_kept_deep(renderer: Renderer, bit_depth: int | None, levels: str) -> None:
    params: dict[str, Any] = {"format": "png"} if bit_depth is None else {"format": "png", "bit_depth": 16}
    output = renderer.run(
        imagegen.heic(64, 48, ten_bit=True), [{"type": "convert", "params": params}], "heif"
    )
    assert output.format == levels
    in_8_bits = output if levels == "uchar" else (output / 257).cast("uchar")
    assert mean_difference(in_8_bits, imagegen.picture(64, 48)) < 4


def test_a_burst_gives_its_primary_picture(renderer: Renderer) -> None:
    output = renderer.run(imagegen.heic(64, 48, frames_before=2), [], "heif")
    assert (output.width, output.height) == (64, 48)
    assert mean_difference(output, imagegen.picture(64, 48)) < 4  # not the black frames before it


@pytest.mark.parametrize("tile_size", [0, 64], ids=["single", "tiled"])
def test_truncated_heic_fails_corrupt_image(renderer: Renderer, tile_size: int) -> None:
    """A tiled one (as iPhones write them) too, whose missing tiles libheif would fill with green."""
    with pytest.raises(ProcessingError) as failure:
        renderer.render(truncated(imagegen.heic(256, 192, tile_size=tile_size)), [], "heif")
    assert failure.value.code == "corrupt_image"
    assert "HEIC" in failure.value.message and str(renderer.directory) not in failure.value.message


def test_pixel_limit_is_checked_from_the_header_before_decoding(renderer: Renderer) -> None:
    """Its coded picture is 64x64, so a decode would fail corrupt_image: the limit answers first."""
    bomb = claiming_size(20_000, 20_000)
    with pytest.raises(ProcessingError) as failure:
        renderer.render(bomb, [], "heif", max_pixels=100_000_000)
    assert failure.value.code == "image_too_large"
    assert "20000x20000" in failure.value.message


def test_memory_limit_is_checked_before_decoding(renderer: Renderer) -> None:
    bomb = claiming_size(8000, 8000)  # 64 MP: within the pixel limit
    source = renderer.directory / "bomb.heic"
    source.write_bytes(bomb)
    with pytest.raises(ProcessingError) as failure:
        render(source, renderer.directory / "out", parse_operations([]), "heif", max_memory=100 * 1024 * 1024)
    assert failure.value.code == "image_too_large"
    assert "memory" in failure.value.message


# --- through the API and a worker ----------------------------------------------------------------------


async def test_heic_upload_completes(client: httpx.AsyncClient, account: Partner, settings: Settings) -> None:
    data = imagegen.heic(64, 48, orientation=6, display_p3=True)
    created = await upload(
        client, account, data, filename="IMG_0001.HEIC", operations=json.dumps(RESIZE_FIRST)
    )
    assert created.status_code == 202, created.text
    declared = created.json()["input"]
    assert (declared["format"], declared["width"], declared["height"]) == ("heif", 64, 48)
    await run_burst(settings)
    image = (await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)).json()
    assert image["status"] == "completed", image
    assert image["output"]["format"] == "jpeg"
    assert (image["output"]["width"], image["output"]["height"]) == (32, 24)


async def test_truncated_heic_upload_ends_corrupt_image(
    client: httpx.AsyncClient, account: Partner, settings: Settings
) -> None:
    created = await upload(client, account, truncated(imagegen.heic(64, 48)), filename="cut.heic")
    assert created.status_code == 202, created.text
    worker = await run_burst(settings)
    assert worker.jobs_failed == 0
    image = (await client.get(f"/v1/images/{created.json()['id']}", headers=account.headers)).json()
    assert image["status"] == "failed"
    assert image["error"]["code"] == "corrupt_image", image["error"]


async def test_heic_claiming_huge_dimensions_is_refused_at_upload(
    client: httpx.AsyncClient, account: Partner
) -> None:
    bomb = claiming_size(20_000, 20_000)
    response = await client.post(
        "/v1/images", headers=account.headers, files={"file": ("bomb.heic", bomb, "image/heic")}
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "image_too_large"


def test_kept_exif_says_upright(renderer: Renderer) -> None:
    """iPhones write the turn twice (HEIF transform, EXIF tag); the decode applies it, so EXIF kept in
    the output must not tell viewers to turn the picture again."""
    keep_exif = [{"type": "convert", "params": {"format": "jpeg", "keep_exif": True}}]
    output = renderer.run(imagegen.heic(64, 48, orientation=6), keep_exif, "heif")
    assert (output.width, output.height) == (64, 48)
    assert output.get_typeof("exif-data")
    assert output.get("orientation") == 1


def test_a_resize_then_a_turn_reads_the_resized_picture_in_any_order(renderer: Renderer) -> None:
    chain = [{"type": "resize", "params": {"width": 32}}, {"type": "rotate", "params": {"angle": 90}}]
    output = renderer.run(imagegen.heic(64, 48, orientation=6), chain, "heif")
    expected = imagegen.picture(64, 48).resize(0.5, kernel="linear").rot90()
    assert mean_difference(output, expected) < 6


def test_contain_pads_with_the_asked_colour_after_the_colour_conversion(renderer: Renderer) -> None:
    """The padding is drawn in sRGB: padded before the conversion from Display P3, #c83232 came out
    (218, 24, 41)."""
    chain = [
        {"type": "resize", "params": {"width": 64, "height": 64, "fit": "contain", "background": "#c83232"}},
        {"type": "convert", "params": {"format": "png"}},
    ]
    output = renderer.run(imagegen.heic(64, 48, display_p3=True), chain, "heif")
    assert (output.width, output.height) == (64, 64)
    assert output(32, 1) == [200, 50, 50]
