"""Area filters: operations that read a neighbourhood of pixels (denoise, sharpen, blur)."""

from __future__ import annotations

from jobs.ops.base import OperationKind

KINDS: tuple[OperationKind, ...] = ()
