"""Tone and colour: point operations (adjust, enhance, grayscale, background)."""

from __future__ import annotations

from jobs.ops.base import OperationKind

KINDS: tuple[OperationKind, ...] = ()
