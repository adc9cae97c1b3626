"""Darkroom's configuration: read from the environment once, then passed explicitly."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# The longest a direct upload's signed URL may stay valid (S3's limit on a presigned URL, too).
MAX_UPLOAD_URL_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_LONG_POLL_MAX_WAIT = 25
# A long poll holds a connection and a socket of the web process: longer than this is better asked again.
MAX_LONG_POLL_WAIT_SECONDS = 300
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
# S3 refuses multipart parts under 5 MiB (all but the last).
MIN_S3_PART_BYTES = 5 * 1024 * 1024
DEFAULT_S3_PART_BYTES = 8 * 1024 * 1024
# Above it the kernel would only clamp the nice value to 19.
MAX_NICE_INCREMENT = 19
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """An environment variable holds a value Darkroom cannot use."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = ""
    data_dir: Path = Path("data")
    storage_url: str = ""
    public_url: str = "http://localhost:8000"
    # False when DARKROOM_PUBLIC_URL is unset and public_url is only the web process's own default.
    public_url_configured: bool = True
    allow_private_callbacks: bool = False
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_upload_bytes: int = 50_000_000
    max_pixels: int = 100_000_000
    # Pages (or animation frames) an upload may hold.
    max_pages: int = 1000
    # arq's own timeout is a failure without retry, so ours fires first and records why.
    job_timeout: float = 120.0
    # A job that keeps killing its worker (segfault, OOM) is given up after this many starts.
    max_attempts: int = 3
    worker_concurrency: int = 4
    # Workers share themselves between accounts by plan (jobs/queue.py); off: first come, first served.
    fair_scheduling: bool = True
    # Each worker process runs an express lane and a child bulk lane (jobs/queue.py, jobs/worker.py).
    express_lane: bool = True
    # How much lower the bulk lane's CPU priority is (a nice increment, 1-19).
    bulk_nice: int = 19
    # Largest picture, in decoded bytes, a job may hold whole in memory (turns, flips, smart crops).
    job_memory_bytes: int = 512 * 1024 * 1024
    webhook_timeout: float = 15.0
    webhook_connect_timeout: float = 5.0
    # A `source_url` fetch, retries included, within the image's job_timeout; connecting to it.
    source_timeout: float = 60.0
    source_connect_timeout: float = 10.0
    # Each retry waits its scheduled delay ±this fraction, so a receiver's outage does not end in a stampede.
    retry_jitter: float = 0.2
    # A 429 or a timed-out attempt waits at least this long before the next.
    webhook_slow_down_seconds: float = 60.0
    # An endpoint whose every delivery failed for this long is disabled.
    endpoint_disable_after: float = 5 * 24 * 3600.0
    # A rotated-out signing secret keeps signing (beside the new one) for this long.
    secret_rotation_grace: float = 24 * 3600.0
    webhook_retention: int = 30 * 24 * 3600
    # Seconds an image (record, original, output, variants) is kept after its upload; also the longest
    # retention an upload may ask for, and how long a batch is kept after its creation.
    image_retention: int = 30 * 24 * 3600
    # A batch's ZIP can be downloaded for this long after it is built, then it is deleted.
    archive_ttl: float = 7 * 24 * 3600.0
    # Wall-clock seconds one archive may take to assemble (re-encoding included).
    archive_timeout: float = 3600.0
    # A variant rendered by the web process is stopped after this many seconds.
    variant_render_timeout: float = 20.0
    # One web process's limits on how requests arrive (server/http_limits.py).
    max_header_bytes: int = 65536
    header_timeout: float = 10.0
    max_pending_connections: int = 500
    body_idle_timeout: float = 30.0
    body_timeout: float = 300.0
    # Readiness fails below this much free storage, so a load balancer stops sending uploads.
    min_free_bytes: int = 200_000_000
    # A job that finds the storage full waits for room (with backoff) this long, then fails `storage_full`.
    storage_full_give_up: float = 6 * 3600.0
    # S3-compatible storage (DARKROOM_STORAGE_URL=s3://bucket/prefix): another endpoint than AWS's
    # (MinIO, R2), its region, the multipart part size (memory held per upload), and whether downloads
    # redirect to a presigned GET instead of streaming through the web process.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_part_size: int = DEFAULT_S3_PART_BYTES
    s3_presigned_downloads: bool = False
    # Seconds a direct upload's signed URL stays valid; its image fails `upload_expired` if nothing came.
    upload_url_ttl: int = 3600
    # An Idempotency-Key's stored response is replayed for this many seconds.
    idempotency_ttl: int = 24 * 3600
    # A request holding a key frees it after this long even if its web process died holding it; longer
    # than body_timeout, so a live request's claim never lapses while its body is still arriving.
    idempotency_lock_timeout: float = 360.0
    # Seconds a dashboard sign-in lasts: its session is gone from Redis after this, signed out or not.
    dashboard_session_ttl: int = 8 * 3600
    # Failed authentications (a wrong API key, on the API or the dashboard's sign-in) one client address
    # may make per window, after which it is refused (429) until the window lets one more through.
    failed_auth_limit: int = 10
    failed_auth_window: int = 600
    # The longest a `Prefer: wait=N` long poll waits: below the time the proxies in front of the web
    # processes allow before a response starts (Heroku's router 30 s, AWS API Gateway 29 s). 0: none.
    long_poll_max_wait: int = DEFAULT_LONG_POLL_MAX_WAIT
    queue_name: str = "darkroom:queue"
    # One line per event on stderr: JSON for a log pipeline, or text for a person (`darkroom dev`).
    log_format: str = "json"
    log_level: str = "INFO"

    @property
    def uses_s3(self) -> bool:
        return urlsplit(self.storage_url).scheme == "s3"

    @property
    def storage_root(self) -> Path:
        parsed = urlsplit(self.storage_url)
        if parsed.scheme != "file":
            raise SettingsError(
                f"DARKROOM_STORAGE_URL: unsupported scheme {parsed.scheme!r} (use file:// or s3://)"
            )
        return Path(parsed.path)

    @property
    def s3_location(self) -> tuple[str, str]:
        """The bucket and the key prefix (empty, or ending in `/`) of an `s3://bucket/prefix` URL."""
        parsed = urlsplit(self.storage_url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise SettingsError(f"DARKROOM_STORAGE_URL: {self.storage_url!r} is not s3://bucket[/prefix]")
        prefix = parsed.path.strip("/")
        return parsed.netloc, f"{prefix}/" if prefix else ""

    def require_redis(self) -> str:
        if not self.redis_url:
            raise SettingsError(
                "REDIS_URL is not set: give the service's Redis (redis://host:port/0); darkroom dev "
                "prints its own in its banner and sets it for the processes it starts"
            )
        return self.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("DARKROOM_DATA_DIR", "./data")).resolve()
        port = env.get("PORT", "8000")
        storage_url = env.get("DARKROOM_STORAGE_URL") or data_dir.as_uri()
        # The contract also takes `s3://bucket?endpoint_url=…&region=…`; the variables win over the query.
        query = {name: values[-1] for name, values in parse_qs(urlsplit(storage_url).query).items()}
        part_size = _positive_int(env, "DARKROOM_S3_PART_SIZE", DEFAULT_S3_PART_BYTES)
        if part_size < MIN_S3_PART_BYTES:
            raise SettingsError(f"DARKROOM_S3_PART_SIZE must be at least {MIN_S3_PART_BYTES} (5 MiB)")
        settings = cls(
            redis_url=_redis_url(env),
            data_dir=data_dir,
            storage_url=storage_url,
            public_url=(env.get("DARKROOM_PUBLIC_URL") or f"http://localhost:{port}").rstrip("/"),
            public_url_configured=bool(env.get("DARKROOM_PUBLIC_URL")),
            allow_private_callbacks=_flag(env, "DARKROOM_ALLOW_PRIVATE_CALLBACKS"),
            retry_schedule=_schedule(env.get("DARKROOM_RETRY_SCHEDULE")),
            max_upload_bytes=_positive_int(env, "DARKROOM_MAX_UPLOAD_BYTES", 50_000_000),
            max_pixels=_positive_int(env, "DARKROOM_MAX_PIXELS", 100_000_000),
            max_pages=_positive_int(env, "DARKROOM_MAX_PAGES", 1000),
            job_timeout=float(_positive_int(env, "DARKROOM_JOB_TIMEOUT", 120)),
            worker_concurrency=_positive_int(env, "DARKROOM_WORKER_CONCURRENCY", 4),
            fair_scheduling=_switch(env, "DARKROOM_FAIR_SCHEDULING", default=True),
            express_lane=_switch(env, "DARKROOM_EXPRESS_LANE", default=True),
            bulk_nice=_nice_increment(env, "DARKROOM_BULK_NICE", 19),
            job_memory_bytes=_positive_int(env, "DARKROOM_JOB_MEMORY_MB", 512) * 1024 * 1024,
            retry_jitter=_fraction(env, "DARKROOM_RETRY_JITTER", 0.2),
            webhook_timeout=float(_positive_int(env, "DARKROOM_WEBHOOK_TIMEOUT", 15)),
            source_timeout=_positive_seconds(env, "DARKROOM_SOURCE_TIMEOUT", 60.0),
            webhook_slow_down_seconds=_seconds(env, "DARKROOM_WEBHOOK_SLOW_DOWN", 60.0),
            endpoint_disable_after=_seconds(env, "DARKROOM_ENDPOINT_DISABLE_AFTER", 5 * 24 * 3600.0),
            secret_rotation_grace=_seconds(env, "DARKROOM_SECRET_ROTATION_GRACE", 24 * 3600.0),
            webhook_retention=_positive_int(env, "DARKROOM_WEBHOOK_RETENTION", 30 * 24 * 3600),
            image_retention=_positive_int(env, "DARKROOM_IMAGE_RETENTION", 30 * 24 * 3600),
            archive_ttl=_seconds(env, "DARKROOM_ARCHIVE_TTL", 7 * 24 * 3600.0),
            archive_timeout=float(_positive_int(env, "DARKROOM_ARCHIVE_TIMEOUT", 3600)),
            variant_render_timeout=_positive_seconds(env, "DARKROOM_VARIANT_RENDER_TIMEOUT", 20.0),
            max_header_bytes=_positive_int(env, "DARKROOM_MAX_HEADER_BYTES", 65536),
            header_timeout=_positive_seconds(env, "DARKROOM_HEADER_TIMEOUT", 10.0),
            max_pending_connections=_positive_int(env, "DARKROOM_MAX_PENDING_CONNECTIONS", 500),
            body_idle_timeout=_positive_seconds(env, "DARKROOM_BODY_IDLE_TIMEOUT", 30.0),
            body_timeout=_positive_seconds(env, "DARKROOM_BODY_TIMEOUT", 300.0),
            min_free_bytes=int(
                _non_negative(env, "DARKROOM_MIN_FREE_BYTES", 200_000_000, "a number of bytes")
            ),
            storage_full_give_up=_positive_seconds(env, "DARKROOM_STORAGE_FULL_GIVE_UP", 6 * 3600.0),
            s3_endpoint_url=env.get("DARKROOM_S3_ENDPOINT_URL") or query.get("endpoint_url"),
            s3_region=env.get("DARKROOM_S3_REGION") or query.get("region"),
            s3_part_size=part_size,
            s3_presigned_downloads=_flag(env, "DARKROOM_S3_PRESIGNED_DOWNLOADS"),
            upload_url_ttl=_upload_url_ttl(env),
            log_format=_choice(env, "DARKROOM_LOG_FORMAT", LOG_FORMATS, "json", str.lower),
            log_level=_choice(env, "DARKROOM_LOG_LEVEL", LOG_LEVELS, "INFO", str.upper),
            idempotency_ttl=_positive_int(env, "DARKROOM_IDEMPOTENCY_TTL", 24 * 3600),
            idempotency_lock_timeout=_positive_seconds(env, "DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT", 360.0),
            dashboard_session_ttl=_positive_int(env, "DARKROOM_DASHBOARD_SESSION_TTL", 8 * 3600),
            failed_auth_limit=_positive_int(env, "DARKROOM_FAILED_AUTH_LIMIT", 10),
            failed_auth_window=_positive_int(env, "DARKROOM_FAILED_AUTH_WINDOW", 600),
            long_poll_max_wait=_long_poll_max_wait(env),
        )
        if settings.idempotency_lock_timeout <= settings.body_timeout:
            raise SettingsError(
                "DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT must be longer than DARKROOM_BODY_TIMEOUT "
                f"({settings.body_timeout:g} s): a request still receiving its body would lose its key"
            )
        # A storage URL Darkroom cannot use stops the process at start, not at its first upload.
        _ = settings.s3_location if settings.uses_s3 else settings.storage_root
        return settings


