"""The operation seam: chains validated before queueing, parameter schemas, and fit modes for thumbnail."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pytest

from jobs.operations import CATALOGUE, MAX_CHAIN_LENGTH, Operation, parse_operations, plan
from jobs.ops.base import MAX_DIMENSION
from jobs.ops.encode import ConvertParams
from jobs.ops.geometry import _UNBOUNDED, ResizeParams, ThumbnailArgs, thumbnail_args
from jobs.params import Bounds, FieldError, Params, Pattern, ValidationFailed


def errors_of(raw: object) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        parse_operations(raw)
    fields = [error.field for error in caught.value.errors]
    assert len(fields) == len(set(fields)), f"one error per field, got {fields}"
    return {error.field: error.message for error in caught.value.errors}


# --- parse_operations: valid chains -----------------------------------------------------------------


def test_no_operations_is_an_empty_chain() -> None:
    assert parse_operations(None) == []
    assert parse_operations([]) == []


def test_valid_chain_keeps_order_and_fills_defaults() -> None:
    chain = parse_operations(
        [
            {"type": "resize", "params": {"width": 800}},
            {"type": "convert", "params": {"format": "webp", "quality": 70}},
        ]
    )
    assert [operation.type for operation in chain] == ["resize", "convert"]
    assert chain[0].params == ResizeParams(width=800)
    assert chain[0].to_json() == {
        "type": "resize",
        "params": {"width": 800, "fit": "inside", "enlarge": False, "background": "#ffffff"},
    }
    assert chain[1].params == ConvertParams(format="webp", quality=70)
    assert chain[1].to_json() == {
        "type": "convert",
        "params": {"format": "webp", "quality": 70, "lossless": False, "progressive": False},
    }


def test_params_may_be_omitted_or_null_when_nothing_is_required() -> None:
    assert parse_operations([{"type": "convert"}]) == [Operation("convert", ConvertParams())]
    assert parse_operations([{"type": "convert", "params": None}]) == [Operation("convert", ConvertParams())]
    assert parse_operations([{"type": "convert", "params": {}}]) == [Operation("convert", ConvertParams())]


def test_every_field_of_resize_and_convert_parses() -> None:
    resize, convert = parse_operations(
        [
            {
                "type": "resize",
                "params": {
                    "width": 1,
                    "height": MAX_DIMENSION,
                    "fit": "cover",
                    "enlarge": True,
                    "background": "#0aF",
                },
            },
            {
                "type": "convert",
                "params": {"format": "png", "quality": 100, "lossless": True, "progressive": True},
            },
        ]
    )
    assert resize.params == ResizeParams(1, MAX_DIMENSION, "cover", True, "#0aF")
    assert convert.params == ConvertParams("png", 100, True, True)


def test_null_optional_params_mean_unset() -> None:
    (resize,) = parse_operations([{"type": "resize", "params": {"width": 10, "height": None}}])
    assert resize.params == ResizeParams(width=10)
    assert "height" not in resize.to_json()["params"]


def test_to_json_round_trips() -> None:
    raw = [
        {"type": "resize", "params": {"height": 300, "fit": "contain", "background": "#102030"}},
        {"type": "convert", "params": {"format": "avif", "lossless": True}},
    ]
    chain = parse_operations(raw)
    again = parse_operations(json.loads(json.dumps([operation.to_json() for operation in chain])))
    assert again == chain


def test_convert_decides_the_output() -> None:
    chain = parse_operations(
        [{"type": "resize", "params": {"width": 5}}, {"type": "convert", "params": {"format": "gif"}}]
    )
    options = plan(chain).convert
    assert options is not None
    assert options.format == "gif"
    assert plan(parse_operations([{"type": "resize", "params": {"width": 5}}])).convert is None


ONE_OF_EACH = ": put all its params in one"


def test_a_setting_of_the_whole_result_given_twice_is_refused_not_half_dropped() -> None:
    """`[convert webp, convert quality 60]` gave a JPEG at 60: the later convert replaced the earlier."""
    assert errors_of(
        [
            {"type": "convert", "params": {"format": "webp"}},
            {"type": "resize", "params": {"width": 5}},
            {"type": "convert", "params": {"quality": 60}},
            {"type": "auto_orient", "params": {"enabled": False}},
            {"type": "auto_orient"},
        ]
    ) == {
        "operations[2].type": f"convert may appear once (it is also operations[0]){ONE_OF_EACH}",
        "operations[4].type": f"auto_orient may appear once (it is also operations[3]){ONE_OF_EACH}",
    }


def test_plan_runs_geometry_first_and_keeps_the_partners_order_within_a_stage() -> None:
    chain = parse_operations(
        [
            {"type": "auto_orient", "params": {"enabled": False}},
            {"type": "resize", "params": {"width": 50}},
            {"type": "convert", "params": {"format": "png"}},
            {"type": "resize", "params": {"width": 5}},
        ]
    )
    steps = plan(chain)
    assert steps.auto_orient is False
    assert steps.convert == ConvertParams(format="png")
    assert [op.params for op in steps.steps] == [ResizeParams(width=50), ResizeParams(width=5)]
    assert plan([]).auto_orient is True


def test_chain_length_cap() -> None:
    at_cap = [{"type": "resize", "params": {"width": 100}}] * MAX_CHAIN_LENGTH
    assert len(parse_operations(at_cap)) == MAX_CHAIN_LENGTH
    errors = errors_of([*at_cap, {"type": "convert"}])
    assert list(errors) == ["operations"]
    assert str(MAX_CHAIN_LENGTH) in errors["operations"]


# --- parse_operations: errors name their field ------------------------------------------------------


@pytest.mark.parametrize("raw", [{}, "resize", 3, {"type": "resize"}, True])
def test_chain_must_be_an_array(raw: object) -> None:
    assert list(errors_of(raw)) == ["operations"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 0}, "width"),
        ({"width": -5}, "width"),
        ({"width": MAX_DIMENSION + 1}, "width"),
        ({"width": 10.5}, "width"),
        ({"width": "800"}, "width"),
        ({"width": True}, "width"),
        ({"width": [800]}, "width"),
        ({"height": 0}, "height"),
        ({"width": 10, "fit": "stretch"}, "fit"),
        ({"width": 10, "fit": None}, "fit"),
        ({"width": 10, "enlarge": "yes"}, "enlarge"),
        ({"width": 10, "enlarge": 1}, "enlarge"),
        ({"width": 10, "background": "white"}, "background"),
        ({"width": 10, "background": "#12345"}, "background"),
        ({"width": 10, "background": "#+f+f+f"}, "background"),
        ({"width": 10, "background": 0xFFFFFF}, "background"),
        ({"width": 10, "colour": "#fff"}, "colour"),
        ({}, "width"),
        ({"width": None, "height": None}, "width"),
    ],
)
def test_bad_resize_param_is_named(params: dict[str, Any], field: str) -> None:
    errors = errors_of([{"type": "convert"}, {"type": "resize", "params": params}])
    assert list(errors) == [f"operations[1].params.{field}"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "bmp"}, "format"),
        ({"format": "JPEG"}, "format"),
        ({"format": "heif"}, "format"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"quality": 80.0}, "quality"),
        ({"lossless": "true"}, "lossless"),
        ({"progressive": 0}, "progressive"),
        ({"strip": False}, "strip"),
    ],
)
def test_bad_convert_param_is_named(params: dict[str, Any], field: str) -> None:
    errors = errors_of([{"type": "resize", "params": {"width": 1}}, {"type": "convert", "params": params}])
    assert list(errors) == [f"operations[1].params.{field}"]


def test_error_messages_say_what_is_wanted() -> None:
    errors = errors_of(
        [
            {"type": "resize", "params": {"width": 0, "fit": "stretch", "enlarge": "no"}},
            {"type": "convert", "params": {"format": "bmp", "quality": "high"}},
        ]
    )
    assert errors == {
        "operations[0].params.width": "must be between 1 and 16384",
        "operations[0].params.fit": "must be one of: inside, contain, cover, fill, outside",
        "operations[0].params.enlarge": "must be true or false",
        "operations[1].params.format": "must be one of: jpeg, png, webp, avif, tiff, gif",
        "operations[1].params.quality": "must be an integer",
    }


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("resize", "operations[0].type"),
        (None, "operations[0].type"),
        ({}, "operations[0].type"),
        ({"type": 7}, "operations[0].type"),
        ({"type": "sepia"}, "operations[0].type"),
        ({"type": "RESIZE", "params": {"width": 1}}, "operations[0].type"),
        ({"type": "convert", "params": "webp"}, "operations[0].params"),
        ({"type": "convert", "params": ["webp"]}, "operations[0].params"),
        ({"type": "convert", "parameters": {}}, "operations[0]"),
    ],
)
def test_bad_operation_shape_is_named(item: object, field: str) -> None:
    assert list(errors_of([item])) == [field]


def test_unknown_operation_lists_the_known_ones() -> None:
    message = errors_of([{"type": "sepia"}])["operations[0].type"]
    assert "'sepia'" in message
    for name in CATALOGUE:
        assert name in message


def test_all_errors_are_reported_at_once() -> None:
    errors = errors_of(
        [
            {"type": "resize", "params": {"width": 0, "height": "tall", "shape": "round"}},
            {"type": "resize", "params": {"width": 100}},
            {"type": "remove_background"},
            "not an object",
            {"type": "convert", "params": {"format": "bmp", "quality": 500}, "when": "now"},
        ]
    )
    assert set(errors) == {
        "operations[0].params.width",
        "operations[0].params.height",
        "operations[0].params.shape",
        "operations[2].type",
        "operations[3].type",
        "operations[4]",
        "operations[4].params.format",
        "operations[4].params.quality",
    }


def test_validation_failed_carries_problem_json_errors() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_operations([{"type": "resize", "params": {"width": 0}}])
    assert [error.to_json() for error in caught.value.errors] == [
        {"field": "operations[0].params.width", "message": "must be between 1 and 16384"}
    ]
    assert "operations[0].params.width" in str(caught.value)


def test_json_nan_and_infinity_are_not_numbers() -> None:
    """Python's json module reads NaN and Infinity, and NaN compares false with every bound."""
    raw = json.loads('[{"type": "resize", "params": {"width": NaN, "height": Infinity}}]')
    assert set(errors_of(raw)) == {"operations[0].params.width", "operations[0].params.height"}


