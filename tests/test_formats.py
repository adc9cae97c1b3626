from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs.formats import (
    ImageFormat,
    ImageHeader,
    TooManyPages,
    UnreadableImage,
    read_header,
    sniff_format,
)
from tests import imagegen

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"

needs_avif = pytest.mark.skipif(not imagegen.can_save_avif(), reason="this libvips build cannot encode AV1")


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    brands = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands + b"\x00\x00\x00\x08meta"


def write(directory: Path, data: bytes, name: str = "upload") -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("generator", "expected"),
    [
        (imagegen.jpeg, ImageFormat.JPEG),
        (imagegen.cmyk_jpeg, ImageFormat.JPEG),
        (imagegen.png, ImageFormat.PNG),
        (imagegen.webp, ImageFormat.WEBP),
        (imagegen.gif, ImageFormat.GIF),
        (imagegen.tiff, ImageFormat.TIFF),
        pytest.param(imagegen.avif, ImageFormat.AVIF, marks=needs_avif),
    ],
)
def test_sniffs_generated_images(generator: Callable[[], bytes], expected: ImageFormat) -> None:
    assert sniff_format(generator()[:64]) is expected


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"MM\x00*\x00\x00\x00\x08", ImageFormat.TIFF),
        (b"II+\x00\x08\x00\x00\x00", ImageFormat.TIFF),
        (b"GIF87a\x01\x00\x01\x00", ImageFormat.GIF),
        (ftyp(b"heic", b"mif1", b"heic"), ImageFormat.HEIF),
        (ftyp(b"mif1", b"msf1"), ImageFormat.HEIF),
        (ftyp(b"mif1", b"heic", b"avif"), ImageFormat.AVIF),
        (ftyp(b"avis", b"msf1"), ImageFormat.AVIF),
        (ftyp(b"isom", b"mp41", b"mp42"), None),
        (b"\x00\x00\x00\x08ftypavif", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', None),
        (b"%PDF-1.7\n", None),
        (b"%!PS-Adobe-3.0\n", None),
        (b"\xff\xd8", None),
        (b"", None),
        (imagegen.text_as_jpeg(), None),
    ],
)
def test_sniffs_magic_bytes_only(head: bytes, expected: ImageFormat | None) -> None:
    assert sniff_format(head[:64]) is expected


@pytest.mark.parametrize(
    ("data", "fmt", "expected"),
    [
        (imagegen.jpeg(80, 60), ImageFormat.JPEG, (80, 60, 1)),
        (imagegen.jpeg(80, 60, orientation=6), ImageFormat.JPEG, (60, 80, 1)),
        (imagegen.cmyk_jpeg(50, 40), ImageFormat.JPEG, (50, 40, 1)),
        (imagegen.png(40, 30, alpha=True, sixteen_bit=True), ImageFormat.PNG, (40, 30, 1)),
        (imagegen.webp(40, 30), ImageFormat.WEBP, (40, 30, 1)),
        (imagegen.webp(40, 30, pages=3), ImageFormat.WEBP, (40, 30, 3)),
        (imagegen.gif(40, 30, pages=4), ImageFormat.GIF, (40, 30, 4)),
        (imagegen.tiff(40, 30, pages=2), ImageFormat.TIFF, (40, 30, 2)),
        (imagegen.truncated_jpeg(64, 48), ImageFormat.JPEG, (64, 48, 1)),
    ],
)
def test_reads_headers(tmp_path: Path, data: bytes, fmt: ImageFormat, expected: tuple[int, int, int]) -> None:
    header = read_header(write(tmp_path, data), fmt)

    assert header == ImageHeader(fmt, *expected)


@needs_avif
def test_reads_avif_headers(tmp_path: Path) -> None:
    assert read_header(write(tmp_path, imagegen.avif(40, 30)), ImageFormat.AVIF) == ImageHeader(
        ImageFormat.AVIF, 40, 30, 1
    )


def test_pixels_count_every_page() -> None:
    assert ImageHeader(ImageFormat.GIF, width=10, height=20, pages=3).pixels == 600


def test_declared_size_comes_back_at_once_for_the_caller_to_refuse(tmp_path: Path) -> None:
    path = write(tmp_path, imagegen.png_bomb_header(100_000, 100_000))

    started = time.perf_counter()
    header = read_header(path, ImageFormat.PNG)

    assert time.perf_counter() - started < 0.5
    assert header.pixels == 10_000_000_000


