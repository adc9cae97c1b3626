"""Every file of the shared corpus through the real API and a real arq worker.

`good/` photos end completed (the iPhone HEIC too, decoded by pillow-heif, close to a reference decode);
`bad/` files are refused with a 4xx problem or end failed with a code — a file libvips cannot decode is
never reported completed — and no file makes a task raise out of the worker. RESULTS.tsv (how libvips
itself treated each file) and MANIFEST.tsv (what each file claims to be) say what to expect.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pyvips
from arq.worker import Worker

from jobs.settings import Settings
from tests.conftest import CORPUS, Partner, api_client, run_burst, with_settings
from tests.test_heic import reference_thumbnail

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")

# RESULTS.tsv's thumbnail was 256 px, enlarging; the same chain here gives the same sizes.
OPERATIONS = [{"type": "resize", "params": {"width": 256, "height": 256, "enlarge": True}}]
MAX_PIXELS = 100_000_000  # the production default
PAYLOADS = (b"<?php", b"/etc/passwd", b"system(")
METADATA_FIELDS = {"exif-data", "xmp-data", "icc-profile-data", "iptc-data", "jpeg-comment"}
FAILURE_CODES = {"corrupt_image", "unsupported_format", "image_too_large", "timeout"}
OUTPUT_FORMATS = {"jpeg": "jpeg", "png": "png", "webp": "webp", "gif": "gif", "tiff": "tiff", "avif": "avif"}


def _rows(name: str) -> dict[str, dict[str, str]]:
    path = CORPUS / name
    if not path.is_file():
        return {}
    with path.open(newline="") as table:
        return {row["file"]: row for row in csv.DictReader(table, delimiter="\t")}


def _files(kind: str) -> list[str]:
    folder = CORPUS / kind
    return sorted(path.name for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []


RESULTS = _rows("RESULTS.tsv")
MANIFEST = _rows("MANIFEST.tsv")
# The column of RESULTS.tsv for the libvips path the worker takes (shrink-on-load thumbnail, fail_on=error).
SHRINK_ON_LOAD = next(
    (column for column in next(iter(RESULTS.values()), {}) if "Image.thumbnail" in column), ""
)


def libvips_size(kind: str, name: str) -> tuple[int, int] | None:
    """The thumbnail size libvips made of the file, or None when libvips failed on it (or never tried)."""
    row = RESULTS.get(f"{kind}/{name}")
    if row is None:
        return None
    match = re.match(r"ok -> (\d+)x(\d+) ", row[SHRINK_ON_LOAD])
    return (int(match[1]), int(match[2])) if match else None


def declared_pixels(kind: str, name: str) -> int | None:
    row = MANIFEST.get(f"{kind}/{name}")
    match = re.match(r"(\d+)x(\d+)", row["width_x_height"]) if row else None
    return int(match[1]) * int(match[2]) if match else None


@pytest.fixture
def corpus_settings(settings: Settings) -> Settings:
    return with_settings(settings, max_upload_bytes=30_000_000, max_pixels=MAX_PIXELS)


@pytest.fixture
async def corpus_client(corpus_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(corpus_settings) as http:
        yield http


@dataclass
class Outcome:
    upload: httpx.Response
    image: dict[str, Any] | None = None
    worker: Worker | None = None
    output: bytes | None = None

    def describe(self) -> str:
        if self.image is None:
            return f"upload answered {self.upload.status_code}: {self.upload.text[:300]}"
        return (
            f"image ended {self.image['status']}, error {self.image['error']}, output {self.image['output']}"
        )


async def run_file(client: httpx.AsyncClient, settings: Settings, account: Partner, path: Path) -> Outcome:
    data = await asyncio.to_thread(path.read_bytes)
    response = await client.post(
        "/v1/images",
        headers=account.headers,
        files={"file": (path.name, data, "application/octet-stream")},
        data={"operations": json.dumps(OPERATIONS)},
    )
    outcome = Outcome(response)
    if response.status_code != 202:
        return outcome
    outcome.worker = await run_burst(settings)
    image_response = await client.get(f"/v1/images/{response.json()['id']}", headers=account.headers)
    assert image_response.status_code == 200, image_response.text
    outcome.image = image_response.json()
    if outcome.image["status"] == "completed":
        download = await client.get(f"/v1/images/{outcome.image['id']}/output", headers=account.headers)
        assert download.status_code == 200, download.text
        outcome.output = download.content
    return outcome


def assert_worker_survived(name: str, outcome: Outcome) -> None:
    worker = outcome.worker
    assert worker is not None
    assert worker.jobs_failed == 0, (
        f"{name}: a task raised out of the worker ({worker.jobs_failed} failed jobs)"
    )
    assert worker.jobs_retried == 0, f"{name}: a job was retried ({worker.jobs_retried})"
    assert worker.jobs_complete >= 1, f"{name}: the worker completed no job"


def assert_clean_failure(name: str, outcome: Outcome, settings: Settings) -> None:
    image = outcome.image
    assert image is not None
    assert image["output"] is None, f"{name}: a failed image has an output"
    error = image["error"]
    assert error["code"] in FAILURE_CODES, f"{name}: unexpected failure code {error}"
    assert error["message"], f"{name}: failure without a message"
    assert str(settings.data_dir) not in error["message"], f"{name}: message leaks a storage path: {error}"
    assert image["completed_at"], f"{name}: failed without a completion time"


def assert_clean_output(name: str, outcome: Outcome, expected_size: tuple[int, int] | None) -> None:
    image, output = outcome.image, outcome.output
    assert image is not None and output is not None
    info = image["output"]
    assert image["error"] is None
    assert info["bytes"] == len(output), f"{name}: output size mismatch"
    decoded = pyvips.Image.new_from_buffer(output, "", fail_on="error")
    loader = str(decoded.get("vips-loader"))
    assert loader.startswith(OUTPUT_FORMATS[info["format"]]) or (
        info["format"] == "avif" and loader.startswith("heif")
    ), f"{name}: {info['format']} output decodes with {loader}"
    decoded = decoded.copy_memory()  # decodes every pixel: fails on a broken output
    assert (decoded.width, decoded.height) == (info["width"], info["height"]), f"{name}: {info}"
    if expected_size is not None:
        assert (decoded.width, decoded.height) == expected_size, (
            f"{name}: {decoded.width}x{decoded.height}, libvips made {expected_size[0]}x{expected_size[1]}"
        )
    assert decoded.format == "uchar", f"{name}: output is {decoded.format}"
    assert decoded.interpretation in ("srgb", "b-w"), f"{name}: output is {decoded.interpretation}"
    kept = METADATA_FIELDS & set(decoded.get_fields())
    assert not kept, f"{name}: output kept metadata {sorted(kept)}"
    leaked = [payload for payload in PAYLOADS if payload in output]
    assert not leaked, f"{name}: output carries {leaked}"


@pytest.mark.parametrize("name", _files("good"))
async def test_good_file_completes(
    name: str, corpus_client: httpx.AsyncClient, corpus_settings: Settings, account: Partner
) -> None:
    outcome = await run_file(corpus_client, corpus_settings, account, CORPUS / "good" / name)
    assert outcome.upload.status_code == 202, f"{name}: {outcome.describe()}"
    assert outcome.image is not None
    assert_worker_survived(name, outcome)
    assert outcome.image["status"] == "completed", f"{name}: {outcome.describe()}"
    assert outcome.image["attempts"] == 1
    if name.lower().endswith(".heic"):
        reference = reference_thumbnail(CORPUS / "good" / name, 256)
        assert_clean_output(name, outcome, (reference.width, reference.height))
        assert_close_to_reference(name, outcome, reference)
        return
    assert_clean_output(name, outcome, libvips_size("good", name))


def assert_close_to_reference(name: str, outcome: Outcome, reference: pyvips.Image) -> None:
    """Upright and the right picture: JPEG's loss at the default quality keeps it a few levels off the
    reference (test_heic.py checks the colours on a lossless output); upside down is 70 levels off."""
    assert outcome.output is not None
    output = pyvips.Image.new_from_buffer(outcome.output, "").cast("float")
    difference = float((output - reference).abs().avg())
    assert difference < 6, f"{name}: mean difference {difference:.2f} from the reference decode"


@pytest.mark.parametrize("name", _files("bad"))
async def test_bad_file_is_refused_or_fails_cleanly(
    name: str, corpus_client: httpx.AsyncClient, corpus_settings: Settings, account: Partner
) -> None:
    outcome = await run_file(corpus_client, corpus_settings, account, CORPUS / "bad" / name)
    libvips_made = libvips_size("bad", name)
    declared = declared_pixels("bad", name)
    if name.endswith((".svg", ".svgz")):
        assert outcome.upload.status_code == 415, f"{name}: SVG must be refused: {outcome.describe()}"
    if declared is not None and declared > MAX_PIXELS:
        assert outcome.image is None, f"{name} declares {declared:,} pixels: {outcome.describe()}"

    if outcome.image is None:
        response = outcome.upload
        assert response.status_code in (413, 415, 422), f"{name}: {outcome.describe()}"
        assert response.headers["content-type"].startswith("application/problem+json"), name
        problem = response.json()
        assert problem["status"] == response.status_code, f"{name}: {problem}"
        assert problem["type"] and problem["title"] and problem["detail"], f"{name}: {problem}"
        assert str(corpus_settings.data_dir) not in problem["detail"], f"{name}: {problem}"
        return

    assert outcome.upload.status_code == 202, f"{name}: {outcome.describe()}"
    assert_worker_survived(name, outcome)
    status = outcome.image["status"]
    if libvips_made is None:
        # libvips itself failed on this file (or it is not in RESULTS.tsv): it must not "complete".
        assert status == "failed", f"{name}: libvips cannot decode it, yet {outcome.describe()}"
    assert status in ("completed", "failed"), f"{name}: {outcome.describe()}"
    if status == "failed":
        assert_clean_failure(name, outcome, corpus_settings)
    else:
        assert_clean_output(name, outcome, libvips_made)


def test_corpus_is_complete() -> None:
    """The expectations above come from RESULTS.tsv; a file it does not list must be an SVG."""
    assert len(_files("good")) >= 20 and len(_files("bad")) >= 39
    assert SHRINK_ON_LOAD, "RESULTS.tsv has no shrink-on-load column"
    unlisted = [
        f"{kind}/{name}"
        for kind in ("good", "bad")
        for name in _files(kind)
        if f"{kind}/{name}" not in RESULTS and not name.endswith(".svg")
    ]
    assert not unlisted, f"not in RESULTS.tsv: {unlisted}"
