"""`upload` and `batch` from the command line, with progress bars (bytes sent, images done) and a summary
of what failed. The service's `darkroom` command has them as subcommands (`darkroom upload …`); installed
alone (`pip install './client[cli]'`) they are `darkroom-client upload …`.

Exit codes: 0 all done, 1 any image failed (or an API error ended the run), 2 bad usage: no key or a
refused one, no such file, no service at the URL (the run stops at the first answer saying so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from darkroom_client.client import DEFAULT_BASE_URL, Darkroom
from darkroom_client.errors import AuthenticationError, DarkroomError, TransportError
from darkroom_client.flows import folder_files
from darkroom_client.types import Image

API_KEY_VARIABLE = "DARKROOM_API_KEY"
URL_VARIABLE = "DARKROOM_URL"


def parse_operation(text: str) -> dict[str, Any]:
    """`resize:width=800,fit=cover` (values read as JSON where they are: numbers, true, false), or an
    operation as JSON (`{"type": "resize", "params": {"width": 800}}`)."""
    if text.lstrip().startswith("{"):
        try:
            operation = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {exc}") from None
        if not isinstance(operation, dict):
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
        return operation
    kind, _, rest = text.partition(":")
    if not kind:
        raise argparse.ArgumentTypeError(f"{text!r}: write TYPE or TYPE:name=value,name=value")
    params: dict[str, Any] = {}
    for pair in filter(None, rest.split(",")):
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise argparse.ArgumentTypeError(f"{pair!r} in {text!r} is not name=value")
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
    return {"type": kind, "params": params}


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help=f"the account's key (default: ${API_KEY_VARIABLE})")
    parser.add_argument(
        "--url", help=f"the service's base URL (default: ${URL_VARIABLE}, or {DEFAULT_BASE_URL})"
    )
    parser.add_argument(
        "--op",
        dest="operations",
        action="append",
        type=parse_operation,
        metavar="TYPE[:NAME=VALUE,…]",
        help="an operation, in order; repeat it (--op resize:width=800 --op convert:format=webp)",
    )
    parser.add_argument("--callback-url", help="where to send the signed webhooks")
    parser.add_argument("--metadata", type=_json_object, help="a JSON object kept with each image")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits at most (600)")


def add_commands(commands: Any) -> None:
    """Add `upload` and `batch` to an argparse subparsers object (`ArgumentParser.add_subparsers()`)."""
    upload = commands.add_parser(
        "upload",
        help="upload photos (files or folders), optionally wait and download the results",
        description="Upload photos with the operations to apply; --wait waits for them, --out saves"
        " the results.",
    )
    upload.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="files, or folders of files")
    _add_connection_arguments(upload)
    upload.add_argument("--wait", action="store_true", help="wait until every image is completed or failed")
    upload.add_argument("--out", type=Path, metavar="DIR", help="save each result into DIR (implies --wait)")
    upload.add_argument(
        "--concurrency", type=_positive, default=4, help="photos sent (and waited for) at once (4)"
    )
    upload.set_defaults(run=run_upload)

    batch = commands.add_parser(
        "batch",
        help="send a folder as one batch, optionally wait and download its ZIP",
        description="Create a batch, add FOLDER's files, seal it; --wait waits for it, --download saves"
        " its ZIP.",
    )
    batch.add_argument("folder", type=Path, metavar="FOLDER")
    _add_connection_arguments(batch)
    batch.add_argument("--archive", action="store_true", help="build one ZIP of the results")
    batch.add_argument(
        "--archive-format",
        choices=["original", "jpeg", "png", "webp"],
        help="re-encode the ZIP's entries (implies --archive)",
    )
    batch.add_argument("--wait", action="store_true", help="wait until the batch (and its ZIP) is done")
    batch.add_argument(
        "--download", type=Path, metavar="ZIP", help="save the ZIP here (implies --archive and --wait)"
    )
    batch.set_defaults(run=run_batch)


def _client(args: argparse.Namespace, environ: dict[str, str]) -> Darkroom | None:
    api_key = args.api_key or environ.get(API_KEY_VARIABLE)
    if not api_key:
        print(f"darkroom {args.command}: give --api-key or set {API_KEY_VARIABLE}", file=sys.stderr)
        return None
    try:
        return Darkroom(api_key, _base_url(args, environ))
    except ValueError as error:
        print(f"darkroom {args.command}: {error} (--url or {URL_VARIABLE})", file=sys.stderr)
        return None


def _base_url(args: argparse.Namespace, environ: dict[str, str]) -> str:
    return str(args.url or environ.get(URL_VARIABLE) or DEFAULT_BASE_URL)


# Errors no photo gets past: every other one would fail the same way (each after its retries).
_SETUP_ERRORS = (AuthenticationError, TransportError)


def _setup_problem(error: DarkroomError, base_url: str) -> str:
    """What to change when the key is refused or nothing answers at the URL."""
    if isinstance(error, AuthenticationError):
        return f"{error}; give the account's key with --api-key or {API_KEY_VARIABLE}"
    return f"no answer from {base_url} ({error}): is the service running there? (--url or {URL_VARIABLE})"


class _AmountColumn(ProgressColumn):
    """Bytes for the bar that counts bytes (with their speed), images for the one that counts images."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()
        self._speed = TransferSpeedColumn()
        self._images = MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "bytes":
            return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))
        return Text.assemble(self._images.render(task), " images")


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        _AmountColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _byte_bar(bars: Progress, photos: Sequence[Path]) -> Callable[[int], None]:
    """A bar for the bytes of `photos`, and the callback that advances it."""
    task = bars.add_task("sending", total=sum(photo.stat().st_size for photo in photos), unit="bytes")
    return lambda sent: bars.advance(task, sent)