# --- the seam issue 3 builds on: parameter models ---------------------------------------------------


@dataclass(frozen=True)
class SampleParams(Params):
    """Every field shape the seam supports, as issue 3's operations will use them."""

    sigma: Annotated[float, Bounds(0.1, 10)]
    scale: Literal[2, 4, 8] = 2
    strategy: Literal["attention", "entropy", "centre"] = "attention"
    amount: Annotated[float | None, Bounds(0, None)] = None
    label: Annotated[str, Pattern("[a-z]+", "lowercase letters")] = "x"
    enabled: bool = True
    position: Literal["top", "bottom"] | None = None


def test_required_param_is_reported_missing() -> None:
    with pytest.raises(ValidationFailed) as caught:
        SampleParams.parse({}, "operations[0].params")
    assert [error.to_json() for error in caught.value.errors] == [
        {"field": "operations[0].params.sigma", "message": "is required"}
    ]


def test_floats_accept_integers_and_store_floats() -> None:
    params = SampleParams.parse({"sigma": 2}, "p")
    assert params.sigma == 2.0
    assert isinstance(params.sigma, float)


def test_integer_choices_take_numbers_not_strings() -> None:
    assert SampleParams.parse({"sigma": 1, "scale": 4}, "p").scale == 4
    for wrong in ("4", 3, 4.0, True):
        with pytest.raises(ValidationFailed) as caught:
            SampleParams.parse({"sigma": 1, "scale": wrong}, "p")
        assert [error.field for error in caught.value.errors] == ["p.scale"], wrong


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_even_without_an_upper_bound(value: float) -> None:
    with pytest.raises(ValidationFailed) as caught:
        SampleParams.parse({"sigma": 1, "amount": value}, "p")
    assert [error.to_json() for error in caught.value.errors] == [
        {"field": "p.amount", "message": "must be a finite number"}
    ]