def test_refuses_a_file_libvips_reads_as_another_format(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="jpegload"):
        read_header(write(tmp_path, imagegen.jpeg()), ImageFormat.PNG)


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (imagegen.text_as_jpeg(), ImageFormat.JPEG),
        (imagegen.jpeg()[:200], ImageFormat.JPEG),
        (b"GIF89a\x10\x00\x10\x00", ImageFormat.GIF),
        (imagegen.png()[:30], ImageFormat.PNG),
    ],
)
def test_unreadable_files_give_a_short_message_without_the_path(
    tmp_path: Path, data: bytes, fmt: ImageFormat
) -> None:
    with pytest.raises(UnreadableImage) as raised:
        read_header(write(tmp_path, data), fmt)

    message = raised.value.message
    assert message
    assert "\n" not in message
    assert str(tmp_path) not in message


@needs_avif
def test_messages_leave_out_lines_earlier_loads_left_behind(tmp_path: Path) -> None:
    # libheif's probing leaves "<path>: bad seek" lines in libvips' error buffer even on success.
    read_header(write(tmp_path, imagegen.avif(), "earlier.avif"), ImageFormat.AVIF)

    with pytest.raises(UnreadableImage) as raised:
        read_header(write(tmp_path, b"GIF89a\x10\x00\x10\x00"), ImageFormat.GIF)

    assert raised.value.message == "Unexpected end of GIF source data"


def test_a_reused_path_gets_the_new_file_header(tmp_path: Path) -> None:
    # libvips caches webpload results by file name.
    first = read_header(write(tmp_path, imagegen.webp(40, 30)), ImageFormat.WEBP)
    second = read_header(write(tmp_path, imagegen.webp(20, 10)), ImageFormat.WEBP)

    assert (first.width, second.width) == (40, 20)


def corpus_rows(kind: str) -> list[dict[str, str]]:
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    with manifest.open(newline="") as lines:
        return [row for row in csv.DictReader(lines, delimiter="\t") if row["kind"] == kind]


@pytest.mark.parametrize("row", corpus_rows("good"), ids=lambda row: row["file"])
def test_every_good_corpus_file_sniffs_and_reads(row: dict[str, str]) -> None:
    path = CORPUS / row["file"]
    fmt = sniff_format(path.read_bytes()[:64])
    assert fmt is not None

    header = read_header(str(path), fmt)

    size = re.match(r"(\d+)x(\d+)", row["width_x_height"])
    pages = re.search(r"(\d+) pages", row["width_x_height"])
    assert size is not None
    assert (header.width, header.height) == (int(size[1]), int(size[2]))
    assert header.pages == (int(pages[1]) if pages else 1)


@pytest.mark.parametrize("row", corpus_rows("bad"), ids=lambda row: row["file"])
def test_bad_corpus_files_are_refused_or_give_a_header_quickly(row: dict[str, str]) -> None:
    path = CORPUS / row["file"]
    fmt = sniff_format(path.read_bytes()[:64])
    if fmt is None:
        return

    started = time.perf_counter()
    try:
        read_header(str(path), fmt)
    except UnreadableImage as refused:
        assert str(CORPUS) not in refused.message
    assert time.perf_counter() - started < 0.5


def test_tiff_pages_are_counted_before_libvips_reads_them(tmp_path: Path) -> None:
    path = write(tmp_path, imagegen.many_page_tiff(120_000))
    # "more than": our count stopped at the limit (libvips would have counted all 120,000).
    with pytest.raises(TooManyPages, match="more than 1,000 pages"):
        read_header(path, ImageFormat.TIFF, max_pages=1000)
    for bigtiff in (False, True):
        within = write(tmp_path, imagegen.tiff(8, 8, pages=3, bigtiff=bigtiff))
        assert read_header(within, ImageFormat.TIFF, max_pages=3).pages == 3
        with pytest.raises(TooManyPages, match="more than 2 pages"):
            read_header(within, ImageFormat.TIFF, max_pages=2)


def test_a_tiff_whose_pages_loop_back_is_unreadable(tmp_path: Path) -> None:
    data = bytearray(imagegen.many_page_tiff(3))
    data[-4:] = (16).to_bytes(4, "little")  # the last page's "next" points back to the first
    with pytest.raises(UnreadableImage, match="loop back after 3 pages"):
        read_header(write(tmp_path, bytes(data)), ImageFormat.TIFF, max_pages=1000)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"II+\x00\x08\x00\x00\x00" + (2**64 - 1).to_bytes(8, "little"), id="bigtiff-past-2**63"),
        pytest.param(b"II*\x00" + (2**31).to_bytes(4, "little"), id="classic-past-the-end"),
        pytest.param(b"II*\x00\x08\x00\x00\x00" + (65535).to_bytes(2, "little"), id="entries-past-the-end"),
    ],
)
def test_a_tiff_whose_page_directory_lies_past_its_end_is_unreadable_not_a_crash(
    tmp_path: Path, data: bytes
) -> None:
    with pytest.raises(UnreadableImage):
        read_header(write(tmp_path, data), ImageFormat.TIFF, max_pages=1000)
