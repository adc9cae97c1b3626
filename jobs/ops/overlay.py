"""Overlays: what is drawn on top of the finished picture (watermark)."""

from __future__ import annotations

from jobs.ops.base import OperationKind

KINDS: tuple[OperationKind, ...] = ()
