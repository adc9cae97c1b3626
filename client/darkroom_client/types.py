"""Typed resources: what the service answers, as dataclasses. `raw` keeps the whole JSON document, so
fields added by newer versions of the service are never lost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

TERMINAL_IMAGE_STATUSES = frozenset({"completed", "failed"})


@dataclass(frozen=True)
class Image:
    id: str
    status: str
    operations: list[dict[str, Any]]
    input: dict[str, Any] | None
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    batch_id: str | None
    callback_url: str | None
    metadata: dict[str, Any]
    created_at: str
    completed_at: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        return cls(
            id=data["id"],
            status=data["status"],
            operations=data.get("operations") or [],
            input=data.get("input"),
            output=data.get("output"),
            error=data.get("error"),
            batch_id=data.get("batch_id"),
            callback_url=data.get("callback_url"),
            metadata=data.get("metadata") or {},
            created_at=data.get("created_at", ""),
            completed_at=data.get("completed_at"),
            raw=data,
        )

    @property
    def done(self) -> bool:
        """Completed or failed: it will not change any more."""
        return self.status in TERMINAL_IMAGE_STATUSES

    @property
    def filename(self) -> str | None:
        return None if self.input is None else self.input.get("filename")


@dataclass(frozen=True)
class Archive:
    status: str
    url: str | None
    bytes: int | None
    expires_at: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Archive:
        return cls(data["status"], data.get("url"), data.get("bytes"), data.get("expires_at"))


@dataclass(frozen=True)
class Batch:
    id: str
    status: str
    counts: dict[str, int]
    archive: Archive | None
    operations: list[dict[str, Any]]
    metadata: dict[str, Any]
    created_at: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        archive = data.get("archive")
        return cls(
            id=data["id"],
            status=data["status"],
            counts=data.get("counts") or {},
            archive=None if archive is None else Archive.from_json(archive),
            operations=data.get("operations") or [],
            metadata=data.get("metadata") or {},
            created_at=data.get("created_at", ""),
            raw=data,
        )

    @property
    def finished(self) -> int:
        """Images completed or failed so far."""
        return self.counts.get("completed", 0) + self.counts.get("failed", 0)

    @property
    def done(self) -> bool:
        """Completed, and its archive (if it asked for one) ready or failed."""
        if self.status != "completed":
            return False
        return self.archive is None or self.archive.status not in ("pending", "building")


@dataclass(frozen=True)
class WebhookEndpoint:
    id: str
    url: str
    events: list[str]
    status: str
    description: str | None
    # Only in the answer that created the endpoint (or rotated its secret).
    secret: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WebhookEndpoint:
        return cls(
            id=data["id"],
            url=data["url"],
            events=data.get("events") or [],
            status=data.get("status", ""),
            description=data.get("description"),
            secret=data.get("secret"),
            raw=data,
        )


@dataclass(frozen=True)
class Delivery:
    """A webhook message (`msg_…`) and its delivery to each destination, every attempt included."""

    id: str
    event_type: str
    status: str
    destinations: list[dict[str, Any]]
    payload: dict[str, Any]
    created_at: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Delivery:
        return cls(
            id=data["id"],
            event_type=data.get("event_type", ""),
            status=data.get("status", ""),
            destinations=data.get("destinations") or [],
            payload=data.get("payload") or {},
            created_at=data.get("created_at", ""),
            raw=data,
        )


Item = TypeVar("Item")


@dataclass(frozen=True)
class Page(Generic[Item]):
    """One page of a list; pass `next_cursor` as `cursor` for the next."""

    data: list[Item]
    has_more: bool
    next_cursor: str | None
