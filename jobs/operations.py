"""The operation catalogue: each operation is a parameter model plus a pure function on a pyvips image.

`parse_operations` turns a partner's JSON chain into validated `Operation`s before anything is queued;
`plan` orders them into stages and `jobs.pipeline` runs them. The families live in `jobs.ops`; adding an
operation is one `OperationKind` in its family's `KINDS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.ops import encode, enhance, filters, geometry, overlay, tone
from jobs.ops.base import OperationKind
from jobs.ops.encode import ConvertParams
from jobs.ops.geometry import AutoOrientParams, ResizeParams
from jobs.params import FieldError, Params, ValidationFailed

MAX_CHAIN_LENGTH = 32

CATALOGUE: dict[str, OperationKind] = {
    kind.name: kind for family in (geometry, filters, enhance, tone, overlay, encode) for kind in family.KINDS
}


@dataclass(frozen=True)
class Operation:
    type: str
    params: Params

    @property
    def kind(self) -> OperationKind:
        return CATALOGUE[self.type]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "params": self.params.to_json()}


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
    first_at: dict[str, int] = {}  # where each whole-result setting (no pixel step) was first given
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
        if kind.apply is None:
            # One setting given twice: only one could apply, and the other would be dropped unsaid.
            if kind.name in first_at:
                errors.append(
                    FieldError(
                        f"{where}.type",
                        f"{kind.name} may appear once (it is also operations[{first_at[kind.name]}]):"
                        " put all its params in one",
                    )
                )
            first_at.setdefault(kind.name, index)
        try:
            chain.append(Operation(kind.name, kind.params_model.parse(item.get("params"), f"{where}.params")))
        except ValidationFailed as exc:
            errors.extend(exc.errors)
    errors.extend(_animation_problems(chain))
    if errors:
        raise ValidationFailed(errors)
    return chain


def _animation_problems(chain: Sequence[Operation]) -> list[FieldError]:
    """Animated output keeps each frame as a strip of pages, which only resizing (into a box) and
    encoding understand: a crop or a turn would cut across frames."""
    if not any(isinstance(op.params, ConvertParams) and op.params.animated for op in chain):
        return []
    pixel_steps = [index for index, op in enumerate(chain) if op.kind.apply is not None]
    return [
        FieldError(
            f"operations[{index}].type",
            "animated output takes only a first resize (fit inside) and convert",
        )
        for position, index in enumerate(pixel_steps)
        if position > 0 or not _resizes_into_a_box(chain[index])
    ]


def _resizes_into_a_box(operation: Operation) -> bool:
    return isinstance(operation.params, ResizeParams) and operation.params.fit == "inside"


@dataclass(frozen=True)
class Plan:
    """A chain as the pipeline runs it: decoder and encoder options apart, pixel operations in stage order."""

    auto_orient: bool = True
    convert: ConvertParams | None = None
    steps: tuple[Operation, ...] = field(default=())


def plan(chain: Sequence[Operation]) -> Plan:
    """Order a chain by stage, keeping the partner's order within each stage (`parse_operations` lets
    `convert` and `auto_orient` appear once each)."""
    auto_orient = True
    convert = None
    for operation in chain:
        if isinstance(operation.params, AutoOrientParams):
            auto_orient = operation.params.enabled
        elif isinstance(operation.params, ConvertParams):
            convert = operation.params
    steps = sorted(
        (operation for operation in chain if operation.kind.apply is not None),
        key=lambda operation: operation.kind.stage,
    )
    return Plan(auto_orient, convert, tuple(steps))
