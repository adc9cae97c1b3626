"""Each process's logging, set up once at its start from Settings: every line on stderr, as JSON (one
object per line, for a log pipeline) or as text (for a person, in `darkroom dev`).

Plain `logging` throughout, with a formatter of ours rather than structlog or python-json-logger: our
modules, arq and uvicorn all log through `logging` already, so one handler on the root logger formats
every line alike (structlog would be a second pipeline beside theirs, routed back into this one), and
the fields bound with `webhooks.log_context.bind` (a request id, an image id) join each line logged while
they are bound, which is all a context-binding library would bring here.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import time
from datetime import UTC, datetime
from typing import Any

from jobs.settings import Settings
from webhooks.log_context import bound

# What every LogRecord has: anything else on a record was passed as `extra=` and becomes a field (but
# uvicorn's `color_message`, its message again with terminal colours).
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# Loggers that bring handlers of their own (uvicorn's, arq's): theirs go, their lines reach ours.
_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "arq")
# uvicorn's access line says less than the web's own line for each request (server/request_log.py).
_SILENCED_LOGGERS = ("uvicorn.access",)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of a line besides its message: those bound where it was logged, then its `extra`
    (those that are None left out)."""
    extra = {
        name: value
        for name, value in vars(record).items()
        if name not in _RECORD_ATTRIBUTES and value is not None
    }
    return {**bound(), **extra}


class JsonFormatter(logging.Formatter):
    """`{"time": …, "level": …, "logger": …, "message": …, <fields>}`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


# A request's path (decoded: %0A is a newline) is logged as the client sent it.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """Control characters shown escaped, so that what a client sent cannot start a forged line."""
    return _CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


class TextFormatter(logging.Formatter):
    """`12:00:00 INFO darkroom.web GET /v1/images 202 request_id=req_… latency_ms=12.3`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{name}={_printable(str(value))}" for name, value in fields_of(record).items())
        if not fields:
            return text
        # After the message's first line, so a traceback below it stays as printed.
        head, newline, rest = text.partition("\n")
        return f"{head} {fields}{newline}{rest}"


class FairQueueDelay(logging.Filter):
    """arq's line for a job it starts adds `delayed=` (now minus the job's score) past 1.2 s; a fairly
    queued job's score is a virtual-time tag (jobs/queue.py), not a time, which read
    'delayed=4505396273699.83s'. That part goes; the line's first figure is the job's wait already."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 4 and isinstance(args[3], str):
            before, found, delay = args[3].partition(" delayed=")
            # A delay longer than the time since 1970 has no time for its score.
            if found and float(delay.removesuffix("s")) > time.time():
                record.args = (*args[:3], before)
        return True


def log_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: also what arq's `--custom-log-dict` takes."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"darkroom": {"()": formatter}},
        "filters": {"fair_queue_delay": {"()": FairQueueDelay}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "darkroom"}},
        "root": {"handlers": ["stderr"], "level": settings.log_level},
        "loggers": {
            **{
                name: {"handlers": [], "propagate": True, "level": settings.log_level}
                for name in _LIBRARY_LOGGERS
            },
            **{name: {"handlers": [], "propagate": False} for name in _SILENCED_LOGGERS},
            "arq.worker": {"filters": ["fair_queue_delay"]},
        },
    }


def configure_logging(settings: Settings) -> None:
    logging.config.dictConfig(log_config(settings))
