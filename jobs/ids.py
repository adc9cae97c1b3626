"""Prefixed, time-sortable identifiers (ULID layout: 48-bit ms + 80 random bits, base32)."""

from __future__ import annotations

import base64
import re
import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RANDOM_BITS = 80
# base32hex's digits, in the order of ours: the C encoder writes the digits, this renames them.
_FROM_BASE32HEX = bytes.maketrans(b"0123456789ABCDEFGHIJKLMNOPQRSTUV", _ALPHABET.encode())
_lock = threading.Lock()
_last = 0


def id_pattern(prefix: str) -> str:
    """The form of the ids `new_id(prefix)` makes, as a regular expression (JSON Schema's dialect too)."""
    return f"^{prefix}_[{_ALPHABET}]{{26}}$"


def is_id(prefix: str, text: str) -> bool:
    """Whether `text` has the form of an id `new_id(prefix)` makes. Anything else names no record, and
    must not reach Redis, where it would name another key (`img_…:images`) or another kind of key."""
    return re.fullmatch(id_pattern(prefix), text) is not None


def lowest_id_at(prefix: str, epoch_ms: int) -> str:
    """The smallest id made at `epoch_ms`: every id made earlier sorts below it."""
    return _encode(prefix, epoch_ms << _RANDOM_BITS)


def new_id(prefix: str) -> str:
    """`img_01jd…`: ids sort by creation time; within one process, strictly in creation order."""
    global _last
    with _lock:
        value = (time.time_ns() // 1_000_000) << _RANDOM_BITS | secrets.randbits(_RANDOM_BITS)
        # Same millisecond as the previous id: count up from it (the monotonic ULID rule).
        value = max(value, _last + 1)
        _last = value
    return _encode(prefix, value)


def _encode(prefix: str, value: int) -> str:
    """`value`'s lowest 130 bits as 26 digits: of the 32 that its 160 bits make, the last 26."""
    digits = base64.b32hexencode(value.to_bytes(20, "big"))[-26:].translate(_FROM_BASE32HEX)
    return f"{prefix}_{digits.decode()}"