REDIS_URL_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(env: Mapping[str, str]) -> str:
    # redis-py refuses any other URL with a traceback, first met in the middle of a command or a request.
    url = env.get("REDIS_URL", "")
    if url and urlsplit(url).scheme not in REDIS_URL_SCHEMES:
        raise SettingsError(f"REDIS_URL must be redis://host:port/0 (or rediss://, unix://), got {url!r}")
    return url


_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _ON


def _choice(
    env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str, spelling: Callable[[str], str]
) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if spelling(raw) not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return spelling(raw)


def _switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise SettingsError(f"{name} must be on or off, not {raw!r}")


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return value


def _nice_increment(env: Mapping[str, str], name: str, default: int) -> int:
    value = _positive_int(env, name, default)
    if value > MAX_NICE_INCREMENT:
        raise SettingsError(f"{name} must be at most {MAX_NICE_INCREMENT}, got {value}")
    return value


def _upload_url_ttl(env: Mapping[str, str]) -> int:
    ttl = _positive_int(env, "DARKROOM_UPLOAD_URL_TTL", 3600)
    if ttl > MAX_UPLOAD_URL_TTL_SECONDS:
        raise SettingsError(f"DARKROOM_UPLOAD_URL_TTL must be at most {MAX_UPLOAD_URL_TTL_SECONDS} (7 days)")
    return ttl


