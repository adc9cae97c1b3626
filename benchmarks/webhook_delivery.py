"""Webhook delivery: one worker process against raw aiohttp, and how long an event waits. Same run.

    python benchmarks/webhook_delivery.py [--messages 10000] [--rounds 3] [--rate 200] [--seconds 10]
        [--uploads 50]

It starts what production runs — an embedded redis-server (AOF on), `uvicorn server.app:app` and one
`arq jobs.worker.WorkerSettings` (DARKROOM_ALLOW_PRIVATE_CALLBACKS=1) — plus a fast receiver in a child
process of its own (asyncio + httptools, uvloop when installed) that answers 200, stamps each request
with `time.time_ns()` and verifies the signature of every --verify-every'th one. Messages are made as
the service makes them: `webhooks.messages.new_message`, staged with `MessageStore.stage_new` in a Redis
transaction, for an account made with `Store.create_account`.

1. Throughput, --rounds rounds of --messages messages, in turns:
   - worker, callback: messages whose one destination is a callback URL (signed with the account's
     secret), committed in one transaction while the worker idles;
   - raw: an aiohttp ClientSession in this process posts the same bodies with the same headers (signed
     here per request, as the worker signs per attempt), --concurrency at a time;
   - worker, endpoint: messages for a registered endpoint (its own secret, max_in_flight above the
     worker's concurrency, so the endpoint limit is not what is measured).
   Deliveries/s count from the first to the last receipt at the receiver, the same clock for all; the
   worker's pick-up (commit to first receipt) is reported apart. CPU ms per delivery of worker,
   redis-server, receiver and this process come from /proc.
2. Latency: one message every 1/--rate s for --seconds s, each in its own transaction, from the event
   (the message's `created_at`, stamped just before its transaction) to its receipt; the goal is judged
   on this. Also from the moment this process saw its transaction return: a lower bound, negative when
   this process is starved of CPU and resumes after the delivery already arrived. The worker's
   dispatcher polls its due set every `idle_wait` and is nudged only by events made in its own process,
   so this shows what that poll costs.
3. The same latency run while the worker is busy with --uploads slow image jobs (a 12 MP JPEG, resize
   4000 + sharpen + convert png, uploaded through the web process without callback URLs, so that no
   image event nudges the dispatcher): delivery must not wait behind image processing.
4. Dead receivers: for each K in --hanging (1, 2, 10, 100), K endpoints, each on an origin of its own (a
   port of a server in this process that accepts connections, reads and never answers), get a backlog of
   --hanging-backlog messages each, committed at once; then the latency run of 2. to the fast receiver,
   which has answered before. Its event-to-receipt p50/p99 must not care how many receivers hang. The
   endpoints are then deleted (their pending deliveries end) and the servers closed before the next K.

Prints one JSON object. Issue 4's goals: worker ≥ 0.5 x raw deliveries/s; p99 event to receipt ≤ 100 ms.
Issue 11's: with any number of hanging receivers, the fast receiver's p99 event to receipt < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import inspect
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pyvips
from photos import corpus_jpegs, generated_jpegs, megapixels
from redis.asyncio import Redis
from throughput import (
    HOOK_OK,
    RequestConnection,
    Service,
    cpu_seconds,
    iso_seconds,
    machine_busy_seconds,
    percentile,
    processes_total,
    running_service,
    wait_ready,
)

from jobs.ids import new_id
from jobs.store import Store
from webhooks.dispatcher import Dispatcher
from webhooks.endpoints import Endpoint
from webhooks.messages import CALLBACK, DUE_KEY, Destination, Message, new_message
from webhooks.signing import WebhookVerificationError, sign_headers, verify

REPO = Path(__file__).resolve().parents[1]
CALLBACK_PATH = "/hooks/callback"
ENDPOINT_PATH = "/hooks/endpoint"
RAW_PATH = "/hooks/raw"
HOOK_PREFIX = "/hooks/"
# A registered endpoint's in-flight limit above the worker's whole concurrency: the worker is measured.
ENDPOINT_MAX_IN_FLIGHT = 1000
LOAD_OPERATIONS = json.dumps(
    [
        {"type": "resize", "params": {"width": 4000}},
        {"type": "sharpen", "params": {}},
        {"type": "convert", "params": {"format": "png"}},
    ]
)
T = TypeVar("T")
LOAD_SIZE = (4240, 2832)  # 12 MP, 3:2
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0  # after the last event of a latency run, for every delivery to arrive
UPLOAD_TIMEOUT = 300.0
DISTURBED_CORES = 0.15
GOAL_RATIO = 0.5
GOAL_P99_MS = 100.0
GOAL_P99_BESIDE_HANGING_MS = 1000.0
# The hanging receivers' endpoints: the most the API allows, so the origin's lane is what bounds them.
HANGING_MAX_IN_FLIGHT = 100


# --- the receiver (child process) ---------------------------------------------------------------------


@dataclass
class PathTally:
    requests: int = 0
    receipts: dict[str, int] = field(default_factory=dict)  # webhook-id → first receipt, time_ns
    first_ns: int = 0
    last_ns: int = 0
    duplicates: int = 0
    verified: int = 0
    rejected: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "unique": len(self.receipts),
            "duplicates": self.duplicates,
            "verified": self.verified,
            "rejected": self.rejected,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
        }


class Tally:
    """What the receiver saw, per path; the benchmark reads and resets it over HTTP (GET /stats,
    GET /receipts?path=…, POST /reset, POST /configure {"secrets": {path: secret}, "verify_every": n})."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.verify_every = 10
        self.paths: dict[str, PathTally] = {}

    def record(self, path: str, headers: dict[str, str], body: bytes, at_ns: int) -> None:
        tally = self.paths.setdefault(path, PathTally(first_ns=at_ns))
        tally.requests += 1
        tally.last_ns = at_ns
        msg_id = headers.get("webhook-id", "")
        if msg_id in tally.receipts:
            tally.duplicates += 1
        else:
            tally.receipts[msg_id] = at_ns
        if tally.requests % self.verify_every == 0:
            try:
                verify(self.secrets.get(path, ""), headers, body)
            except (WebhookVerificationError, ValueError):
                tally.rejected += 1
            else:
                tally.verified += 1

    def control(self, method: bytes, path: str, query: str, body: bytes) -> tuple[int, Any]:
        if method == b"GET" and path == "/stats":
            return 200, {name: tally.summary() for name, tally in self.paths.items()}
        if method == b"GET" and path == "/receipts":
            wanted = query.removeprefix("path=")
            return 200, dict(self.paths[wanted].receipts) if wanted in self.paths else {}
        if method == b"POST" and path == "/reset":
            self.paths.clear()
            return 200, {}
        if method == b"POST" and path == "/configure":
            settings = json.loads(body)
            self.secrets = settings["secrets"]
            self.verify_every = max(1, int(settings["verify_every"]))
            return 200, {}
        return 404, {"error": f"no {method.decode()} {path}"}

    def respond(self, method: bytes, url: str, headers: dict[str, str], body: bytes) -> bytes:
        at_ns = time.time_ns()  # the moment of receipt: the whole request is in
        path, _, query = url.partition("?")
        if path.startswith(HOOK_PREFIX):
            self.record(path, headers, body, at_ns)
            return HOOK_OK
        status, answer = self.control(method, path, query, body)
        payload = json.dumps(answer).encode()
        head = (
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload


async def _serve() -> None:
    tally = Tally()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RequestConnection(tally.respond), "127.0.0.1", 0, backlog=1024)
    # stdin is a pipe the benchmark never writes to: readable means at its end, the benchmark gone
    # (even killed), and the receiver must not outlive it.
    benchmark_gone = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), benchmark_gone.set)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await benchmark_gone.wait()