def test_pattern_must_match_the_whole_string() -> None:
    assert SampleParams.parse({"sigma": 1, "label": "abc"}, "p").label == "abc"
    for wrong in ("abc1", "1abc", "", "ABC"):
        with pytest.raises(ValidationFailed) as caught:
            SampleParams.parse({"sigma": 1, "label": wrong}, "p")
        assert caught.value.errors == [FieldError("p.label", "must be lowercase letters")], wrong


def test_models_the_seam_cannot_describe_are_refused_when_defined() -> None:
    @dataclass(frozen=True)
    class Mixed(Params):
        mode: Literal["auto", 1] = "auto"

    @dataclass(frozen=True)
    class Listy(Params):
        sizes: list[int] | None = None

    for model in (Mixed, Listy):
        with pytest.raises(TypeError):
            model.parse({}, "p")


# --- json_schema agrees with parse ------------------------------------------------------------------


def schema_accepts(schema: dict[str, Any], value: object) -> bool:
    """The subset of JSON Schema that Params.json_schema emits for one property."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    checks = {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        "string": isinstance(value, str),
    }
    if not any(checks[name] for name in types):
        return False
    if "enum" in schema and not any(value == c and type(value) is type(c) for c in schema["enum"]):
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
    return not ("pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value))


CANDIDATES: list[object] = [
    None, True, False, 0, 1, 2, 3, 4, 8, -1, 1.5, 0.05, 10, 10.5, 100, 101, 16384, 16385, math.nan,
    "", "x", "abc", "ABC", "2", "#fff", "#FFFFFF", "fff", "#ffff", "white", [], {},
    "inside", "contain", "cover", "fill", "outside", "jpeg", "png", "webp", "avif", "tiff", "gif", "bmp",
    "attention", "entropy", "centre", "center", "top", "bottom", "middle",
]  # fmt: skip

# A value for each model that satisfies its cross-field rules, so only the field under test varies.
BASE: dict[type[Params], dict[str, object]] = {
    ResizeParams: {"width": 10},
    ConvertParams: {"format": "webp"},
    SampleParams: {"sigma": 1},
}


def parse_accepts(model: type[Params], field: str, value: object) -> bool:
    base = {"height": 10} if (model, field) == (ResizeParams, "width") else BASE[model]
    raw = {**base, field: value}
    try:
        model.parse(raw, "params")
    except ValidationFailed:
        return False
    return True


@pytest.mark.parametrize("model", [ResizeParams, ConvertParams, SampleParams], ids=lambda m: m.__name__)
def test_schema_accepts_exactly_what_parse_accepts(model: type[Params]) -> None:
    schema = model.json_schema()
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    disagreements = [
        f"{field}={value!r}: schema {'accepts' if expected else 'refuses'}, parse does not"
        for field, property_schema in schema["properties"].items()
        for value in CANDIDATES
        if (expected := schema_accepts(property_schema, value)) != parse_accepts(model, field, value)
    ]
    assert not disagreements, "\n".join(disagreements)


def test_schema_lists_enums_bounds_and_defaults() -> None:
    resize = ResizeParams.json_schema()["properties"]
    assert resize["fit"] == {
        "type": "string",
        "enum": ["inside", "contain", "cover", "fill", "outside"],
        "default": "inside",
    }
    assert resize["width"] == {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_DIMENSION}
    assert resize["enlarge"] == {"type": "boolean", "default": False}
    assert resize["background"]["default"] == "#ffffff"
    convert = ConvertParams.json_schema()["properties"]
    assert convert["format"]["enum"] == ["jpeg", "png", "webp", "avif", "tiff", "gif"]
    assert convert["quality"] == {"type": ["integer", "null"], "minimum": 1, "maximum": 100}
    assert set(convert) == {
        "format",
        "quality",
        "lossless",
        "progressive",
        "max_bytes",
        "bit_depth",
        "keep_icc",
        "keep_exif",
        "animated",
    }
    sample = SampleParams.json_schema()
    assert sample["required"] == ["sigma"]
    assert sample["properties"]["scale"] == {"type": "integer", "enum": [2, 4, 8], "default": 2}
    assert sample["properties"]["amount"] == {"type": ["number", "null"], "minimum": 0}
    assert sample["properties"]["position"] == {"type": ["string", "null"], "enum": ["top", "bottom", None]}
    assert sample["properties"]["label"] == {"type": "string", "pattern": "^(?:[a-z]+)$", "default": "x"}


def test_schema_is_plain_json() -> None:
    for kind in CATALOGUE.values():
        schema = kind.params_model.json_schema()
        assert json.loads(json.dumps(schema)) == schema


def test_every_catalogue_entry_is_complete() -> None:
    for name, kind in CATALOGUE.items():
        assert kind.name == name
        assert kind.summary
        assert issubclass(kind.params_model, Params)
    assert {"resize", "convert"} <= set(CATALOGUE)


# --- thumbnail_args: fit modes ----------------------------------------------------------------------


def args(source: tuple[int, int], **params: Any) -> ThumbnailArgs:
    return thumbnail_args(lambda: source, ResizeParams(**params))


@pytest.mark.parametrize("fit", ["inside", "contain", "cover", "fill", "outside"])
def test_one_dimension_scales_proportionally_whatever_the_fit(fit: str) -> None:
    assert args((400, 200), width=100, fit=fit) == ThumbnailArgs(100, _UNBOUNDED, "down", None)
    assert args((400, 200), height=100, fit=fit) == ThumbnailArgs(_UNBOUNDED, 100, "down", None)
    assert args((400, 200), height=100, fit=fit, enlarge=True) == ThumbnailArgs(_UNBOUNDED, 100, "both", None)


def test_inside_and_contain_fit_the_box() -> None:
    for fit in ("inside", "contain"):
        assert args((400, 200), width=100, height=100, fit=fit) == ThumbnailArgs(100, 100, "down", None)
        assert args((400, 200), width=800, height=800, fit=fit, enlarge=True) == ThumbnailArgs(
            800, 800, "both", None
        )


def test_cover_crops_the_centre() -> None:
    assert args((400, 200), width=100, height=100, fit="cover") == ThumbnailArgs(100, 100, "down", "centre")
    assert args((400, 200), width=100, height=100, fit="cover", enlarge=True) == ThumbnailArgs(
        100, 100, "both", "centre"
    )


def test_fill_forces_the_box() -> None:
    assert args((400, 200), width=100, height=100, fit="fill", enlarge=True) == ThumbnailArgs(
        100, 100, "force", None
    )
    assert args((400, 200), width=100, height=100, fit="fill") == ThumbnailArgs(100, 100, "force", None)


def test_fill_without_enlarge_never_stretches_an_axis_beyond_the_source() -> None:
    assert args((400, 200), width=800, height=800, fit="fill") == ThumbnailArgs(400, 200, "force", None)
    assert args((400, 200), width=100, height=800, fit="fill") == ThumbnailArgs(100, 200, "force", None)


def test_outside_bounds_the_axis_that_needs_the_bigger_scale() -> None:
    # 400x200 into 100x100: height needs 1/2, width 1/4; the height lands on 100, the width overflows.
    assert args((400, 200), width=100, height=100, fit="outside") == ThumbnailArgs(
        _UNBOUNDED, 100, "down", None
    )
    assert args((200, 400), width=100, height=100, fit="outside") == ThumbnailArgs(
        100, _UNBOUNDED, "down", None
    )
    assert args((400, 200), width=800, height=800, fit="outside", enlarge=True) == ThumbnailArgs(
        _UNBOUNDED, 800, "both", None
    )


def test_outside_never_rounds_short_of_the_box() -> None:
    """104x1000 into 10x100: the height binds; scaling by a rounded width (10/104) would give 96 rows."""
    assert args((104, 1000), width=10, height=100, fit="outside") == ThumbnailArgs(
        _UNBOUNDED, 100, "down", None
    )
