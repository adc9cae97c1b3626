"""The photos every benchmark works on (the corpus' real JPEGs when present, else generated ones), and
how a benchmark pushes them through a thread pool."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pillow_heif
import pyvips

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
MIN_PIXELS = 2_000_000


def corpus_jpegs(min_pixels: int = MIN_PIXELS) -> list[Path]:
    """The corpus' good JPEGs of at least `min_pixels` (none when the corpus is absent)."""
    good = CORPUS / "good"
    if not good.is_dir():
        return []
    found = []
    for path in sorted(good.iterdir()):
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            continue
        header = pyvips.Image.new_from_file(str(path))
        # ultra-hdr.jpg loads through libvips' uhdrload: still a JPEG file, as Darkroom sniffs it.
        if header.width * header.height >= min_pixels:
            found.append(path)
    return found


def generated_jpegs(directory: Path, width: int = 2048, height: int = 1536, count: int = 6) -> list[Path]:
    """Photo-like JPEGs (q90): noise over gradients compresses and decodes like a photo, not a test card."""
    directory.mkdir(parents=True, exist_ok=True)
    photos = []
    for index in range(count):
        base = pyvips.Image.xyz(width, height)[0].linear(2048 / width * 0.1, 20 * index)
        noisy = (base + pyvips.Image.gaussnoise(width, height, sigma=40, mean=0)).cast("uchar")
        image = noisy.bandjoin([noisy.rot180().resize(1), noisy.flipver()]).copy(interpretation="srgb")
        path = directory / f"generated-{width}x{height}-{index}.jpg"
        image.jpegsave(str(path), Q=90)
        photos.append(path)
    return photos


def find_photos(generated_dir: Path, source: str = "corpus") -> tuple[list[Path], str]:
    """`source` "corpus": the corpus' photos of ≥ 2 MP, else generated 2048x1536 JPEGs.
    "tiny": 64x48 JPEGs, so what is measured is the work around the pixels.
    "2k": 2048x1365 JPEGs q85 (the 2K photo of imgproxy's published benchmark), cut from the corpus'
    photos so they hold real photo content, else generated."""
    if source == "tiny":
        return generated_jpegs(generated_dir, 64, 48), "generated 64x48 JPEGs (pixel work near zero)"
    found = corpus_jpegs()
    if source == "corpus":
        if found:
            return found, str(CORPUS / "good")
        return generated_jpegs(generated_dir), "generated 2048x1536 JPEGs"
    if not found:
        return generated_jpegs(generated_dir, 2048, 1365), "generated 2048x1365 JPEGs"
    generated_dir.mkdir(parents=True, exist_ok=True)
    photos = []
    for path in found:
        two_k = generated_dir / f"2k-{path.stem}.jpg"
        pyvips.Image.thumbnail(str(path), 2048, height=1365, crop="centre", size="force").jpegsave(
            str(two_k), Q=85, keep=pyvips.enums.ForeignKeep.NONE
        )
        photos.append(two_k)
    return photos, "the corpus' photos cut to 2048x1365, JPEG q85"


def heic_photo(directory: Path) -> tuple[Path, str]:
    """The corpus' iPhone HEIC (8.5 MP, Display P3, tiled), else a generated 4032x3024 HEIC (an iPhone's
    12 MP; pillow-heif's x265, q80) of the photo-like content `generated_jpegs` draws."""
    iphone = CORPUS / "good" / "IMG_5195.HEIC"
    if iphone.is_file():
        return iphone, str(iphone)
    drawn = pyvips.Image.new_from_file(str(generated_jpegs(directory, 4032, 3024, count=1)[0]))
    path = directory / "generated-4032x3024.heic"
    pillow_heif.from_bytes("RGB", (drawn.width, drawn.height), drawn.write_to_memory()).save(path, quality=80)
    return path, "a generated 4032x3024 HEIC"


def megapixels(path: Path) -> float:
    header = pyvips.Image.new_from_file(str(path))
    pixels: int = header.width * header.height
    return round(pixels / 1e6, 1)


def images_per_second(
    task: Callable[[Path, Path], object], sequence: Sequence[Path], out_dir: Path, threads: int
) -> float:
    """`task(photo, destination)` for every photo of `sequence` through a pool of `threads`. Outputs
    take turns over a few names, so the page cache holds the same few files however long the run."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(task, photo, out_dir / f"{threads}-{index % 16}.jpg")
            for index, photo in enumerate(sequence)
        ]
        for job in jobs:
            job.result()
    return len(sequence) / (time.perf_counter() - started)