def serve_receiver() -> None:
    # Ctrl-C reaches the whole process group; the benchmark stops the receiver itself, on its way out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(_serve())


def run(main: Coroutine[Any, Any, T]) -> T:
    """On uvloop when installed, as the worker and uvicorn run."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --- the benchmark's side -----------------------------------------------------------------------------


class ReceiverProcess:
    def __init__(self, logs: Path) -> None:
        self.log = logs / "receiver.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--serve-receiver"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"the receiver did not start within {START_TIMEOUT:g} s; see {self.log}")
        self.base_url = f"http://127.0.0.1:{line}"
        self.session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> str:
        return self.base_url + path

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    async def call(self, method: str, path: str, payload: Any = None) -> Any:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        async with self.session.request(method, self.url(path), json=payload) as response:
            if response.status != 200:
                raise RuntimeError(f"receiver {method} {path} answered {response.status}")
            return await response.json()

    async def stats(self, path: str) -> dict[str, int]:
        found: dict[str, dict[str, int]] = await self.call("GET", "/stats")
        return found.get(path, {"requests": 0, "unique": 0, "duplicates": 0, "verified": 0, "rejected": 0})

    async def receipts(self, path: str) -> dict[str, int]:
        found: dict[str, int] = await self.call("GET", f"/receipts?path={path}")
        return found

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Usage:
    """CPU seconds of each process, and of the whole machine, at one moment."""

    seconds: dict[str, float]
    machine: float
    at: float

    def per_delivery_ms(self, later: Usage, deliveries: int) -> dict[str, float]:
        used = {name: later.seconds[name] - self.seconds[name] for name in self.seconds}
        result = {name: round(seconds * 1000 / deliveries, 4) for name, seconds in used.items()}
        result["others_cores"] = self.others_cores(later)
        return result

    def cores(self, later: Usage) -> dict[str, float]:
        elapsed = later.at - self.at
        result = {
            name: round((later.seconds[name] - self.seconds[name]) / elapsed, 2) for name in self.seconds
        }
        result["others_cores"] = self.others_cores(later)
        return result

    def others_cores(self, later: Usage) -> float:
        """Cores the machine's other processes kept busy meanwhile: above ~0.15, a disturbed run."""
        ours = processes_total(later.seconds) - processes_total(self.seconds)
        return round(max(later.machine - self.machine - ours, 0) / (later.at - self.at), 2)