class Outcome:
    """What became of each photo: the image, or why it was refused; printed as the summary."""

    def __init__(self) -> None:
        self.images: list[Image] = []
        self.refused: list[tuple[str, str]] = []

    def failures(self) -> list[tuple[str, str]]:
        """(file name, why) of every photo refused or failed, by name."""
        failed = [
            (
                image.filename or image.id,
                f"{image.id} {image.error.get('code')}: {image.error.get('message')}",
            )
            for image in self.images
            if image.status == "failed" and image.error is not None
        ]
        return sorted(self.refused + failed)

    def report(self, console: Console) -> int:
        """Print the counts and every failure; the exit code: 1 when anything failed."""
        completed = sum(image.status == "completed" for image in self.images)
        failures = self.failures()
        unfinished = len(self.images) + len(self.refused) - completed - len(failures)
        words = [f"{completed} completed", f"{len(failures)} failed"]
        if unfinished:
            words.append(f"{unfinished} still processing")
        console.print(", ".join(words), highlight=False)
        for image in sorted(self.images, key=lambda image: image.filename or image.id):
            if not image.done:  # not waited for: the ids to look them up by later
                console.print(
                    f"  · {image.filename}: {image.id} {image.status}", markup=False, soft_wrap=True
                )
        for name, why in failures:
            _say_failed(console, f"  ✗ {name}: {why}")
        return 1 if failures else 0


def _say_failed(console: Console, line: str) -> None:
    console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)


def run_upload(args: argparse.Namespace, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ) if environ is None else environ
    darkroom = _client(args, environ)
    if darkroom is None:
        return 2
    console = Console(stderr=True)
    photos = [photo for given in args.photos for photo in folder_files(given)]
    missing = [str(photo) for photo in photos if not photo.is_file()]
    if missing:
        console.print(f"darkroom upload: no such file: {', '.join(missing)}", markup=False, soft_wrap=True)
        return 2
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    waiting = args.wait or args.out is not None
    outcome = Outcome()
    stopped: list[DarkroomError] = []
    with darkroom, _bars(console) as bars:
        sent = _byte_bar(bars, photos)
        done = bars.add_task("processing", total=len(photos)) if waiting else None

        def send_one(photo: Path) -> None:
            if stopped:
                return
            try:
                image = darkroom.images.upload(
                    photo,
                    operations=args.operations,
                    callback_url=args.callback_url,
                    metadata=args.metadata,
                    progress=sent,
                )
                if done is not None:
                    image = darkroom.images.wait(image.id, timeout=args.timeout)
                    if image.status == "completed" and args.out is not None:
                        darkroom.images.download_to(image.id, args.out)
            except _SETUP_ERRORS as exc:
                stopped.append(exc)
                return
            except DarkroomError as exc:
                outcome.refused.append((photo.name, str(exc)))
            else:
                outcome.images.append(image)
            if done is not None:
                bars.advance(done)

        # Threads share the client's connection pool; each photo goes up, is waited for and saved on its own.
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            list(pool.map(send_one, photos))
    if stopped:
        if outcome.images or outcome.refused:
            outcome.report(console)
        _say_failed(console, f"darkroom upload: {_setup_problem(stopped[0], _base_url(args, environ))}")
        return 2
    return outcome.report(console)


def run_batch(args: argparse.Namespace, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ) if environ is None else environ
    darkroom = _client(args, environ)
    if darkroom is None:
        return 2
    console = Console(stderr=True)
    if not args.folder.is_dir():
        console.print(f"darkroom batch: {args.folder} is not a folder")
        return 2
    photos = folder_files(args.folder)
    if not photos:
        console.print(f"darkroom batch: {args.folder} has no files")
        return 2
    archive: bool | dict[str, Any] | None = None
    if args.archive_format is not None:
        archive = {"format": args.archive_format}
    elif args.archive or args.download is not None:
        archive = True
    waiting = args.wait or args.download is not None
    outcome = Outcome()
    try:
        with darkroom, _bars(console) as bars:
            batch = darkroom.batches.create(
                operations=args.operations,
                callback_url=args.callback_url,
                archive=archive,
                metadata=args.metadata,
            )
            console.print(f"batch {batch.id}", highlight=False, soft_wrap=True)
            darkroom.batches.add(
                batch.id,
                photos,
                progress=_byte_bar(bars, photos),
                refused=lambda name, why: outcome.refused.append((name, why)),
            )
            darkroom.batches.seal(batch.id)
            if waiting:
                done = bars.add_task("processing", total=len(photos) - len(outcome.refused))
                batch = darkroom.batches.wait(
                    batch.id,
                    timeout=args.timeout,
                    on_poll=lambda seen: bars.update(done, completed=seen.finished),
                )
                if args.download is not None and batch.archive is not None:
                    if batch.archive.status == "ready":
                        darkroom.batches.download_archive(batch.id, args.download)
                        console.print(f"archive saved to {args.download}", highlight=False, soft_wrap=True)
                    else:
                        outcome.refused.append(("archive", f"the archive is {batch.archive.status}"))
            outcome.images = list(darkroom.images.list(batch_id=batch.id, limit=100))
    except _SETUP_ERRORS as exc:
        _say_failed(console, f"darkroom batch: {_setup_problem(exc, _base_url(args, environ))}")
        return 2
    except DarkroomError as exc:
        _say_failed(console, f"darkroom batch: {exc}")
        return 1
    return outcome.report(console)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darkroom-client", description="Send photos to Darkroom")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
