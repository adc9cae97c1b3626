"""The operation catalogue: each operation is a parameter model plus a pure function on a pyvips image.

`parse_operations` turns a partner's JSON chain into validated `Operation`s before anything is queued;
`jobs.pipeline` runs them. Adding an operation is one `OperationKind` in `CATALOGUE`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pyvips

from jobs.params import Bounds, FieldError, Params, Pattern, ValidationFailed

MAX_DIMENSION = 16_384
MAX_CHAIN_LENGTH = 32
OutputFormat = Literal["jpeg", "png", "webp", "avif", "tiff", "gif"]
Fit = Literal["inside", "contain", "cover", "fill", "outside"]

Dimension = Annotated[int | None, Bounds(1, MAX_DIMENSION)]
Colour = Annotated[str, Pattern("#?(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})", "a colour like #ffffff")]


@dataclass(frozen=True)
class ResizeParams(Params):
    """`inside` keeps the aspect ratio within the box; `cover` fills it and crops the overflow;
    `contain` fits inside and pads to the exact box; `fill` stretches; `outside` covers without cropping."""

    width: Dimension = None
    height: Dimension = None
    fit: Fit = "inside"
    enlarge: bool = False
    background: Colour = "#ffffff"

    def problems(self) -> Any:
        if self.width is None and self.height is None:
            yield FieldError("width", "give width, height or both")


@dataclass(frozen=True)
class ConvertParams(Params):
    format: OutputFormat = "jpeg"
    quality: Annotated[int | None, Bounds(1, 100)] = None
    lossless: bool = False
    progressive: bool = False


@dataclass(frozen=True)
class OperationKind:
    name: str
    summary: str
    params_model: type[Params]
    # None for operations that shape the saved file rather than the pixels (convert).
    apply: Callable[[pyvips.Image, Any], pyvips.Image] | None


@dataclass(frozen=True)
class Operation:
    type: str
    params: Params

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "params": self.params.to_json()}


# Coordinates no image reaches: "unbounded" along an axis for libvips' thumbnail.
_UNBOUNDED = 10_000_000


@dataclass(frozen=True)
class ThumbnailArgs:
    """What libvips' `thumbnail` needs; the same for shrink-on-load from a file and for an image."""

    width: int
    height: int
    size: str
    crop: str | None


def thumbnail_args(source_size: Callable[[], tuple[int, int]], params: ResizeParams) -> ThumbnailArgs:
    """Translate a fit mode into thumbnail arguments for an (upright) source.

    `source_size` is asked only by the fit modes that depend on it, so a shrink-on-load resize by
    width or into a box does not open the file an extra time to read its header."""
    size = "both" if params.enlarge else "down"
    width, height = params.width, params.height
    if width is None or height is None or params.fit in ("inside", "contain"):
        return ThumbnailArgs(width or _UNBOUNDED, height or _UNBOUNDED, size, None)
    if params.fit == "cover":
        return ThumbnailArgs(width, height, size, "centre")
    source_width, source_height = source_size()
    if params.fit == "fill":
        if not params.enlarge:
            # Each axis on its own: shrink where the source is bigger than the box, never stretch.
            width, height = min(width, source_width), min(height, source_height)
        return ThumbnailArgs(width, height, "force", None)
    # `outside`: scale by the axis that needs the bigger scale and leave the other unbounded, so that
    # axis lands exactly on the box. (Rounding the other axis to a width first can leave it short.)
    if height * source_width >= width * source_height:
        return ThumbnailArgs(_UNBOUNDED, height, size, None)
    return ThumbnailArgs(width, _UNBOUNDED, size, None)


def resize(image: pyvips.Image, params: ResizeParams) -> pyvips.Image:
    args = thumbnail_args(lambda: (image.width, image.height), params)
    options: dict[str, Any] = {"height": args.height, "size": args.size, "no_rotate": True}
    if args.crop is not None:
        options["crop"] = args.crop
    return finish_resize(image.thumbnail_image(args.width, **options), params)


def finish_resize(image: pyvips.Image, params: ResizeParams) -> pyvips.Image:
    """`contain` pads the fitted image to the exact box."""
    if params.fit != "contain" or params.width is None or params.height is None:
        return image
    if image.width == params.width and image.height == params.height:
        return image
    background = parse_colour(params.background)
    if image.hasalpha():
        background = [*background, 0]
    return image.gravity(
        "centre",
        max(image.width, params.width),
        max(image.height, params.height),
        extend="background",
        background=background[: image.bands],
    )


def parse_colour(value: str) -> list[float]:
    """`#rgb` or `#rrggbb` → [r, g, b]."""
    digits = value.removeprefix("#")
    if len(digits) == 3:
        digits = "".join(ch * 2 for ch in digits)
    if len(digits) != 6:
        raise ValueError("must be a colour like #ffffff")
    try:
        return [float(int(digits[i : i + 2], 16)) for i in (0, 2, 4)]
    except ValueError:
        raise ValueError("must be a colour like #ffffff") from None


CATALOGUE: dict[str, OperationKind] = {
    kind.name: kind
    for kind in (
        OperationKind("resize", "Scale to a box with a fit mode.", ResizeParams, resize),
        OperationKind("convert", "Choose the output format and its encoder options.", ConvertParams, None),
    )
}


def parse_operations(raw: object) -> list[Operation]:
    """Validate a JSON chain; every problem is reported at once, each naming its field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValidationFailed([FieldError("operations", "must be a JSON array of operations")])
    if len(raw) > MAX_CHAIN_LENGTH:
        raise ValidationFailed([FieldError("operations", f"at most {MAX_CHAIN_LENGTH} operations")])
    errors: list[FieldError] = []
    chain: list[Operation] = []
    for index, item in enumerate(raw):
        where = f"operations[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            errors.append(FieldError(f"{where}.type", "each operation is an object with a string type"))
            continue
        unknown_keys = set(item) - {"type", "params"}
        if unknown_keys:
            errors.append(FieldError(where, f"unknown keys: {', '.join(sorted(unknown_keys))}"))
        kind = CATALOGUE.get(item["type"])
        if kind is None:
            errors.append(
                FieldError(
                    f"{where}.type", f"unknown operation {item['type']!r}; known: {', '.join(CATALOGUE)}"
                )
            )
            continue
        try:
            chain.append(Operation(kind.name, kind.params_model.parse(item.get("params"), f"{where}.params")))
        except ValidationFailed as exc:
            errors.extend(exc.errors)
    if errors:
        raise ValidationFailed(errors)
    return chain


def output_options(chain: Sequence[Operation]) -> ConvertParams | None:
    """The last `convert` decides the output; earlier ones are overridden."""
    for operation in reversed(chain):
        if isinstance(operation.params, ConvertParams):
            return operation.params
    return None
