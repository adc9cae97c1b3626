"""The records Darkroom keeps: accounts and images, with their public JSON shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from jobs.params import Bounds, FieldError, Params
from jobs.plans import DEFAULT_TIER, TIERS, Plan
from webhooks.endpoints import SigningSecret
from webhooks.messages import is_endpoint, iso, now_ms

ImageStatus = Literal["queued", "processing", "completed", "failed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed"})


def utc_now() -> str:
    """ISO 8601 with milliseconds and a Z, the timestamp format of every resource."""
    return iso(now_ms())


def epoch_ms(moment: str) -> int:
    """An ISO 8601 timestamp of a resource as epoch milliseconds (the scores of sorted sets)."""
    return int(datetime.fromisoformat(moment).timestamp() * 1000)


# `dr:account:{id}` holds the account's JSON (jobs/store.py); the queue reads plans from it.
ACCOUNT_KEY_PREFIX = "dr:account:"


def original_key(account_id: str, image_id: str) -> str:
    return f"{account_id}/{image_id}/original"


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    webhook_secret: str
    api_key_hash: str
    created_at: str
    # Secrets rotated out and when they stop signing: (secret, epoch ms).
    retired_webhook_secrets: tuple[tuple[str, int], ...] = ()
    plan: Plan = TIERS[DEFAULT_TIER]

    @property
    def signing_secrets(self) -> list[SigningSecret]:
        """The callback secrets, current first, as endpoints keep theirs."""
        retired = (SigningSecret(secret, expires) for secret, expires in self.retired_webhook_secrets)
        return [SigningSecret(self.webhook_secret), *retired]

    def with_signing_secrets(self, secrets: Sequence[SigningSecret]) -> Account:
        current, *retired = secrets
        kept = tuple((each.secret, each.expires_at_ms) for each in retired if each.expires_at_ms is not None)
        return replace(self, webhook_secret=current.secret, retired_webhook_secrets=kept)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Account:
        data = json.loads(raw)
        data["retired_webhook_secrets"] = tuple(
            (secret, expires) for secret, expires in data.get("retired_webhook_secrets", ())
        )
        # Accounts made before plans existed have the default tier.
        data["plan"] = Plan.from_dict(data["plan"]) if "plan" in data else TIERS[DEFAULT_TIER]
        return cls(**data)


@dataclass(frozen=True)
class InputInfo:
    format: str
    width: int
    height: int
    pages: int
    bytes: int
    filename: str | None = None


UploadStatus = Literal["pending", "received", "started", "refused", "expired"]
UploadStart = Literal["on_upload", "on_request"]


def source_filename(url: str) -> str | None:
    """The name a source URL gives its file (its path's last segment), as an upload's file name."""
    name = unquote(urlsplit(url).path.rpartition("/")[2])
    return name[:255] or None


@dataclass(frozen=True)
class UploadState:
    """An image created by `POST /v1/uploads`, whose bytes the partner sends to a signed URL.

    `pending` until they land; then `started` (handed to processing) if the upload said how to process
    it (`starts` `on_upload`), else `received` until `POST /v1/images {upload_id}` starts it. Bytes
    failing the upload checks end it `refused` (the image `failed`), and bytes never sent `expired`."""

    id: str
    status: UploadStatus
    starts: UploadStart
    # Declared at creation: the PUT must carry exactly this many bytes.
    size: int
    content_type: str
    expires_at: str
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
    # None until its bytes land (a direct upload) or its source_url is fetched.
    input: InputInfo | None
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
    # The webhook message announcing the terminal state, fixed once so a re-run re-announces the same one,
    # and whom it went to: CALLBACK or endpoint ids, in its order.
    event_message_id: str | None = None
    event_destinations: tuple[str, ...] = ()
    # When the retention sweep deletes it (ISO 8601); None for images stored before retention existed.
    expires_at: str | None = None
    upload: UploadState | None = None
    # Where the worker fetches the original from, for an image submitted by URL.
    source_url: str | None = None
    # The X-Request-Id of the request that created it: the worker's and dispatcher's log lines carry it.
    request_id: str | None = None
    # When its job was queued, for a direct upload (once its bytes landed, or its start was asked for):
    # its wait in our queue starts then, not when the partner declared it. None: at `created_at`.
    queued_at: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def queue_wait_ms(self) -> float | None:
        """From its job's queueing to the start of its processing (the last start, for a job run again)."""
        if self.started_at is None:
            return None
        return float(epoch_ms(self.started_at) - epoch_ms(self.queued_at or self.created_at))

    @property
    def filename(self) -> str | None:
        """The partner's name for the file: as uploaded, as declared for a direct upload, or as its
        source URL names it."""
        if self.input is not None:
            return self.input.filename
        if self.upload is not None:
            return self.upload.filename
        return None if self.source_url is None else source_filename(self.source_url)

    @property
    def resource_ids(self) -> tuple[str, ...]:
        """What its events are about, for the delivery log's filters: the image, and its batch."""
        return (self.id,) if self.batch_id is None else (self.id, self.batch_id)

    @property
    def awaits_start(self) -> bool:
        """A direct upload not yet handed to processing: it has no job until its bytes land (and, for
        one created without operations, until `POST /v1/images` starts it)."""
        return self.upload is not None and self.upload.status in ("pending", "received")

    def expired_at(self, moment: str) -> bool:
        """Past its retention at `moment` (ISO 8601), even before the sweep has deleted it."""
        return self.expires_at is not None and self.expires_at <= moment

    def evolve(self, **changes: Any) -> ImageRecord:
        return replace(self, **changes)

    def to_json(self) -> str:
        # What dataclasses.asdict makes, built directly: asdict deep-copies every value on the way, and
        # a record is written several times per image.
        data = dict(vars(self))
        data["input"] = None if self.input is None else vars(self.input)
        data["upload"] = None if self.upload is None else vars(self.upload)
        data["output"] = None if self.output is None else vars(self.output)
        data["error"] = None if self.error is None else vars(self.error)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ImageRecord:
        data = json.loads(raw)
        data["input"] = InputInfo(**data["input"]) if data.get("input") else None
        data["upload"] = UploadState(**data["upload"]) if data.get("upload") else None
        data["output"] = OutputInfo(**data["output"]) if data.get("output") else None
        data["error"] = ImageError(**data["error"]) if data.get("error") else None
        data["event_destinations"] = tuple(data.get("event_destinations", ()))
        return cls(**data)

    def resource(self, public_url: str) -> dict[str, Any]:
        """The image as partners see it (CONTRACT "Image resource")."""
        base = f"{public_url}/v1/images/{self.id}"
        return {
            "object": "image",
            "id": self.id,
            "status": self.status,
            "operations": self.operations,
            "input": None
            if self.input is None
            else {
                "format": self.input.format,
                "width": self.input.width,
                "height": self.input.height,
                "pages": self.input.pages,
                "bytes": self.input.bytes,
                "filename": self.input.filename,
                "url": f"{base}/original",
            },
            "source": None if self.source_url is None else {"url": self.source_url},
            "upload": None
            if self.upload is None
            else {
                "id": self.upload.id,
                "status": self.upload.status,
                "starts": self.upload.starts,
                "filename": self.upload.filename,
                "content_type": self.upload.content_type,
                "size": self.upload.size,
                "expires_at": self.upload.expires_at,
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
            "webhooks": [
                {
                    "id": self.event_message_id,
                    "type": f"image.{self.status}",
                    "endpoint_id": destination if is_endpoint(destination) else None,
                }
                for destination in self.event_destinations
            ],
            "batch_id": self.batch_id,
            "callback_url": self.callback_url,
            "metadata": self.metadata,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
        }


BatchStatus = Literal["open", "sealed", "processing", "completed"]
ArchiveFormat = Literal["jpeg", "png", "webp", "original"]
ArchiveStatus = Literal["pending", "building", "ready", "failed", "expired"]
LOSSY_ARCHIVE_FORMATS = ("jpeg", "webp")
# The batch hash's counters: its images by status, and all of them.
BATCH_TOTAL = "total"
BATCH_COUNTERS = (BATCH_TOTAL, "queued", "processing", "completed", "failed")


@dataclass(frozen=True)
class ArchiveSpec(Params):
    """The ZIP a batch asked for: "original" keeps each result as stored, another format re-encodes."""

    format: ArchiveFormat = "original"
    quality: Annotated[int | None, Bounds(1, 100)] = None

    def problems(self) -> Iterator[FieldError]:
        if self.quality is not None and self.format not in LOSSY_ARCHIVE_FORMATS:
            yield FieldError("quality", f"applies to {' and '.join(LOSSY_ARCHIVE_FORMATS)} only")


@dataclass(frozen=True)
class ArchiveState:
    status: ArchiveStatus = "pending"
    key: str | None = None
    size: int | None = None
    etag: str | None = None
    built_at: str | None = None
    expires_at: str | None = None
    error: ImageError | None = None
    # The batch.archive.ready or .failed message, fixed once so a re-run re-announces the same one.
    message_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ArchiveState:
        data = json.loads(raw)
        data["error"] = ImageError(**data["error"]) if data.get("error") else None
        return cls(**data)

    def seen_at(self, moment: str) -> ArchiveState:
        """As a partner sees it at `moment` (ISO 8601): a ready archive past its expiry is expired, even
        before the sweep has removed its file."""
        if self.status == "ready" and self.expires_at is not None and self.expires_at <= moment:
            return replace(self, status="expired")
        return self


@dataclass(frozen=True)
class BatchCounts:
    total: int = 0
    queued: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def unfinished(self) -> int:
        return self.queued + self.processing


@dataclass(frozen=True)
class BatchRecord:
    """A batch is a Redis hash: its fixed fields as one JSON `record`, then counters and states that
    different transactions change without overwriting each other (see jobs/batches.py)."""

    id: str
    account_id: str
    created_at: str
    operations: list[dict[str, Any]] = field(default_factory=list)
    callback_url: str | None = None
    archive: ArchiveSpec | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    counts: BatchCounts = BatchCounts()
    sealed_at: str | None = None
    completed_at: str | None = None
    completion_message_id: str | None = None
    archive_state: ArchiveState | None = None
    # When the retention sweep deletes it, if its images have gone by then: the later of its creation
    # plus the retention and its images' expiries.
    expires_at: str | None = None
    # The X-Request-Id of the request that created it, carried by its webhook messages.
    request_id: str | None = None

    @property
    def status(self) -> BatchStatus:
        if self.sealed_at is None:
            return "open"
        if self.completed_at is not None:
            return "completed"
        started = self.counts.processing + self.counts.completed + self.counts.failed
        return "processing" if started else "sealed"

    @property
    def is_settled(self) -> bool:
        """Completed, with its archive (if one was asked for) ready or failed: what a partner waits for."""
        building = self.archive_state is not None and self.archive_state.status in ("pending", "building")
        return self.status == "completed" and not building

    def fixed_json(self) -> str:
        fixed = {
            "id": self.id,
            "account_id": self.account_id,
            "created_at": self.created_at,
            "operations": self.operations,
            "callback_url": self.callback_url,
            "archive": None if self.archive is None else asdict(self.archive),
            "metadata": self.metadata,
            "request_id": self.request_id,
        }
        return json.dumps(fixed, separators=(",", ":"))

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> BatchRecord | None:
        """The record from HGETALL of its hash; None if there is no such batch."""
        fields = {name.decode(): value.decode() for name, value in raw.items()}
        if "record" not in fields:
            return None
        fixed = json.loads(fields["record"])
        fixed["archive"] = ArchiveSpec(**fixed["archive"]) if fixed["archive"] else None
        return cls(
            **fixed,
            counts=BatchCounts(**{name: int(fields.get(name, 0)) for name in BATCH_COUNTERS}),
            sealed_at=fields.get("sealed_at"),
            completed_at=fields.get("completed_at"),
            completion_message_id=fields.get("completion_message_id"),
            expires_at=fields.get("expires_at"),
            archive_state=ArchiveState.from_json(fields["archive"]) if "archive" in fields else None,
        )

    def resource(self, public_url: str, moment: str | None = None) -> dict[str, Any]:
        """The batch as partners see it at `moment` (now by default)."""
        return {
            "object": "batch",
            "id": self.id,
            "status": self.status,
            "counts": asdict(self.counts),
            "operations": self.operations,
            "archive": self._archive_resource(public_url, moment or utc_now()),
            "callback_url": self.callback_url,
            "metadata": self.metadata,
            "images_url": f"{public_url}/v1/images?batch_id={self.id}",
            "created_at": self.created_at,
            "sealed_at": self.sealed_at,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
        }

    def _archive_resource(self, public_url: str, moment: str) -> dict[str, Any] | None:
        if self.archive is None:
            return None
        state = (self.archive_state or ArchiveState()).seen_at(moment)
        return {
            "format": self.archive.format,
            "quality": self.archive.quality,
            "status": state.status,
            "url": f"{public_url}/v1/batches/{self.id}/archive" if state.status == "ready" else None,
            "bytes": state.size if state.status == "ready" else None,
            "expires_at": state.expires_at,
            "error": None if state.error is None else asdict(state.error),
        }