@dataclass
class Bench:
    service: Service
    receiver: ReceiverProcess
    redis: Redis
    store: Store
    account_id: str
    account_secret: str
    callback: Destination
    endpoint: Endpoint

    def usage(self) -> Usage:
        seconds = self.service.cpu()
        seconds["receiver"] = self.receiver.cpu()
        return Usage(seconds, machine_busy_seconds(), time.perf_counter())

    def destinations(self, path: str) -> tuple[Destination, ...]:
        if path == ENDPOINT_PATH:
            return (Destination(self.endpoint.id, self.endpoint.url),)
        return (self.callback,)

    def new_messages(self, count: int, path: str) -> list[Message]:
        to = list(self.destinations(path))
        return [
            new_message(new_id("msg"), self.account_id, "image.completed", image_resource(), to)
            for _ in range(count)
        ]

    async def commit(self, messages: Sequence[Message]) -> int:
        """Stage the messages with `stage_new` in one transaction (a burst: the service stages each with
        the change it announces); time_ns when it returned."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for message in messages:
                self.store.messages.stage_new(pipe, message)
            await pipe.execute()
        return time.time_ns()

    async def wait_delivered(
        self, path: str, count: int, within: float, *, all_recorded: bool = True
    ) -> dict[str, int]:
        """Until the receiver has `count` distinct messages on `path` and, with `all_recorded`, the worker
        has recorded every attempt (the due set is empty)."""
        deadline = time.monotonic() + within
        while True:
            self.service.check_running()
            stats = await self.receiver.stats(path)
            if stats["unique"] >= count and (not all_recorded or await self.redis.zcard(DUE_KEY) == 0):
                return stats
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{path}: {stats['unique']} of {count} messages delivered after {within:g} s; "
                    f"worker log in {self.service.logs}"
                )
            await asyncio.sleep(0.05)


def image_resource() -> dict[str, Any]:
    """An `image.completed` payload of the usual size (~1 KB)."""
    image_id = new_id("img")
    return {
        "id": image_id,
        "status": "completed",
        "operations": [
            {"type": "resize", "params": {"width": 1200}},
            {"type": "sharpen", "params": {"sigma": 1.0, "amount": 1.0}},
            {"type": "convert", "params": {"format": "webp", "quality": 80}},
        ],
        "input": {"format": "jpeg", "width": 6000, "height": 4000, "bytes": 8123456},
        "output": {
            "format": "webp",
            "width": 1200,
            "height": 800,
            "bytes": 161234,
            "url": f"https://images.example.com/v1/images/{image_id}/output",
        },
        "error": None,
        "batch_id": None,
        "callback_url": "https://partner.example.com/hooks/darkroom",
        "metadata": {"order": "ord_8812734", "sku": "SHOE-RED-42", "note": "x" * 300},
        "attempts": 1,
        "created_at": "2026-05-09T07:35:21.123Z",
        "started_at": "2026-05-09T07:35:21.456Z",
        "completed_at": "2026-05-09T07:35:25.123Z",
    }


@dataclass
class Run:
    deliveries_per_s: float
    cpu_ms_per_delivery: dict[str, float]
    pickup_ms: float | None = None
    verified: int = 0
    rejected: int = 0
    duplicates: int = 0

    def figures(self) -> dict[str, Any]:
        found: dict[str, Any] = {"deliveries_per_s": round(self.deliveries_per_s, 1)}
        if self.pickup_ms is not None:
            found["pickup_ms"] = round(self.pickup_ms, 1)
        found["cpu_ms_per_delivery"] = self.cpu_ms_per_delivery
        return found


def span_rate(stats: dict[str, int], count: int) -> float:
    """Deliveries a second as the receiver saw them, first receipt to last."""
    return count / max((stats["last_ns"] - stats["first_ns"]) / 1e9, 1e-9)


async def worker_run(bench: Bench, messages: Sequence[Message], path: str) -> Run:
    await bench.receiver.call("POST", "/reset")
    before = bench.usage()
    committed_ns = await bench.commit(messages)
    stats = await bench.wait_delivered(path, len(messages), max(60.0, len(messages) / 50))
    after = bench.usage()
    return Run(
        span_rate(stats, len(messages)),
        before.per_delivery_ms(after, len(messages)),
        pickup_ms=(stats["first_ns"] - committed_ns) / 1e6,
        verified=stats["verified"],
        rejected=stats["rejected"],
        duplicates=stats["duplicates"],
    )


async def raw_run(
    bench: Bench, session: aiohttp.ClientSession, messages: Sequence[Message], concurrency: int
) -> Run:
    """The same bodies and headers as the worker sends, from a plain aiohttp session."""
    await bench.receiver.call("POST", "/reset")
    url = bench.receiver.url(RAW_PATH)
    pending = iter(messages)

    async def sender() -> None:
        for message in pending:  # shared by every sender: each message is sent once
            body = message.body.encode()
            headers = {
                **sign_headers([bench.account_secret], message.id, body),
                "content-type": "application/json",
            }
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    raise RuntimeError(f"the receiver answered {response.status}")

    before = bench.usage()
    await asyncio.wait_for(
        asyncio.gather(*(sender() for _ in range(concurrency))), max(60.0, len(messages) / 50)
    )
    after = bench.usage()
    stats = await bench.receiver.stats(RAW_PATH)
    if stats["unique"] != len(messages):
        raise RuntimeError(f"raw: the receiver saw {stats['unique']} of {len(messages)} messages")
    return Run(
        span_rate(stats, len(messages)),
        before.per_delivery_ms(after, len(messages)),
        verified=stats["verified"],
        rejected=stats["rejected"],
    )


async def latency_run(
    bench: Bench, rate: float, seconds: float, path: str, *, all_recorded: bool = True
) -> dict[str, Any]:
    """One message every 1/rate s, each in its own transaction; event-to-receipt latencies (waiting,
    with `all_recorded`, for the worker to have recorded every attempt, others' too)."""
    await bench.receiver.call("POST", "/reset")
    count = max(1, round(rate * seconds))
    committed_ns: dict[str, int] = {}
    created_ms: dict[str, float] = {}
    to = list(bench.destinations(path))

    async def one() -> None:
        message = new_message(new_id("msg"), bench.account_id, "image.completed", image_resource(), to)
        async with bench.redis.pipeline(transaction=True) as pipe:
            bench.store.messages.stage_new(pipe, message)
            await pipe.execute()
        committed_ns[message.id] = time.time_ns()
        created_ms[message.id] = iso_seconds(message.created_at) * 1e3  # ms resolution

    loop = asyncio.get_running_loop()
    before = bench.usage()
    started = loop.time() + 0.05
    tasks = []
    pacer_behind = 0.0  # the furthest an event started after its slot (this process too slow or starved)
    for index in range(count):
        slot = started + index / rate
        delay = slot - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pacer_behind = max(pacer_behind, loop.time() - slot)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    window = bench.usage()
    await bench.wait_delivered(path, count, SETTLE_TIMEOUT, all_recorded=all_recorded)
    receipts = await bench.receiver.receipts(path)
    stats = await bench.receiver.stats(path)
    from_commit = sorted((receipts[msg_id] - at) / 1e6 for msg_id, at in committed_ns.items())
    from_created = sorted(receipts[msg_id] / 1e6 - at for msg_id, at in created_ms.items())
    over_goal = sum(1 for value in from_created if value > GOAL_P99_MS)
    return {
        "events": count,
        "events_per_s": round(count / (window.at - before.at), 1),
        "pacer_behind_ms_max": round(pacer_behind * 1000, 1),
        "event_to_receipt_ms": summarise(from_created),
        "commit_returned_to_receipt_ms": summarise(from_commit),
        "share_over_100ms": round(over_goal / len(from_created), 3),
        "cores_during_run": before.cores(window),
        "verified": stats["verified"],
        "rejected": stats["rejected"],
        "duplicates": stats["duplicates"],
    }


def summarise(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 1),
        "p95": round(percentile(values, 0.95), 1),
        "p99": round(percentile(values, 0.99), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


# --- phases -------------------------------------------------------------------------------------------


async def warm_up(bench: Bench) -> None:
    """A few deliveries on each path: the worker is up, its connections are open, signatures verify."""
    for path in (CALLBACK_PATH, ENDPOINT_PATH):
        await bench.receiver.call("POST", "/reset")
        await bench.commit(bench.new_messages(100, path))
        try:
            stats = await bench.wait_delivered(path, 100, START_TIMEOUT)
        except RuntimeError as exc:
            raise RuntimeError(f"the worker does not deliver webhooks: {exc}") from None
        if stats["rejected"]:
            raise RuntimeError(f"{path}: the receiver rejected {stats['rejected']} signatures")


async def throughput_phase(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[Run]] = {"worker_callback": [], "raw_aiohttp": [], "worker_endpoint": []}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Opens the session's connections, as the warm-up opened the worker's.
        warm = bench.new_messages(args.concurrency * 20, CALLBACK_PATH)
        await raw_run(bench, session, warm, args.concurrency)
        for round_number in range(args.rounds):
            messages = bench.new_messages(args.messages, CALLBACK_PATH)
            runs["worker_callback"].append(await worker_run(bench, messages, CALLBACK_PATH))
            runs["raw_aiohttp"].append(await raw_run(bench, session, messages, args.concurrency))
            endpoint_messages = bench.new_messages(args.messages, ENDPOINT_PATH)
            runs["worker_endpoint"].append(await worker_run(bench, endpoint_messages, ENDPOINT_PATH))
            log(
                f"round {round_number + 1}/{args.rounds}: "
                + ", ".join(f"{name} {found[-1].deliveries_per_s:.0f}/s" for name, found in runs.items())
            )
    # Rounds where other processes kept the machine busy measure them, not us: left out when a quiet
    # one exists.
    quiet = [
        index
        for index in range(args.rounds)
        if all(found[index].cpu_ms_per_delivery["others_cores"] <= DISTURBED_CORES for found in runs.values())
    ] or list(range(args.rounds))
    chosen = {name: median_run([found[index] for index in quiet]) for name, found in runs.items()}
    raw_rate = chosen["raw_aiohttp"].deliveries_per_s
    result: dict[str, Any] = {name: run.figures() for name, run in chosen.items()}
    for name in ("worker_callback", "worker_endpoint"):
        result[name]["ratio_to_raw"] = round(chosen[name].deliveries_per_s / raw_rate, 3)
    result["every_round"] = {
        name: [round(run.deliveries_per_s, 1) for run in found] for name, found in runs.items()
    }
    result["rounds_counted"] = [index + 1 for index in quiet]
    result["signatures"] = {
        "verified": sum(run.verified for found in runs.values() for run in found),
        "rejected": sum(run.rejected for found in runs.values() for run in found),
    }
    result["duplicates"] = sum(run.duplicates for found in runs.values() for run in found)
    return result


def median_run(runs: Sequence[Run]) -> Run:
    """The run of median throughput, whole (its CPU figures belong with it)."""
    ranked = sorted(runs, key=lambda run: run.deliveries_per_s)
    return ranked[len(ranked) // 2]


@dataclass(frozen=True)
class LoadPhoto:
    data: bytes
    source: str
    megapixels: float


def load_photo(directory: Path) -> LoadPhoto:
    """A 12 MP JPEG: the corpus' largest photo scaled to it (real content), else a generated one."""
    directory.mkdir(parents=True, exist_ok=True)
    width, height = LOAD_SIZE
    found = corpus_jpegs()
    if found:
        largest = max(found, key=megapixels)
        path = directory / f"load-{largest.stem}.jpg"
        scaled = pyvips.Image.thumbnail(str(largest), width, height=height, crop="centre", size="both")
        scaled.jpegsave(str(path), Q=90)
        source = f"{largest.name} scaled to {width}x{height}, JPEG q90"
    else:
        path = generated_jpegs(directory, width, height, count=1)[0]
        source = f"generated {width}x{height}, JPEG q90"
    return LoadPhoto(path.read_bytes(), source, megapixels(path))


async def image_statuses(bench: Bench, account_id: str) -> dict[str, int]:
    counts = {"queued": 0, "processing": 0, "completed": 0, "failed": 0}
    for image in await bench.store.list_images(account_id, limit=1000):
        counts[image.status] = counts.get(image.status, 0) + 1
    return counts


async def load_phase(bench: Bench, args: argparse.Namespace, photo: LoadPhoto) -> dict[str, Any]:
    """The latency run while the worker's job slots are full of slow image jobs."""
    loader = await bench.store.create_account("webhook-benchmark-load")
    slots = asyncio.Semaphore(args.upload_concurrency)

    async def upload(session: aiohttp.ClientSession) -> None:
        async with slots:
            form = aiohttp.FormData()
            form.add_field("file", photo.data, filename="load.jpg", content_type="image/jpeg")
            form.add_field("operations", LOAD_OPERATIONS)
            async with session.post(
                f"{bench.service.base_url}/v1/images",
                data=form,
                headers={"Authorization": f"Bearer {loader.api_key}"},
            ) as response:
                if response.status != 202:
                    raise RuntimeError(f"upload answered {response.status}: {await response.text()}")

    async with aiohttp.ClientSession() as session:
        await wait_ready(session, bench.service)
        await asyncio.wait_for(
            asyncio.gather(*(upload(session) for _ in range(args.uploads))), UPLOAD_TIMEOUT
        )
    deadline = time.monotonic() + START_TIMEOUT
    while (await image_statuses(bench, loader.account.id))["processing"] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no image job started within {START_TIMEOUT:g} s; logs in {bench.service.logs}"
            )
        await asyncio.sleep(0.1)
    at_start = await image_statuses(bench, loader.account.id)
    result = await latency_run(bench, args.rate, args.seconds, CALLBACK_PATH)
    at_end = await image_statuses(bench, loader.account.id)
    result["image_jobs"] = {
        "at_start": at_start,
        "at_end": at_end,
        # Jobs still queued at the end: every job slot stayed busy through the whole run.
        "busy_throughout": at_end["queued"] > 0,
        "photo": {"source": photo.source, "megapixels": photo.megapixels, "bytes": len(photo.data)},
        "operations": json.loads(LOAD_OPERATIONS),
    }
    return result


class HangingOrigins:
    """Servers on 127.0.0.1 that accept connections, read what comes and never answer, one port each."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.connections: list[asyncio.StreamWriter] = []
        self.reached: set[int] = set()  # which servers received a request

    async def start(self, count: int) -> list[str]:
        for index in range(count):
            self.servers.append(await asyncio.start_server(self._swallower(index), "127.0.0.1", 0))
        return [f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks" for server in self.servers]

    def _swallower(self, index: int) -> Any:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections.append(writer)
            while await reader.read(65536):
                self.reached.add(index)

        return swallow

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for writer in self.connections:
            writer.transport.abort()  # the worker's attempts on them end now
        for server in self.servers:
            await server.wait_closed()


async def hanging_run(bench: Bench, args: argparse.Namespace, count: int) -> dict[str, Any]:
    """The latency run while `count` receivers hang, each with a backlog (see the module's 4.)."""
    hanging = HangingOrigins()
    endpoints: list[Endpoint] = []
    try:
        for url in await hanging.start(count):
            endpoint = await bench.store.endpoints.create(
                new_id("ep"), bench.account_id, url, ["image.completed"], max_in_flight=HANGING_MAX_IN_FLIGHT
            )
            assert endpoint is not None
            endpoints.append(endpoint)
        backlog = [
            new_message(new_id("msg"), bench.account_id, "image.completed", image_resource(), [destination])
            for endpoint in endpoints
            for destination in [Destination(endpoint.id, endpoint.url)] * args.hanging_backlog
        ]
        await bench.commit(backlog)
        result = await latency_run(bench, args.rate, args.seconds, CALLBACK_PATH, all_recorded=False)
        result["hanging_receivers"] = count
        result["hanging_backlog"] = len(backlog)
        result["hanging_reached"] = len(hanging.reached)
        result["hanging_connections"] = len(hanging.connections)
        return result
    finally:
        for endpoint in endpoints:
            await bench.store.endpoints.delete(endpoint)
        await hanging.close()
        await wait_nothing_due(bench, SETTLE_TIMEOUT)


async def wait_nothing_due(bench: Bench, within: float) -> None:
    """Until the worker has recorded every attempt and nothing is waiting (the due set is empty)."""
    deadline = time.monotonic() + within
    while True:
        if await bench.redis.zcard(DUE_KEY) == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"deliveries still due after {within:g} s; worker log in {bench.service.logs}")
        await asyncio.sleep(0.1)


# --- the whole run ------------------------------------------------------------------------------------


async def measure(service: Service, args: argparse.Namespace, photo: LoadPhoto) -> dict[str, Any]:
    receiver = ReceiverProcess(service.logs)
    redis = Redis.from_url(service.env["REDIS_URL"])
    try:
        store = Store(redis)
        owner = await store.create_account("webhook-benchmark")
        endpoint = await store.endpoints.create(
            new_id("ep"),
            owner.account.id,
            receiver.url(ENDPOINT_PATH),
            ["image.completed"],
            "benchmark receiver",
            max_in_flight=ENDPOINT_MAX_IN_FLIGHT,
        )
        secrets = {
            CALLBACK_PATH: owner.account.webhook_secret,
            RAW_PATH: owner.account.webhook_secret,
            ENDPOINT_PATH: endpoint.current_secret,
        }
        await receiver.call("POST", "/configure", {"secrets": secrets, "verify_every": args.verify_every})
        bench = Bench(
            service=service,
            receiver=receiver,
            redis=redis,
            store=store,
            account_id=owner.account.id,
            account_secret=owner.account.webhook_secret,
            callback=Destination(CALLBACK, receiver.url(CALLBACK_PATH)),
            endpoint=endpoint,
        )
        log("warm-up")
        await warm_up(bench)
        log("throughput")
        report: dict[str, Any] = {"throughput": await throughput_phase(bench, args)}
        log("latency, worker idle")
        latency: dict[str, Any] = {"quiet": await latency_run(bench, args.rate, args.seconds, CALLBACK_PATH)}
        if args.uploads > 0:
            log(f"latency, worker busy with {args.uploads} image jobs")
            latency["under_image_load"] = await load_phase(bench, args, photo)
        report["latency"] = latency
        beside_hanging = {}
        for count in args.hanging:
            log(f"latency beside {count} hanging receivers")
            beside_hanging[str(count)] = await hanging_run(bench, args, count)
        report["beside_hanging"] = beside_hanging
        report["redis_version"] = (await redis.info("server"))["redis_version"]
        return report
    finally:
        await redis.aclose()
        await receiver.aclose()
        receiver.stop()


def judge(report: dict[str, Any], poll_seconds: float) -> None:
    """Goals, and whether the dispatcher's poll is what bounds the latency."""
    throughput = report["throughput"]
    goals: dict[str, bool] = {
        f"callback_ratio_ge_{GOAL_RATIO}": throughput["worker_callback"]["ratio_to_raw"] >= GOAL_RATIO,
        f"endpoint_ratio_ge_{GOAL_RATIO}": throughput["worker_endpoint"]["ratio_to_raw"] >= GOAL_RATIO,
    }
    poll_ms = poll_seconds * 1000
    for name, run_result in report["latency"].items():
        p99 = run_result["event_to_receipt_ms"]["p99"]
        goals[f"{name}_p99_le_{GOAL_P99_MS:g}ms"] = p99 <= GOAL_P99_MS
        # Events made outside the worker wait for its next poll: latencies then spread evenly over one
        # poll interval, so the p99 sits near it and the p50 near half of it.
        run_result["bounded_by_dispatcher_poll"] = p99 > GOAL_P99_MS and p99 >= 0.8 * poll_ms
    for count, run_result in report["beside_hanging"].items():
        p99 = run_result["event_to_receipt_ms"]["p99"]
        goal = GOAL_P99_BESIDE_HANGING_MS
        goals[f"beside_{count}_hanging_p99_lt_{goal:g}ms"] = p99 < goal
    report["goals"] = goals
    report["dispatcher_poll_interval_ms"] = poll_ms


def machine_info(load_before: float) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "load_average_before": round(load_before, 2),
        "python": platform.python_version(),
        "loop": loop,
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
    }


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every child process is stopped on the way out."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000, help="messages per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (the median counts)")
    parser.add_argument("--concurrency", type=int, default=20, help="raw aiohttp requests in flight")
    parser.add_argument("--rate", type=float, default=200.0, help="events a second in the latency runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run")
    parser.add_argument("--uploads", type=int, default=50, help="slow image jobs for the load run (0: skip)")
    parser.add_argument("--upload-concurrency", type=int, default=4, help="uploads in flight")
    parser.add_argument(
        "--hanging",
        type=lambda text: [int(each) for each in text.split(",") if each.strip()],
        default=[1, 2, 10, 100],
        help="hanging receivers beside the fast one, one latency run per number (comma separated; '' skips)",
    )
    parser.add_argument("--hanging-backlog", type=int, default=50, help="messages due for each hanging one")
    parser.add_argument(
        "--verify-every", type=int, default=10, help="the receiver verifies every n-th request"
    )
    parser.add_argument(
        "--worker-settings",
        default="jobs.worker.WorkerSettings",
        help="arq settings for the worker (to try variants; the Procfile's by default)",
    )
    parser.add_argument(
        "--profile",
        choices=["worker"],
        default=None,
        help="run the worker under py-spy record (collapsed stacks in the kept work dir's logs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--serve-receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_receiver:
        serve_receiver()
        return 0
    if args.messages < 1 or args.rounds < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--messages, --rounds, --rate and --seconds must be positive")

    _stop_on_sigterm()
    keep = args.keep or args.profile is not None
    work_dir = Path(tempfile.mkdtemp(prefix="darkroom-bench-webhooks-"))
    load_before = os.getloadavg()[0]
    try:
        photo = load_photo(work_dir / "photos")
        with running_service(work_dir / "service", None, args.profile, args.worker_settings) as service:
            report = run(measure(service, args, photo))
        poll = inspect.signature(Dispatcher).parameters["idle_wait"].default
        judge(report, poll)
        report["settings"] = {
            "messages": args.messages,
            "rounds": args.rounds,
            "raw_concurrency": args.concurrency,
            "rate": args.rate,
            "seconds": args.seconds,
            "uploads": args.uploads,
            "hanging": args.hanging,
            "hanging_backlog": args.hanging_backlog,
            "worker_settings": args.worker_settings,
            "workers": 1,
        }
        report["machine"] = machine_info(load_before)
        if keep:
            report["work_dir"] = str(work_dir)
        print(json.dumps(report, indent=2))
        return 0
    except KeyboardInterrupt:
        log("interrupted; child processes stopped")
        return 130
    except (RuntimeError, TimeoutError) as exc:
        keep = True  # the message may point at the logs
        log(f"failed: {exc or 'a phase ran out of time'} (work dir kept: {work_dir})")
        return 1
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
