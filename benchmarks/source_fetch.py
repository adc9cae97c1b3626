"""Fetching `source_url`s: Darkroom's SourceFetcher against a plain httpx download, same run, same server.

    python benchmarks/source_fetch.py [--megabytes 8] [--fetches 20] [--rounds 3]

A loopback HTTP server in a child process (asyncio, so its CPU is not ours) answers every GET with the
same --megabytes body. This process fetches it --fetches times, one after another, into a temporary
file, with each client in turn for --rounds rounds:

- darkroom: `jobs.fetch.SourceFetcher` (the SSRF guard's resolution, the pinned connection, the size cap
  counted per chunk), as a worker fetches;
- httpx: one `httpx.AsyncClient`, `stream()` and `aiter_raw()` into the file, no checks.

Figures per client are the median round: MB/s and CPU ms per fetch of this process. Prints one JSON
object; what it shows: the guard and the cap cost next to nothing beside the bytes themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, BinaryIO

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.fetch import SourceFetcher  # noqa: E402
from jobs.settings import Settings  # noqa: E402

SERVER = """
import asyncio, sys
size = int(sys.argv[1])
body = b"\\xff" * size
head = b"HTTP/1.1 200 OK\\r\\ncontent-type: image/jpeg\\r\\ncontent-length: %d\\r\\n\\r\\n" % size

async def serve(reader, writer):
    try:
        while True:
            request = await reader.readuntil(b"\\r\\n\\r\\n")
            if not request:
                break
            writer.write(head)
            writer.write(body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


async def _darkroom(url: str, size: int, fetches: int, sink: BinaryIO) -> None:
    settings = Settings(allow_private_callbacks=True, max_upload_bytes=size, source_timeout=600)
    fetcher = SourceFetcher(settings)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(fetches):
            sink.seek(0)
            fetched = await fetcher.fetch(url, sink, loop.time() + 600)
            assert fetched.size == size
    finally:
        await fetcher.aclose()


async def _httpx(url: str, size: int, fetches: int, sink: BinaryIO) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(fetches):
            sink.seek(0)
            async with client.stream("GET", url) as response:
                async for chunk in response.aiter_raw():
                    sink.write(chunk)
            assert sink.tell() == size


async def _measure(args: argparse.Namespace, url: str, sink: BinaryIO) -> dict[str, Any]:
    size = args.megabytes * 1_000_000
    clients = {"darkroom": _darkroom, "httpx": _httpx}
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    for fetch in clients.values():
        await fetch(url, size, 1, sink)  # warm-up
    for _ in range(args.rounds):
        for name, fetch in clients.items():
            wall, cpu = time.perf_counter(), time.process_time()
            await fetch(url, size, args.fetches, sink)
            rounds[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    result: dict[str, Any] = {}
    for name, measured in rounds.items():
        wall = median(each[0] for each in measured)
        cpu = median(each[1] for each in measured)
        result[name] = {
            "mb_per_s": round(size * args.fetches / wall / 1e6, 1),
            "cpu_ms_per_fetch": round(cpu / args.fetches * 1000, 2),
        }
    result["ratio_to_httpx"] = round(result["darkroom"]["mb_per_s"] / result["httpx"]["mb_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=8)
    parser.add_argument("--fetches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.megabytes * 1_000_000
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(size)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with tempfile.TemporaryFile() as sink:
            result = asyncio.run(_measure(args, f"http://127.0.0.1:{port}/photo.jpg", sink))
    finally:
        server.terminate()
        server.wait()
    print(json.dumps({"megabytes": args.megabytes, "fetches": args.fetches, **result}))


if __name__ == "__main__":
    main()