def _long_poll_max_wait(env: Mapping[str, str]) -> int:
    name = "DARKROOM_LONG_POLL_MAX_WAIT"
    raw = env.get(name, "").strip()
    if raw == "":
        return DEFAULT_LONG_POLL_MAX_WAIT
    # The length first: int() refuses strings of over 4300 digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or int(raw) > MAX_LONG_POLL_WAIT_SECONDS:
        limit = MAX_LONG_POLL_WAIT_SECONDS
        raise SettingsError(f"{name} must be whole seconds from 0 (no long polls) to {limit}, got {raw!r}")
    return int(raw)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return _non_negative(env, name, default, "a number of seconds")


def _positive_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _seconds(env, name, default)
    if value == 0:
        raise SettingsError(f"{name} must be more than zero seconds")
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _non_negative(env, name, default, "a fraction like 0.2")
    if value >= 1:
        raise SettingsError(f"{name} must be a fraction below 1, got {value!r}")
    return value


def _non_negative(env: Mapping[str, str], name: str, default: float, meaning: str) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {meaning}, got {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise SettingsError(f"{name} must be {meaning}, zero or more, got {raw!r}")
    return value


def _schedule(raw: str | None) -> tuple[float, ...]:
    if raw is None or raw.strip() == "":
        return DEFAULT_RETRY_SCHEDULE
    try:
        delays = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"DARKROOM_RETRY_SCHEDULE must be comma-separated seconds, got {raw!r}") from None
    if any(delay < 0 for delay in delays):
        raise SettingsError("DARKROOM_RETRY_SCHEDULE delays must not be negative")
    return delays
