"""Helpers for operation tests: the pixel layouts an operation may receive, and running chains."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pyvips

from jobs.operations import parse_operations
from jobs.params import ValidationFailed
from jobs.pipeline import KillSwitch, RenderedImage, render


@dataclass(frozen=True)
class Layout:
    """A pixel layout an operation may receive: 3-band sRGB or 1-band b-w, optional alpha, 8 or 16 bits."""

    grey: bool = False
    alpha: bool = False
    sixteen_bit: bool = False

    def of(self, image: pyvips.Image) -> pyvips.Image:
        """`image` (3-band 8-bit sRGB) in this layout; the alpha ramps from transparent (left) to opaque."""
        if self.grey:
            image = image.colourspace("b-w")
        if self.alpha:
            x = pyvips.Image.xyz(image.width, image.height)[0]
            ramp = (x * (255 / max(image.width - 1, 1))).rint().cast("uchar")
            image = image.bandjoin(ramp).copy(interpretation=image.interpretation)
        if self.sixteen_bit:
            # The same levels, as a 16-bit PNG made from 8-bit data holds them (255 is 65535).
            image = (image.cast("ushort") * 257).cast("ushort")
            image = image.copy(interpretation="grey16" if self.grey else "rgb16")
        return image

    def __str__(self) -> str:
        name = "b-w" if self.grey else "rgb"
        return name + ("+alpha" if self.alpha else "") + (" 16-bit" if self.sixteen_bit else "")


LAYOUTS = [
    Layout(grey, alpha, sixteen)
    for grey in (False, True)
    for alpha in (False, True)
    for sixteen in (False, True)
]


def colour_of(image: pyvips.Image) -> pyvips.Image:
    return image.extract_band(0, n=image.bands - 1) if image.hasalpha() else image


def in_8_bit_levels(image: pyvips.Image) -> pyvips.Image:
    return image.cast("float") / 257 if image.format == "ushort" else image.cast("float")


def identical(first: pyvips.Image, second: pyvips.Image) -> bool:
    return bool((first == second).min() == 255)


def field_errors(raw: object) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        parse_operations(raw)
    return {error.field: error.message for error in caught.value.errors}


class Renderer:
    """Runs chains through `jobs.pipeline.render` on inputs written under a directory, each with
    files of its own (images decode lazily), and decodes what render produced."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._names: Iterator[int] = itertools.count()

    def render(
        self,
        data: bytes,
        operations: list[dict[str, Any]] | None = None,
        input_format: str = "jpeg",
        kill_switch: KillSwitch | None = None,
        *,
        max_pixels: int | None = None,
    ) -> RenderedImage:
        name = next(self._names)
        source = self.directory / f"in-{name}"
        source.write_bytes(data)
        chain = parse_operations(operations)
        return render(
            source, self.directory / f"out-{name}", chain, input_format, kill_switch, max_pixels=max_pixels
        )

    def run(
        self,
        data: bytes,
        operations: list[dict[str, Any]] | None = None,
        input_format: str = "jpeg",
        *,
        max_pixels: int | None = None,
    ) -> pyvips.Image:
        rendered = self.render(data, operations, input_format, max_pixels=max_pixels)
        decoded = decode(rendered.path.read_bytes())
        assert (decoded.width, decoded.height) == (rendered.width, rendered.height)
        assert rendered.bytes == rendered.path.stat().st_size
        return decoded


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="error").copy_memory()


def record_held_pictures(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every picture libvips holds in memory (`copy_memory` done) from now on: a step that
    reads its input whole, or a pass over the pixels, shows up here."""
    held: list[tuple[int, int]] = []
    copy_memory = pyvips.Image.copy_memory

    def recorded(image: pyvips.Image) -> pyvips.Image:
        copy = copy_memory(image)
        held.append((image.width, image.height))
        return copy

    monkeypatch.setattr(pyvips.Image, "copy_memory", recorded)
    return held
