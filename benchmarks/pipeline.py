"""Darkroom's pipeline against raw pyvips and against Pillow, on the same photos in the same run.

    python benchmarks/pipeline.py [--rounds 3] [--repeat 4] [--threads 1,2,4]

Three implementations of one chain — resize to 512 px wide, sharpen, JPEG q80 — run in this process:

- `darkroom`: `jobs.pipeline.render` with `[resize {width: 512}, sharpen {}, convert {jpeg, q80}]`, as the
  worker runs it (auto-orient, sRGB, metadata stripped, optimised Huffman tables);
- `pyvips`: the libvips calls that chain comes down to, written by hand (the overhead goal: ≤ 10 %);
- `pillow_thumbnail`: a Pillow script that knows its craft: `thumbnail` (which draft-decodes JPEGs at
  a reduced scale, Pillow's shrink-on-load), `exif_transpose`, `UnsharpMask`, `save(quality=80,
  optimize=True)`;
- `pillow_resize`: the Pillow script most people write: full decode, `exif_transpose`, `resize`
  (LANCZOS), the same sharpen and save.
The goals: overhead vs `pyvips` ≤ 10 %; Darkroom ≥ 2x Pillow's throughput at ≤ half its peak RSS.

Throughput: each implementation through a thread pool of each --threads count, --rounds rounds taking
turns; the best thread count's median counts. Peak RSS: each implementation in a fresh Python process
working through the photos with 2 threads; `peak_rss_mb` is the process's high-water mark and
`peak_growth_mb` its growth over the same process after imports (what the work itself costs).

HEIC (`--heic-only` runs just this): the same chain on an iPhone HEIC, which Darkroom decodes with
pillow-heif, against the same done by hand with Pillow and pillow-heif (decode, LittleCMS from the
photo's Display P3 profile to sRGB as Darkroom converts it, resize, sharpen, save): seconds per image,
one at a time and --repeat times each round, and each one's peak RSS in a fresh process.

Also: the giant 280 MP grayscale JPEG of the corpus (bad/giant-image.jpg) rendered with the pixel cap
lifted, each chain in a fresh process: peak RSS (the goal: ≤ 300 MB).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pillow_heif
import pyvips
from photos import CORPUS, find_photos, heic_photo, images_per_second, megapixels
from PIL import Image, ImageCms, ImageFilter, ImageOps

from jobs.operations import parse_operations
from jobs.pipeline import configure_libvips, render

WIDTH = 512
QUALITY = 80
SHARPEN_SIGMA = 1.0
CHAIN = [
    {"type": "resize", "params": {"width": WIDTH}},
    {"type": "sharpen", "params": {"sigma": SHARPEN_SIGMA}},
    {"type": "convert", "params": {"format": "jpeg", "quality": QUALITY}},
]
GIANT = CORPUS / "bad" / "giant-image.jpg"
GIANT_CHAINS: dict[str, list[dict[str, Any]]] = {
    "resize_2048_sharpen_jpeg": [
        {"type": "resize", "params": {"width": 2048}},
        {"type": "sharpen", "params": {"sigma": SHARPEN_SIGMA}},
        {"type": "convert", "params": {"format": "jpeg", "quality": QUALITY}},
    ],
    "full_size_jpeg": [{"type": "convert", "params": {"format": "jpeg", "quality": QUALITY}}],
    "full_size_sharpen_png": [
        {"type": "sharpen", "params": {"sigma": SHARPEN_SIGMA}},
        {"type": "convert", "params": {"format": "png"}},
    ],
}


# --- the three implementations -------------------------------------------------------------------------


def darkroom_task(source: Path, destination: Path) -> None:
    render(source, destination.with_suffix(""), parse_operations(CHAIN), "jpeg")


def pyvips_task(source: Path, destination: Path) -> None:
    # What `render` runs for this chain: thumbnail (shrink-on-load, auto-rotate), the sharpen operation's
    # libvips call, and the service's JPEG encoder settings.
    image = pyvips.Image.thumbnail(str(source), WIDTH, height=10_000_000, size="down", fail_on="error")
    detail = image - image.gaussblur(SHARPEN_SIGMA)  # sharpen's unsharp mask, amount 1, halo cap 51
    image = (image + detail.clamp(min=-51, max=51)).rint().cast("uchar")
    image.jpegsave(str(destination), Q=QUALITY, keep=pyvips.enums.ForeignKeep.NONE, optimize_coding=True)


def pillow_thumbnail_task(source: Path, destination: Path) -> None:
    # `thumbnail` first asks the JPEG decoder for a reduced scale (draft mode): Pillow's shrink-on-load.
    with Image.open(source) as opened:
        opened.thumbnail((WIDTH, 10_000_000), Image.Resampling.LANCZOS)
        image = ImageOps.exif_transpose(opened).convert("RGB")
    _pillow_sharpen_and_save(image, destination)


def pillow_resize_task(source: Path, destination: Path) -> None:
    # The script most people write: decode at full size, turn upright, resize.
    with Image.open(source) as opened:
        upright = ImageOps.exif_transpose(opened).convert("RGB")
    height = round(upright.height * WIDTH / upright.width)
    _pillow_sharpen_and_save(upright.resize((WIDTH, height), Image.Resampling.LANCZOS), destination)


def darkroom_heic_task(source: Path, destination: Path) -> None:
    render(source, destination.with_suffix(""), parse_operations(CHAIN), "heif")


def pillow_heif_task(source: Path, destination: Path) -> None:
    heif_file = pillow_heif.open_heif(source)
    picture = heif_file[heif_file.primary_index]
    image = picture.to_pillow()  # upright: libheif applies the HEIF transforms
    if picture.info.get("icc_profile"):
        profile = ImageCms.ImageCmsProfile(io.BytesIO(picture.info["icc_profile"]))
        converted = ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"))
        assert converted is not None
        image = converted
    height = round(image.height * WIDTH / image.width)
    _pillow_sharpen_and_save(image.resize((WIDTH, height), Image.Resampling.LANCZOS), destination)


def _pillow_sharpen_and_save(image: Image.Image, destination: Path) -> None:
    image = image.filter(ImageFilter.UnsharpMask(radius=2 * SHARPEN_SIGMA, percent=100, threshold=0))
    image.save(destination, "JPEG", quality=QUALITY, optimize=True)


TASKS: dict[str, Callable[[Path, Path], None]] = {
    "darkroom": darkroom_task,
    "pyvips": pyvips_task,
    "pillow_thumbnail": pillow_thumbnail_task,
    "pillow_resize": pillow_resize_task,
}
HEIC_TASKS: dict[str, Callable[[Path, Path], None]] = {
    "darkroom_heic": darkroom_heic_task,
    "pillow_heif": pillow_heif_task,
}


# --- measuring -----------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. (Not getrusage's ru_maxrss: Linux carries that across exec,
    so a child started from a big parent would report the parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(argv: Sequence[str]) -> dict[str, Any]:
    """Run this script in a fresh process (`--child ...`) and read the JSON it prints."""
    completed = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False, timeout=600
    )
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1:] or [f"exit {completed.returncode}"]}
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def _peak(measured: dict[str, Any]) -> float:
    return float(measured.get("peak_rss_mb", float("nan")))


def run_child(args: argparse.Namespace) -> None:
    if not args.child.startswith("pillow"):
        configure_libvips()
    baseline = peak_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="darkroom-bench-child-"))
    started = time.perf_counter()
    if args.child == "giant":
        chain = parse_operations(GIANT_CHAINS[args.chain])
        rendered = render(GIANT, out / "giant", chain, "jpeg", max_pixels=None)
        detail: dict[str, Any] = {"output": f"{rendered.width}x{rendered.height} {rendered.format}"}
    else:
        photos = [Path(path) for path in args.photos]
        images_per_second((TASKS | HEIC_TASKS)[args.child], photos, out, 2)
        detail = {"images": len(photos)}
    elapsed = time.perf_counter() - started
    peak = peak_rss_mb()
    for leftover in out.iterdir():
        leftover.unlink()
    out.rmdir()
    print(
        json.dumps(
            {
                "peak_rss_mb": round(peak, 1),
                "after_imports_mb": round(baseline, 1),
                "peak_growth_mb": round(peak - baseline, 1),
                "seconds": round(elapsed, 2),
                **detail,
            }
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4, help="times each photo is processed per round")
    parser.add_argument("--threads", default="1,2,4", help="thread counts to try, comma separated")
    parser.add_argument("--heic-only", action="store_true", help="run only the HEIC comparison")
    parser.add_argument("--child", choices=[*TASKS, *HEIC_TASKS, "giant"], help=argparse.SUPPRESS)
    parser.add_argument("--chain", choices=list(GIANT_CHAINS), help=argparse.SUPPRESS)
    parser.add_argument("--photos", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return

    configure_libvips()
    work = Path(tempfile.mkdtemp(prefix="darkroom-bench-pipeline-"))
    if args.heic_only:
        print(json.dumps({"heic": heic_report(work, args)}, indent=2))
        _remove(work)
        return
    photos, source = find_photos(work / "photos")
    sequence = [photo for _ in range(args.repeat) for photo in photos]
    thread_counts = [int(part) for part in args.threads.split(",")]
    rates: dict[str, dict[int, list[float]]] = {name: {t: [] for t in thread_counts} for name in TASKS}
    for name, task in TASKS.items():  # warm the page cache and each library
        (work / name).mkdir()
        for photo in photos:
            task(photo, work / name / "warm.jpg")
    for round_index in range(args.rounds):
        for threads in thread_counts:
            for name, task in TASKS.items():
                rates[name][threads].append(images_per_second(task, sequence, work / name, threads))
        print(f"[bench] round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    best = {
        name: max(thread_counts, key=lambda t, n=name: statistics.median(rates[n][t]))  # type: ignore[misc]
        for name in TASKS
    }
    per_s = {name: statistics.median(rates[name][best[name]]) for name in TASKS}
    memory = {name: child(["--child", name, "--photos", *map(str, photos)]) for name in TASKS}
    giant = (
        {chain: child(["--child", "giant", "--chain", chain]) for chain in GIANT_CHAINS}
        if GIANT.is_file()
        else "skipped: ../shared/corpus/bad/giant-image.jpg not found"
    )
    overhead = per_s["pyvips"] / per_s["darkroom"] - 1
    pillows = [name for name in TASKS if name.startswith("pillow")]
    speedup = {name: round(per_s["darkroom"] / per_s[name], 2) for name in pillows}
    rss_ratio = {name: round(_peak(memory["darkroom"]) / _peak(memory[name]), 2) for name in pillows}
    giant_peaks = (
        [run.get("peak_rss_mb", float("inf")) for run in giant.values()] if isinstance(giant, dict) else []
    )
    report = {
        "chain": "resize 512 wide + sharpen + JPEG q80",
        "images_per_s": {name: round(rate, 1) for name, rate in per_s.items()},
        "best_threads": best,
        "darkroom_overhead_vs_pyvips": round(overhead, 3),
        "darkroom_vs_pillow_throughput": speedup,
        "darkroom_vs_pillow_peak_rss": rss_ratio,
        "goals": {
            "overhead_le_10pct": overhead <= 0.10,
            **{f"{name}_throughput_ge_2x": speedup[name] >= 2 for name in pillows},
            **{f"{name}_peak_rss_le_half": rss_ratio[name] <= 0.5 for name in pillows},
            "giant_peak_rss_le_300mb": bool(giant_peaks) and max(giant_peaks) <= 300,
        },
        "peak_rss": memory,
        "giant_image_280mp": giant,
        "rounds": {
            name: {str(t): [round(rate, 1) for rate in by_threads[t]] for t in thread_counts}
            for name, by_threads in rates.items()
        },
        "photos": {"source": source, "files": {photo.name: megapixels(photo) for photo in photos}},
        "images_per_round": len(sequence),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
            "pillow": Image.__version__,
        },
    }
    report["heic"] = heic_report(work, args)
    _remove(work)
    print(json.dumps(report, indent=2))


def heic_report(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """HEIC decode + the chain: Darkroom against Pillow + pillow-heif by hand, one image at a time."""
    (work / "heic").mkdir()
    photo, source = heic_photo(work / "heic")
    sequence = [photo] * args.repeat
    for task in HEIC_TASKS.values():  # warm the page cache and each library
        task(photo, work / "heic" / "warm.jpg")
    rates: dict[str, list[float]] = {name: [] for name in HEIC_TASKS}
    for _ in range(args.rounds):
        for name, task in HEIC_TASKS.items():
            rates[name].append(images_per_second(task, sequence, work / "heic", 1))
    seconds = {name: round(1 / statistics.median(rates[name]), 3) for name in HEIC_TASKS}
    return {
        "chain": "HEIC decode + resize 512 wide + sharpen + JPEG q80",
        "photo": {"source": source, "megapixels": megapixels(photo)},
        "seconds_per_image": seconds,
        "darkroom_vs_pillow_heif_time": round(seconds["darkroom_heic"] / seconds["pillow_heif"], 2),
        "peak_rss": {name: child(["--child", name, "--photos", str(photo)]) for name in HEIC_TASKS},
        "rounds_images_per_s": {name: [round(rate, 2) for rate in rates[name]] for name in HEIC_TASKS},
        "pillow_heif": pillow_heif.__version__,
    }


def _remove(work: Path) -> None:
    for path in sorted(work.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
