from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import pytest
import pyvips

from tests import imagegen


def load(data: bytes, **options: object) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "", **options)


def fields(image: pyvips.Image) -> list[str]:
    return list(image.get_fields())


def largest_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    return float((a - b).abs().max())


def test_jpeg_is_a_baseline_srgb_jpeg_without_metadata() -> None:
    image = load(imagegen.jpeg(80, 60))

    assert image.get("vips-loader") == "jpegload_buffer"
    assert (image.width, image.height, image.bands) == (80, 60, 3)
    assert image.interpretation == "srgb"
    assert image.get("jpeg-multiscan") == 0
    assert "orientation" not in fields(image)
    assert "exif-data" not in fields(image)


def test_progressive_jpeg_has_several_scans() -> None:
    assert load(imagegen.jpeg(progressive=True)).get("jpeg-multiscan") == 1


def test_picture_has_the_red_block_in_the_top_left_corner_only() -> None:
    image = load(imagegen.jpeg(64, 48))

    assert all(abs(got - want) < 8 for got, want in zip(image(4, 3), imagegen.BLOCK_RGB, strict=True))
    for x, y in [(63, 0), (0, 47), (63, 47)]:
        assert image(x, y)[0] < 180


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_jpeg_stores_turned_pixels_that_autorotate_upright(orientation: int) -> None:
    upright = load(imagegen.jpeg(64, 48))
    stored = load(imagegen.jpeg(64, 48, orientation=orientation))

    assert stored.get("orientation") == orientation
    expected_stored_size = (48, 64) if orientation >= 5 else (64, 48)
    assert (stored.width, stored.height) == expected_stored_size
    turned = stored.autorot()
    assert (turned.width, turned.height) == (64, 48)
    assert largest_difference(turned, upright) < 8


def test_jpeg_refuses_an_orientation_exif_cannot_hold() -> None:
    with pytest.raises(ValueError, match="1 to 8"):
        imagegen.jpeg(orientation=9)


@pytest.mark.parametrize(
    ("options", "bands", "band_format", "interpretation", "png_colour_type"),
    [
        ({}, 3, "uchar", "srgb", 2),
        ({"alpha": True}, 4, "uchar", "srgb", 6),
        ({"sixteen_bit": True}, 3, "ushort", "rgb16", 2),
        ({"sixteen_bit": True, "alpha": True}, 4, "ushort", "rgb16", 6),
        ({"palette": True}, 3, "uchar", "srgb", 3),
        ({"palette": True, "alpha": True}, 4, "uchar", "srgb", 3),
    ],
)
def test_png_variants(
    options: dict[str, bool], bands: int, band_format: str, interpretation: str, png_colour_type: int
) -> None:
    data = imagegen.png(40, 30, **options)
    image = load(data)

    assert image.get("vips-loader") == "pngload_buffer"
    assert (image.width, image.height, image.bands) == (40, 30, bands)
    assert (image.format, image.interpretation) == (band_format, interpretation)
    assert data[25] == png_colour_type  # the IHDR colour type byte


def test_png_alpha_makes_the_bottom_right_quarter_transparent() -> None:
    image = load(imagegen.png(40, 30, alpha=True))

    assert image(39, 29)[3] == 0
    assert image(0, 0)[3] == 255


def test_png_refuses_a_sixteen_bit_palette() -> None:
    with pytest.raises(ValueError, match="8-bit"):
        imagegen.png(sixteen_bit=True, palette=True)


def test_cmyk_jpeg_has_four_bands_and_its_profile() -> None:
    image = load(imagegen.cmyk_jpeg(50, 40))

    assert image.get("vips-loader") == "jpegload_buffer"
    assert (image.width, image.height, image.bands) == (50, 40, 4)
    assert image.interpretation == "cmyk"
    assert "icc-profile-data" in fields(image)


@pytest.mark.parametrize(
    ("generator", "loader"),
    [
        (imagegen.webp, "webpload_buffer"),
        (imagegen.gif, "gifload_buffer"),
        (imagegen.tiff, "tiffload_buffer"),
    ],
)
@pytest.mark.parametrize("pages", [1, 3])
def test_paged_formats_hold_the_requested_pages(
    generator: Callable[..., bytes], loader: str, pages: int
) -> None:
    first_page = load(generator(40, 30, pages=pages))
    every_page = load(generator(40, 30, pages=pages), n=-1)

    assert first_page.get("vips-loader") == loader
    assert (first_page.width, first_page.height) == (40, 30)
    # libvips leaves n-pages out for a still WebP
    declared_pages = first_page.get("n-pages") if "n-pages" in fields(first_page) else 1
    assert declared_pages == pages
    assert every_page.height == 30 * pages


def test_lossless_webp_keeps_pixels_exactly() -> None:
    image = load(imagegen.webp(40, 30, lossless=True))

    assert largest_difference(image, imagegen.picture(40, 30)) == 0


@pytest.mark.skipif(not imagegen.can_save_avif(), reason="this libvips build cannot encode AV1")
def test_avif_is_an_avif() -> None:
    data = imagegen.avif(40, 30)
    image = load(data)

    assert data[4:12] == b"ftypavif"
    assert image.get("vips-loader") == "heifload_buffer"
    assert (image.width, image.height, image.bands) == (40, 30, 3)


def test_truncated_jpeg_has_a_readable_header_and_undecodable_pixels() -> None:
    data = imagegen.truncated_jpeg(64, 48)
    image = load(data, fail_on="error")

    assert len(data) < len(imagegen.jpeg(64, 48))
    assert (image.width, image.height) == (64, 48)
    with pytest.raises(pyvips.Error):
        image.avg()


def test_png_bomb_header_is_tiny_with_valid_chunks_and_claims_the_size() -> None:
    data = imagegen.png_bomb_header(100_000, 90_000)

    assert len(data) < 100
    assert [kind for kind, _ in png_chunks(data)] == [b"IHDR", b"IDAT", b"IEND"]
    image = load(data, fail_on="error")
    assert (image.width, image.height) == (100_000, 90_000)
    with pytest.raises(pyvips.Error):
        image.crop(0, 0, 16, 16).avg()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every chunk's type and payload, checking each CRC on the way."""
    chunks = []
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        chunks.append((kind, payload))
        offset += 12 + length
    return chunks


def test_text_as_jpeg_is_not_an_image() -> None:
    data = imagegen.text_as_jpeg()

    assert not data.startswith(b"\xff\xd8")
    with pytest.raises(pyvips.Error):
        load(data)
