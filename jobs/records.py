"""The records Darkroom keeps: accounts and images, with their public JSON shapes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

ImageStatus = Literal["queued", "processing", "completed", "failed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed"})


def utc_now() -> str:
    """ISO 8601 with milliseconds and a Z, the timestamp format of every resource."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    webhook_secret: str
    api_key_hash: str
    created_at: str
    # Secrets rotated out and when they stop signing: (secret, epoch ms).
    retired_webhook_secrets: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Account:
        data = json.loads(raw)
        data["retired_webhook_secrets"] = tuple(
            (secret, expires) for secret, expires in data.get("retired_webhook_secrets", ())
        )
        return cls(**data)


@dataclass(frozen=True)
class InputInfo:
    format: str
    width: int
    height: int
    pages: int
    bytes: int
    filename: str | None = None


@dataclass(frozen=True)
class OutputInfo:
    format: str
    width: int
    height: int
    bytes: int
    key: str


@dataclass(frozen=True)
class ImageError:
    code: str
    message: str


@dataclass(frozen=True)
class ImageRecord:
    id: str
    account_id: str
    status: ImageStatus
    operations: list[dict[str, Any]]
    input: InputInfo
    original_key: str
    created_at: str
    callback_url: str | None = None
    batch_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    output: OutputInfo | None = None
    error: ImageError | None = None
    attempts: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    # The webhook message announcing the terminal state, fixed once so a re-run re-announces the same one.
    event_message_id: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def evolve(self, **changes: Any) -> ImageRecord:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ImageRecord:
        data = json.loads(raw)
        data["input"] = InputInfo(**data["input"])
        data["output"] = OutputInfo(**data["output"]) if data.get("output") else None
        data["error"] = ImageError(**data["error"]) if data.get("error") else None
        return cls(**data)

    def resource(self, public_url: str) -> dict[str, Any]:
        """The image as partners see it (CONTRACT "Image resource")."""
        base = f"{public_url}/v1/images/{self.id}"
        return {
            "object": "image",
            "id": self.id,
            "status": self.status,
            "operations": self.operations,
            "input": {
                "format": self.input.format,
                "width": self.input.width,
                "height": self.input.height,
                "pages": self.input.pages,
                "bytes": self.input.bytes,
                "filename": self.input.filename,
                "url": f"{base}/original",
            },
            "output": None
            if self.output is None
            else {
                "format": self.output.format,
                "width": self.output.width,
                "height": self.output.height,
                "bytes": self.output.bytes,
                "url": f"{base}/output",
            },
            "error": None if self.error is None else asdict(self.error),
            "batch_id": self.batch_id,
            "callback_url": self.callback_url,
            "metadata": self.metadata,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }
