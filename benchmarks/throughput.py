"""Darkroom against raw pyvips on the same photos: throughput, and per-image overhead at one at a time.

    python benchmarks/throughput.py [--images 120] [--concurrency 12] [--worker-concurrency W]

It starts what production runs — an embedded redis-server (AOF on), `uvicorn server.app:app` and one
`arq jobs.worker.WorkerSettings` — as child processes, and in the same run does the same work with raw
pyvips in this process:

- task: resize to 512 px wide, JPEG q80 (raw: `pyvips.Image.thumbnail(path, 512)` then
  `jpegsave(Q=80, keep=none)`; service: `resize {width: 512}` then `convert {format: jpeg, quality: 80}`);
- photos: the JPEGs of at least 2 MP in ../shared/corpus/good, else generated 3 MP JPEGs;
- raw throughput: a thread pool (each thread count in --raw-threads; the best is the baseline), libvips
  operation cache off as in the worker;
- service throughput: --images uploads, --concurrency in flight, from the first upload sent to the last
  signed webhook received (a local aiohttp receiver verifies each signature);
- overhead: --latency-images uploads one at a time; for each, (webhook received - upload sent) - the raw
  time of the same photo measured here (median of three single runs).

Prints one JSON object. Issue 2's goals: ratio ≥ 0.8, overhead p50 ≤ 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pyvips
from aiohttp import web

from server.embedded_redis import EmbeddedRedis
from webhooks.signing import WebhookVerificationError, verify

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "good"
BIN = Path(sys.executable).parent
MIN_PIXELS = 2_000_000
WIDTH = 512
QUALITY = 80
OPERATIONS = json.dumps(
    [
        {"type": "resize", "params": {"width": WIDTH}},
        {"type": "convert", "params": {"format": "jpeg", "quality": QUALITY}},
    ]
)
READY_TIMEOUT = 30.0
DONE_TIMEOUT = 300.0


# --- photos -------------------------------------------------------------------------------------------


def find_photos(generated_dir: Path) -> tuple[list[Path], str]:
    if CORPUS.is_dir():
        found = []
        for path in sorted(CORPUS.iterdir()):
            if path.suffix.lower() not in (".jpg", ".jpeg"):
                continue
            header = pyvips.Image.new_from_file(str(path))
            # ultra-hdr.jpg loads through libvips' uhdrload: still a JPEG file, as Darkroom sniffs it.
            if header.width * header.height >= MIN_PIXELS:
                found.append(path)
        if found:
            return found, str(CORPUS)
    generated_dir.mkdir(parents=True, exist_ok=True)
    photos = []
    for index in range(6):
        # Noise over a gradient: compresses and decodes like a photo rather than a flat test card.
        base = pyvips.Image.xyz(2048, 1536)[0].linear(0.1, 20 * index)
        noisy = (base + pyvips.Image.gaussnoise(2048, 1536, sigma=40, mean=0)).cast("uchar")
        image = noisy.bandjoin([noisy.rot180().resize(1), noisy.flipver()]).copy(interpretation="srgb")
        path = generated_dir / f"generated-{index}.jpg"
        image.jpegsave(str(path), Q=90)
        photos.append(path)
    return photos, "generated 2048x1536 JPEGs"


def megapixels(path: Path) -> float:
    header = pyvips.Image.new_from_file(str(path))
    return round(header.width * header.height / 1e6, 1)


# --- raw pyvips -----------------------------------------------------------------------------------------


def raw_task(source: Path, destination: Path) -> None:
    image = pyvips.Image.thumbnail(str(source), WIDTH)
    image.jpegsave(str(destination), Q=QUALITY, keep=pyvips.enums.ForeignKeep.NONE)


def raw_single_times(photos: Sequence[Path], out_dir: Path, runs: int = 3) -> dict[Path, float]:
    """Seconds for each photo alone (median of `runs`), one at a time as the latency phase runs."""
    times: dict[Path, float] = {}
    for index, photo in enumerate(photos):
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            raw_task(photo, out_dir / f"single-{index}.jpg")
            samples.append(time.perf_counter() - started)
        times[photo] = statistics.median(samples)
    return times


def raw_throughput(sequence: Sequence[Path], out_dir: Path, threads: int) -> float:
    """Images per second for `sequence` through a pool of `threads`."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(raw_task, photo, out_dir / f"raw-{threads}-{index % 32}.jpg")
            for index, photo in enumerate(sequence)
        ]
        for job in jobs:
            job.result()
    return len(sequence) / (time.perf_counter() - started)


def pipeline_throughput(sequence: Sequence[Path], out_dir: Path, threads: int) -> float:
    """Diagnostic: Darkroom's `jobs.pipeline.render` in this process (the worker's work, no service)."""
    from jobs.operations import parse_operations
    from jobs.pipeline import render

    chain = parse_operations(json.loads(OPERATIONS))
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(render, photo, out_dir / f"pipeline-{index % 32}", chain, "jpeg")
            for index, photo in enumerate(sequence)
        ]
        for job in jobs:
            job.result()
    return len(sequence) / (time.perf_counter() - started)


# --- the service ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Service:
    base_url: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        with log:
            self.processes.append(
                subprocess.Popen(list(args), env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def check_running(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}; logs in {self.logs}")


@contextlib.contextmanager
def running_service(work_dir: Path, worker_concurrency: int | None, profile: str | None) -> Iterator[Service]:
    data_dir = work_dir / "data"
    logs = work_dir / "logs"
    logs.mkdir(parents=True)
    with EmbeddedRedis(data_dir / "redis") as redis_server:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
        env.update(
            REDIS_URL=redis_server.url,
            DARKROOM_DATA_DIR=str(data_dir),
            PORT=str(port),
            DARKROOM_PUBLIC_URL=f"http://127.0.0.1:{port}",
            DARKROOM_ALLOW_PRIVATE_CALLBACKS="1",
        )
        if worker_concurrency is not None:
            env["DARKROOM_WORKER_CONCURRENCY"] = str(worker_concurrency)
        service = Service(f"http://127.0.0.1:{port}", env, logs)
        web_cmd = [str(BIN / "uvicorn"), "server.app:app", "--host", "127.0.0.1", "--port", str(port)]
        worker_cmd = [str(BIN / "arq"), "jobs.worker.WorkerSettings"]
        if profile in ("web", "worker"):
            target = web_cmd if profile == "web" else worker_cmd
            out = logs / f"{profile}.speedscope.json"
            target[:] = [
                str(BIN / "py-spy"),
                "record",
                "-f",
                "speedscope",
                "-o",
                str(out),
                "--idle",
                "--threads",
                "--",
                *target,
            ]
        try:
            service.start("web", web_cmd)
            service.start("worker", worker_cmd)
            yield service
        finally:
            service.stop()


def create_account(env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run(
        [str(BIN / "darkroom"), "accounts", "create", "--name", "benchmark", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    account: dict[str, str] = json.loads(done.stdout)
    return account


async def wait_ready(session: aiohttp.ClientSession, service: Service) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        service.check_running()
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{service.base_url}/readyz") as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"web not ready within {READY_TIMEOUT:g} s; logs in {service.logs}")
        await asyncio.sleep(0.05)


class Receiver:
    """Verifies each webhook and records when it arrived, per image id."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.arrived: dict[str, float] = {}
        self.failed: dict[str, Any] = {}
        self.rejected = 0
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _future(self, image_id: str) -> asyncio.Future[float]:
        if image_id not in self._waiters:
            self._waiters[image_id] = asyncio.get_running_loop().create_future()
        return self._waiters[image_id]

    async def _receive(self, request: web.Request) -> web.Response:
        received = time.perf_counter()
        body = await request.read()
        try:
            verify(self.secret, dict(request.headers), body)
        except WebhookVerificationError:
            self.rejected += 1
            return web.Response(status=400)
        data = json.loads(body)["data"]
        if data["status"] != "completed":
            self.failed[data["id"]] = data.get("error")
        self.arrived[data["id"]] = received
        future = self._future(data["id"])
        if not future.done():
            future.set_result(received)
        return web.Response(text="ok")

    async def wait(self, image_id: str) -> float:
        return await asyncio.wait_for(self._future(image_id), DONE_TIMEOUT)


async def upload(
    session: aiohttp.ClientSession, base_url: str, api_key: str, data: bytes, callback: str
) -> str:
    form = aiohttp.FormData()
    form.add_field("file", data, filename="photo.jpg", content_type="image/jpeg")
    form.add_field("operations", OPERATIONS)
    form.add_field("callback_url", callback)
    async with session.post(
        f"{base_url}/v1/images", data=form, headers={"Authorization": f"Bearer {api_key}"}
    ) as response:
        if response.status != 202:
            raise RuntimeError(f"upload answered {response.status}: {await response.text()}")
        image_id: str = (await response.json())["id"]
        return image_id


@dataclass
class ServiceNumbers:
    images_per_s: float
    failed: int
    overheads_ms: list[float]
    latencies_ms: list[float]


async def measure_service(
    service: Service,
    sequence: Sequence[Path],
    latency_sequence: Sequence[Path],
    raw_single: dict[Path, float],
    concurrency: int,
    warmup: Sequence[Path],
) -> ServiceNumbers:
    account = create_account(service.env)
    receiver = Receiver(account["webhook_secret"])
    await receiver.start()
    contents = {photo: photo.read_bytes() for photo in {*sequence, *latency_sequence, *warmup}}
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, service)

            async def one(photo: Path) -> tuple[float, float]:
                sent = time.perf_counter()
                image_id = await upload(
                    session, service.base_url, account["api_key"], contents[photo], receiver.url
                )
                return sent, await receiver.wait(image_id)

            for photo in warmup:  # first requests import lazily, fill pools, warm libvips
                await one(photo)

            slots = asyncio.Semaphore(concurrency)

            async def limited(photo: Path) -> tuple[float, float]:
                async with slots:
                    sent = time.perf_counter()
                    image_id = await upload(
                        session, service.base_url, account["api_key"], contents[photo], receiver.url
                    )
                # The slot frees when the upload is answered: `concurrency` uploads in flight, as a
                # partner's client would have; the worker's queue holds the rest.
                return sent, await receiver.wait(image_id)

            results = await asyncio.gather(*(limited(photo) for photo in sequence))
            first_sent = min(sent for sent, _ in results)
            last_received = max(received for _, received in results)
            images_per_s = len(sequence) / (last_received - first_sent)

            overheads, latencies = [], []
            for photo in latency_sequence:
                sent, received = await one(photo)
                latency = received - sent
                latencies.append(latency * 1000)
                overheads.append((latency - raw_single[photo]) * 1000)
        if receiver.rejected:
            raise RuntimeError(f"{receiver.rejected} webhooks failed signature verification")
        return ServiceNumbers(images_per_s, len(receiver.failed), overheads, latencies)
    finally:
        await receiver.stop()


# --- report ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cycle(photos: Sequence[Path], count: int) -> list[Path]:
    return [photos[index % len(photos)] for index in range(count)]


def worker_concurrency_in_effect(requested: int | None) -> int:
    from jobs.settings import Settings

    env = dict(os.environ)
    if requested is not None:
        env["DARKROOM_WORKER_CONCURRENCY"] = str(requested)
    return Settings.from_env(env).worker_concurrency


def timed(label: str, action: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = action()
    print(f"[bench] {label}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=120, help="images for the throughput runs (≥ 100)")
    parser.add_argument("--concurrency", type=int, default=12, help="service uploads in flight")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=None,
        help="sets DARKROOM_WORKER_CONCURRENCY for the worker (default: the setting's)",
    )
    parser.add_argument("--latency-images", type=int, default=40, help="one-at-a-time uploads (≥ 30)")
    parser.add_argument("--raw-threads", default="2,4", help="thread counts for raw pyvips; the best counts")
    parser.add_argument(
        "--profile",
        choices=["web", "worker"],
        default=None,
        help="run that process under py-spy record (speedscope file in the logs dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    args = parser.parse_args(argv)

    pyvips.cache_set_max(0)  # as the worker runs: every job reads a different file
    work_dir = Path(tempfile.mkdtemp(prefix="darkroom-bench-"))
    try:
        photos, source = find_photos(work_dir / "photos")
        sequence = cycle(photos, args.images)
        latency_sequence = cycle(photos, args.latency_images)
        raw_out = work_dir / "raw"
        raw_out.mkdir()

        timed("raw warm-up", lambda: [raw_task(photo, raw_out / "warm.jpg") for photo in photos])
        raw_single = timed("raw single", lambda: raw_single_times(photos, raw_out))
        raw_by_threads = {
            threads: timed(f"raw x{threads}", lambda t=threads: raw_throughput(sequence, raw_out, t))
            for threads in (int(part) for part in args.raw_threads.split(","))
        }
        best_threads = max(raw_by_threads, key=lambda threads: raw_by_threads[threads])
        raw_rate = raw_by_threads[best_threads]
        pipeline_rate = timed("pipeline", lambda: pipeline_throughput(sequence, raw_out, best_threads))

        with running_service(work_dir / "service", args.worker_concurrency, args.profile) as service:
            numbers = timed(
                "service",
                lambda: asyncio.run(
                    measure_service(service, sequence, latency_sequence, raw_single, args.concurrency, photos)
                ),
            )
        ratio = numbers.images_per_s / raw_rate
        overhead_p50 = statistics.median(numbers.overheads_ms)
        report = {
            "service_images_per_s": round(numbers.images_per_s, 2),
            "raw_images_per_s": round(raw_rate, 2),
            "ratio": round(ratio, 3),
            "overhead_ms_p50": round(overhead_p50, 1),
            "overhead_ms_p95": round(percentile(numbers.overheads_ms, 0.95), 1),
            "latency_ms_p50": round(statistics.median(numbers.latencies_ms), 1),
            "latency_ms_p95": round(percentile(numbers.latencies_ms, 0.95), 1),
            "raw_single_ms_median": round(statistics.median(raw_single.values()) * 1000, 1),
            "goals": {"ratio_ge_0.8": ratio >= 0.8, "overhead_p50_le_25ms": overhead_p50 <= 25},
            "images": len(sequence),
            "latency_images": len(latency_sequence),
            "failed": numbers.failed,
            "upload_concurrency": args.concurrency,
            "worker_concurrency": worker_concurrency_in_effect(args.worker_concurrency),
            "workers": 1,
            "raw_threads": best_threads,
            "raw_images_per_s_by_threads": {str(k): round(v, 2) for k, v in raw_by_threads.items()},
            "pipeline_in_process_images_per_s": round(pipeline_rate, 2),
            "photos": {"source": source, "files": {photo.name: megapixels(photo) for photo in photos}},
            "machine": {
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "pyvips": pyvips.__version__,
                "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
                "vips_concurrency": pyvips.concurrency_get() if hasattr(pyvips, "concurrency_get") else None,
                "platform": platform.platform(),
            },
        }
        if args.keep or args.profile:
            report["work_dir"] = str(work_dir)
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if not (args.keep or args.profile):
            import shutil

            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
